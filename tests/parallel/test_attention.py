"""moba_attn_context_parallel against single-process moba_attn on the whole sequences (gloo, CPU).

Each spawned rank runs every case on its slice and saves its output and the gradients of its local q, k
and v; the parent computes moba_attn on the whole sequences and compares, so a failure shows in pytest.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashmoba import moba_attn
from flashmoba.parallel import moba_attn_context_parallel
from tests.helpers import assert_close

BLOCK = 4
BATCH, HEAD_DIM = 2, 8

# (causal, heads_q, heads_kv, seqlen_local, topk, softmax_scale)
CASES = [
    (True, 4, 2, 3 * BLOCK, 2, None),  # GQA, several blocks per slice
    (False, 4, 2, 3 * BLOCK, 2, None),
    (True, 4, 2, BLOCK, 1, None),  # one block per slice: every block boundary is a slice edge; own block
    (False, 4, 2, BLOCK, 1, 0.3),
    (True, 2, 2, 3 * BLOCK, 100, None),  # topk >= number of blocks: dense causal attention
    (False, 4, 1, 3 * BLOCK, 100, None),  # MQA, dense
    (True, 4, 2, 2 * BLOCK, 3, 0.5),
]


def _whole_inputs(case_index: int, world_size: int):
    """q, k, v of the whole sequences and the upstream gradient, float64, the same on every process."""
    _, heads_q, heads_kv, seqlen_local, _, _ = CASES[case_index]
    seqlen = world_size * seqlen_local
    generator = torch.Generator().manual_seed(1000 * world_size + case_index)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q = randn(BATCH, seqlen, heads_q, HEAD_DIM)
    k = randn(BATCH, seqlen, heads_kv, HEAD_DIM)
    v = randn(BATCH, seqlen, heads_kv, HEAD_DIM)
    grad_out = randn(BATCH, seqlen, heads_q, HEAD_DIM)
    return q, k, v, grad_out


def _worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        results = []
        for index, (causal, _, _, seqlen_local, topk, scale) in enumerate(CASES):
            rows = slice(rank * seqlen_local, (rank + 1) * seqlen_local)
            q, k, v, grad_out = (t[:, rows].clone() for t in _whole_inputs(index, world_size))
            for t in (q, k, v):
                t.requires_grad_(True)
            out = moba_attn_context_parallel(
                q, k, v, BLOCK, topk, causal=causal, softmax_scale=scale, backend="reference"
            )
            out.backward(grad_out)
            results.append([out.detach(), q.grad, k.grad, v.grad])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _expected(case_index: int, world_size: int) -> list[torch.Tensor]:
    causal, _, _, _, topk, scale = CASES[case_index]
    q, k, v, grad_out = _whole_inputs(case_index, world_size)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = moba_attn(q, k, v, BLOCK, topk, causal=causal, softmax_scale=scale, backend="reference")
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_moba_attn_on_the_whole_sequences(tmp_path, world_size):
    init_method = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world_size, init_method, str(tmp_path)), nprocs=world_size, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    for index, case in enumerate(CASES):
        expected = _expected(index, world_size)
        for slot, name in enumerate(["out", "dq", "dk", "dv"]):
            actual = torch.cat([per_rank[rank][index][slot] for rank in range(world_size)], dim=1)
            assert_close(actual, expected[slot], "float64", name=f"world {world_size}, case {case}, {name}")


def test_without_a_process_group_raises():
    assert not dist.is_initialized()
    q = torch.randn(1, 2 * BLOCK, 2, HEAD_DIM)
    with pytest.raises(RuntimeError, match="process group"):
        moba_attn_context_parallel(q, q, q, BLOCK, 2)


def test_bad_inputs_name_what_is_wrong():
    q = torch.randn(1, 6, 2, HEAD_DIM)
    with pytest.raises(ValueError, match=r"seqlen_local=6 and block_size=4"):
        moba_attn_context_parallel(q, q, q, BLOCK, 2)
    q = torch.randn(1, 2 * BLOCK, 2, HEAD_DIM)
    with pytest.raises(TypeError, match="causal must be a bool"):
        moba_attn_context_parallel(q, q, q, BLOCK, 2, causal="False")
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        moba_attn_context_parallel(q, q, q, 0, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        moba_attn_context_parallel(q, q, q, BLOCK, 2, backend="flash")
    with pytest.raises(ValueError, match="seqlen_local"):
        moba_attn_context_parallel(q, q[:, :BLOCK], q[:, :BLOCK], BLOCK, 2)
    with pytest.raises(ValueError, match="heads_q must be a multiple of heads_kv"):
        moba_attn_context_parallel(
            q, q[:, :, :1].expand(-1, -1, 3, -1), q[:, :, :1].expand(-1, -1, 3, -1), 4, 2
        )


def test_one_rank_is_moba_attn(tmp_path):
    """A group of one: the local slice is the whole sequence (and the group check passes)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        q, k, v, _ = _whole_inputs(0, 1)
        for causal in (True, False):
            actual = moba_attn_context_parallel(q, k, v, BLOCK, 2, causal=causal, backend="reference")
            expected = moba_attn(q, k, v, BLOCK, 2, causal=causal, backend="reference")
            assert_close(actual, expected, "float64", name=f"causal={causal}")
    finally:
        dist.destroy_process_group()
