"""moba_attn_context_parallel on GPUs through NCCL, in bf16 (skipped without CUDA).

A world of one in this process runs the whole context-parallel code path (centroids all-gathered, the
routing, the selective fetch or the all-gather of K and V, the backward's collectives) on one card; two
ranks run when the machine has two GPUs. The oracle is ``moba_attn`` with the Triton kernels on the whole
sequences, the same bf16 inputs: both sides route on the same bf16 centroids, so they differ by float32
summation order before one bf16 rounding.
"""

from __future__ import annotations

import functools

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU tests need CUDA", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from flashmoba import moba_attn  # noqa: E402
from flashmoba.parallel import CommunicationLog, moba_attn_context_parallel  # noqa: E402

BLOCK, TOPK, HEADS_Q, HEADS_KV, HEAD_DIM = 128, 8, 8, 2, 128
SCHEMES = ("selective", "allgather")
# bf16 outputs and gradients rounded once on each side (|values| ~ 1 for unit inputs).
TOLERANCE = dict(atol=2e-2, rtol=2e-2)


def _whole_inputs(seqlen: int, seed: int, device: str) -> list[torch.Tensor]:
    """q, k, v and the upstream gradient of the whole sequences (batch 2), bf16."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.bfloat16)

    q, grad_out = randn(2, seqlen, HEADS_Q, HEAD_DIM), randn(2, seqlen, HEADS_Q, HEAD_DIM)
    return [q, randn(2, seqlen, HEADS_KV, HEAD_DIM), randn(2, seqlen, HEADS_KV, HEAD_DIM), grad_out]


def _output_and_gradients(function, q, k, v, grad_out) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = function(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def _context_parallel(scheme: str, causal: bool, log: CommunicationLog | None = None):
    return functools.partial(
        moba_attn_context_parallel, block_size=BLOCK, topk=TOPK, causal=causal, scheme=scheme, comm_log=log
    )


def _whole(causal: bool):
    return functools.partial(moba_attn, block_size=BLOCK, topk=TOPK, causal=causal)


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group(
        "nccl",
        init_method=f"file://{tmp_path}/store",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", 0),
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_world_of_one_equals_moba_attn(world_of_one, scheme, causal):
    inputs = _whole_inputs(8192 + 3 * BLOCK, seed=1, device="cuda")  # 67 blocks: not a power of 2
    log = CommunicationLog()
    got = _output_and_gradients(_context_parallel(scheme, causal, log), *inputs)
    expected = _output_and_gradients(_whole(causal), *inputs)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, expected):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
    assert {record.phase for record in log.records} == {"forward", "backward"}


def _two_rank_worker(rank: int, init_method: str, out_path: str, seqlen: int, scheme: str) -> None:
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=2, device_id=device)
    try:
        local = seqlen // 2
        inputs = [t[:, rank * local : (rank + 1) * local] for t in _whole_inputs(seqlen, 2, str(device))]
        got = _output_and_gradients(_context_parallel(scheme, True), *inputs)
        torch.save([t.cpu() for t in got], f"{out_path}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_two_gpus_equal_moba_attn(tmp_path, scheme):
    seqlen = 2 * 4096
    mp.spawn(
        _two_rank_worker, args=(f"file://{tmp_path}/store", str(tmp_path / "out"), seqlen, scheme), nprocs=2
    )
    expected = _output_and_gradients(_whole(True), *_whole_inputs(seqlen, 2, "cuda:0"))
    halves = [torch.load(f"{tmp_path / 'out'}.rank{rank}") for rank in range(2)]
    for index, name in enumerate(("o", "dq", "dk", "dv")):
        got = torch.cat([halves[0][index], halves[1][index]], dim=1)
        torch.testing.assert_close(
            got, expected[index].cpu(), **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}"
        )
