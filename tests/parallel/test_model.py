"""The hybrid model with its rows cut over a context-parallel group (gloo, CPU) against one process.

Each spawned rank runs the model on its slice of every row (MoBA across the group, sliding windows with
the halo of the previous rank, RoPE at absolute positions), takes the cross-entropy sum of its targets,
backpropagates and sums the parameter gradients over the group; the parent compares logits, loss and
gradients with the model on the whole rows in one process (float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flashmoba.models.hybrid import HybridLM, ModelConfig
from flashmoba.parallel import CommunicationLog, ContextParallel, estimate_halo_communication
from tests.helpers import assert_close

SEQLEN, BATCH = 32, 2
SCHEMES = ("allgather", "selective")


def _config(global_rope: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=23,
        num_layers=4,
        hidden_size=16,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_hidden_size=24,
        window_size=8,
        moba_block_size=4,
        moba_topk=2,
        global_rope=global_rope,
        backend="reference",
    )


def _model(global_rope: bool) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(_config(global_rope)).double()


def _tokens() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    rows = torch.randint(0, 23, (BATCH, SEQLEN + 1), generator=generator)
    return rows[:, :-1], rows[:, 1:]


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _ropes(world_size: int) -> tuple[bool, ...]:
    """Global RoPE on and off with 2 ranks; on only with 4 (RoPE offsets in every layer; keeps it short)."""
    return (False, True) if world_size == 2 else (True,)


def _worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        inputs, targets = _tokens()
        local = slice(rank * SEQLEN // world_size, (rank + 1) * SEQLEN // world_size)
        results = {}
        for global_rope in _ropes(world_size):
            for scheme in SCHEMES:
                model = _model(global_rope)
                log = CommunicationLog()
                context = ContextParallel(scheme=scheme, comm_log=log)
                logits, _ = model(inputs[:, local], context_parallel=context)
                _loss_sum(logits, targets[:, local]).backward()
                grads = {}
                for name, parameter in model.named_parameters():
                    dist.all_reduce(parameter.grad)
                    grads[name] = parameter.grad
                halo = [(r.phase, r.bytes_received) for r in log.records if r.what.startswith("kv halo")]
                results[global_rope, scheme] = (logits.detach(), grads, halo)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_model_matches_one_process(tmp_path, world_size):
    mp.spawn(_worker, args=(world_size, f"file://{tmp_path / 'rdv'}", str(tmp_path)), nprocs=world_size)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    inputs, targets = _tokens()
    config = _config(False)
    halo_bytes = 2 * BATCH * (config.window_size - 1) * config.num_kv_heads * config.head_dim * 8
    sliding_layers = config.num_layers // 2
    for global_rope in _ropes(world_size):
        model = _model(global_rope)
        logits, _ = model(inputs)
        _loss_sum(logits, targets).backward()
        for scheme in SCHEMES:
            label = f"world {world_size}, {scheme}, global_rope={global_rope}"
            actual = torch.cat([per_rank[r][global_rope, scheme][0] for r in range(world_size)], dim=1)
            assert_close(actual, logits, "float64", name=f"{label}, logits")
            for name, parameter in model.named_parameters():
                grad = per_rank[0][global_rope, scheme][1][name]
                # RMSNorm computes in float32 whatever the input dtype, and a weight's gradient sums over
                # tokens in another order when they are split: float32 rounding, not float64.
                assert_close(grad, parameter.grad, "kernel_float32", name=f"{label}, grad {name}")
            # The halo: window - 1 keys and values per sliding layer from the previous rank, and their
            # gradients back; nothing else.
            for rank in range(world_size):
                halo = per_rank[rank][global_rope, scheme][2]
                forward = sum(moved for phase, moved in halo if phase == "forward")
                backward = sum(moved for phase, moved in halo if phase == "backward")
                assert forward == (sliding_layers * halo_bytes if rank > 0 else 0), (label, rank)
                assert backward == (sliding_layers * halo_bytes if rank < world_size - 1 else 0)
                estimate = estimate_halo_communication(
                    batch=BATCH,
                    width=config.window_size - 1,
                    heads_kv=config.num_kv_heads,
                    head_dim=config.head_dim,
                    world_size=world_size,
                    rank=rank,
                    dtype=torch.float64,
                )
                assert forward == sliding_layers * estimate["forward"]
                assert backward == sliding_layers * estimate["backward"]


def test_halo_wider_than_the_slice_is_refused(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        context = ContextParallel()
        k = torch.zeros(1, 4, 1, 2)
        with pytest.raises(ValueError, match="width must be at most seqlen_local"):
            context.halo(k, k, 5)
        with pytest.raises(ValueError, match="scheme must be one of"):
            ContextParallel(scheme="ring")
    finally:
        dist.destroy_process_group()
