"""moba_attn_context_parallel against single-process moba_attn on the whole sequences (gloo, CPU).

Each spawned rank runs every case with both schemes on its slice and saves its output, the gradients of
its local q, k and v, and its communication log; the parent computes moba_attn on the whole sequences and
compares, and counts independently (from moba_select on the whole sequences) what the selective fetch
must move, so a failure shows in pytest. One spawn per world size keeps the test within a few seconds.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashmoba import moba_attn, moba_select
from flashmoba.parallel import (
    CommunicationLog,
    communication_report,
    estimate_communication,
    moba_attn_context_parallel,
)
from tests.helpers import assert_close

BLOCK = 4
BATCH, HEAD_DIM = 2, 8
SCHEMES = ("allgather", "selective")
# Routing in 16-bit scores centroids rounded to the input dtype (exact ties are likely): the fetch must
# route exactly as moba_attn does. Tolerance: one rounding of the 16-bit output or gradient.
LOW_PRECISION = {torch.float32: dict(atol=3e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# (causal, heads_q, heads_kv, seqlen_local, topk, softmax_scale)
CASES = [
    (True, 4, 2, 3 * BLOCK, 2, None),  # GQA, several blocks per slice
    (False, 4, 2, 3 * BLOCK, 2, None),
    (True, 4, 2, BLOCK, 1, None),  # one block per slice: every block boundary is a slice edge; own block
    (False, 4, 2, BLOCK, 1, 0.3),
    (True, 2, 2, 3 * BLOCK, 100, None),  # topk >= number of blocks: dense causal attention
    (False, 4, 1, 3 * BLOCK, 100, None),  # MQA, dense
    (True, 4, 2, 2 * BLOCK, 3, 0.5),
    (True, 1, 1, 2 * BLOCK, 2, None),  # sparse routing: the selective fetch skips remote blocks
    (False, 1, 1, BLOCK, 2, None),
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
        results = {}
        for index, (causal, _, _, seqlen_local, topk, scale) in enumerate(CASES):
            rows = slice(rank * seqlen_local, (rank + 1) * seqlen_local)
            whole = _whole_inputs(index, world_size)
            for scheme in SCHEMES:
                q, k, v, grad_out = (t[:, rows].clone() for t in whole)
                for t in (q, k, v):
                    t.requires_grad_(True)
                log = CommunicationLog()
                out = moba_attn_context_parallel(
                    q,
                    k,
                    v,
                    BLOCK,
                    topk,
                    causal=causal,
                    softmax_scale=scale,
                    backend="reference",
                    scheme=scheme,
                    comm_log=log,
                )
                out.backward(grad_out)
                records = [dataclasses.astuple(record) for record in log.records]
                results[index, scheme] = ([out.detach(), q.grad, k.grad, v.grad], records)
        seqlen_local = CASES[0][3]
        for dtype in LOW_PRECISION:
            rows = slice(rank * seqlen_local, (rank + 1) * seqlen_local)
            for scheme in SCHEMES:
                q, k, v, grad_out = (t[:, rows].to(dtype) for t in _whole_inputs(0, world_size))
                for t in (q, k, v):
                    t.requires_grad_(True)
                out = moba_attn_context_parallel(q, k, v, BLOCK, 2, backend="reference", scheme=scheme)
                out.backward(grad_out)
                results[dtype, scheme] = [out.detach(), q.grad, k.grad, v.grad]
        q, k, v, _ = (t[:, rank * 2 * BLOCK : (rank + 1) * 2 * BLOCK] for t in _whole_inputs(0, world_size))
        results["report"] = communication_report(q, k, v, BLOCK, 2, backend="reference")
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


def _selected_remote_units(case_index: int, world_size: int) -> list[set[tuple[int, int]]]:
    """Per rank, the (sequence, block) pairs of other ranks that its queries select in the whole-sequence
    router: what the selective fetch must bring in, counted without the code under test."""
    causal, _, _, seqlen_local, topk, _ = CASES[case_index]
    q, k, _, _ = _whole_inputs(case_index, world_size)
    selected = moba_select(q, k, BLOCK, topk, causal=causal, backend="reference")  # [B, S, Hq, topk]
    blocks_local = seqlen_local // BLOCK
    units = []
    for rank in range(world_size):
        mine = selected[:, rank * seqlen_local : (rank + 1) * seqlen_local]
        pairs = {
            (row, int(block))
            for row in range(BATCH)
            for block in mine[row].flatten().tolist()
            if block >= 0 and block // blocks_local != rank
        }
        units.append(pairs)
    return units


def _received(records, what: str, phase: str = "forward") -> int:
    return sum(r[4] for r in records if r[1] == phase and r[2] == what)


def _sent(records, what: str, phase: str = "forward") -> int:
    return sum(r[3] for r in records if r[1] == phase and r[2] == what)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def spawned(request, tmp_path_factory):
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    init_method = f"file://{out_dir / 'rendezvous'}"
    mp.spawn(_worker, args=(world_size, init_method, str(out_dir)), nprocs=world_size, join=True)
    return world_size, [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_matches_moba_attn_on_the_whole_sequences(spawned, scheme):
    world_size, per_rank = spawned
    for index, case in enumerate(CASES):
        expected = _expected(index, world_size)
        for slot, name in enumerate(["out", "dq", "dk", "dv"]):
            actual = torch.cat([per_rank[rank][index, scheme][0][slot] for rank in range(world_size)], dim=1)
            label = f"{scheme}, world {world_size}, case {case}, {name}"
            assert_close(actual, expected[slot], "float64", name=label)


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
def test_low_precision_matches_moba_attn(spawned, dtype):
    world_size, per_rank = spawned
    causal, _, _, _, topk, _ = CASES[0]
    q, k, v, grad_out = (t.to(dtype) for t in _whole_inputs(0, world_size))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = moba_attn(q, k, v, BLOCK, topk, causal=causal, backend="reference")
    out.backward(grad_out)
    expected = [out.detach(), q.grad, k.grad, v.grad]
    for scheme in SCHEMES:
        for slot, name in enumerate(["out", "dq", "dk", "dv"]):
            actual = torch.cat([per_rank[rank][dtype, scheme][slot] for rank in range(world_size)], dim=1)
            label = f"{scheme}, {dtype}, {name}"
            tolerance = LOW_PRECISION[dtype]
            torch.testing.assert_close(actual.float(), expected[slot].float(), **tolerance, msg=label)


def test_allgather_moves_exactly_the_estimate(spawned):
    world_size, per_rank = spawned
    for index, (causal, heads_q, heads_kv, seqlen_local, topk, _) in enumerate(CASES):
        # K and V of one slice, float64: counted here from the shapes, not from the code under test.
        slice_bytes = 2 * BATCH * seqlen_local * heads_kv * HEAD_DIM * 8
        for rank in range(world_size):
            records = per_rank[rank][index, "allgather"][1]
            others = world_size - 1
            assert _received(records, "kv") == _sent(records, "kv") == others * slice_bytes
            assert _received(records, "kv grad", "backward") == others * slice_bytes
            estimate = estimate_communication(
                "allgather",
                batch=BATCH,
                seqlen_local=seqlen_local,
                heads_q=heads_q,
                heads_kv=heads_kv,
                head_dim=HEAD_DIM,
                block_size=BLOCK,
                topk=topk,
                world_size=world_size,
                rank=rank,
                causal=causal,
                dtype=torch.float64,
            )
            assert estimate == {"forward": others * slice_bytes, "backward": others * slice_bytes}


def test_selective_moves_the_selected_blocks_only(spawned):
    world_size, per_rank = spawned
    sparse_somewhere = False
    for index, (causal, heads_q, heads_kv, seqlen_local, topk, _) in enumerate(CASES):
        units = _selected_remote_units(index, world_size)
        blocks_local = seqlen_local // BLOCK
        block_bytes = 2 * BLOCK * heads_kv * HEAD_DIM * 8  # K and V rows of one block, float64
        for rank in range(world_size):
            records = per_rank[rank][index, "selective"][1]
            asked_of_me = sum(
                1 for other in range(world_size) for _, block in units[other] if block // blocks_local == rank
            )
            assert _received(records, "kv blocks") == len(units[rank]) * block_bytes, (index, rank)
            assert _sent(records, "kv blocks") == asked_of_me * block_bytes, (index, rank)
            assert _received(records, "kv blocks grad", "backward") == asked_of_me * block_bytes
            assert _sent(records, "kv blocks grad", "backward") == len(units[rank]) * block_bytes
            assert _received(records, "block ids") == asked_of_me * 8
            sums_bytes = (world_size - 1) * BATCH * blocks_local * heads_kv * HEAD_DIM * 8
            assert _received(records, "block sums") == sums_bytes
            assert _received(records, "counts") == (world_size - 1) * 8
            estimate = estimate_communication(
                "selective",
                batch=BATCH,
                seqlen_local=seqlen_local,
                heads_q=heads_q,
                heads_kv=heads_kv,
                head_dim=HEAD_DIM,
                block_size=BLOCK,
                topk=topk,
                world_size=world_size,
                rank=rank,
                causal=causal,
                dtype=torch.float64,
            )
            forward = sum(r[4] for r in records if r[1] == "forward")
            backward = sum(r[4] for r in records if r[1] == "backward")
            assert forward <= estimate["forward"] and backward <= estimate["backward"], (index, rank)
            remote_candidates = BATCH * (rank if causal else world_size - 1) * blocks_local
            sparse_somewhere |= len(units[rank]) < remote_candidates
    assert sparse_somewhere, "no case fetches a strict subset of the remote blocks: the test is degenerate"


def test_communication_report(spawned):
    world_size, per_rank = spawned
    for rank in range(world_size):
        report = per_rank[rank]["report"]
        assert set(report) == set(SCHEMES)
        gather = report["allgather"]
        assert gather["forward"] == gather["estimate_forward"] > 0
        assert gather["backward"] == gather["estimate_backward"] > 0
        selective = report["selective"]
        assert 0 < selective["forward"] <= selective["estimate_forward"]
        assert selective["backward"] <= selective["estimate_backward"]
    # Over the group, every byte sent is received.
    for scheme in SCHEMES:
        for phase in ("forward", "backward"):
            sent = sum(per_rank[rank]["report"][scheme][f"{phase}_sent"] for rank in range(world_size))
            assert sent == sum(per_rank[rank]["report"][scheme][phase] for rank in range(world_size))


def test_without_a_process_group_raises():
    assert not dist.is_initialized()
    q = torch.randn(1, 2 * BLOCK, 2, HEAD_DIM)
    for scheme in SCHEMES:
        with pytest.raises(RuntimeError, match="process group"):
            moba_attn_context_parallel(q, q, q, BLOCK, 2, scheme=scheme)


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
    with pytest.raises(ValueError, match="scheme must be one of"):
        moba_attn_context_parallel(q, q, q, BLOCK, 2, scheme="ring")
    with pytest.raises(TypeError, match="comm_log must be a CommunicationLog"):
        moba_attn_context_parallel(q, q, q, BLOCK, 2, comm_log=[])
    with pytest.raises(ValueError, match="seqlen_local"):
        moba_attn_context_parallel(q, q[:, :BLOCK], q[:, :BLOCK], BLOCK, 2)
    with pytest.raises(ValueError, match="heads_q must be a multiple of heads_kv"):
        moba_attn_context_parallel(
            q, q[:, :, :1].expand(-1, -1, 3, -1), q[:, :, :1].expand(-1, -1, 3, -1), 4, 2
        )
    with pytest.raises(ValueError, match="scheme must be one of"):
        estimate_communication(
            "ring",
            batch=1,
            seqlen_local=4,
            heads_q=1,
            heads_kv=1,
            head_dim=1,
            block_size=4,
            topk=1,
            world_size=2,
            rank=0,
            causal=True,
            dtype=torch.float32,
        )
    sizes = dict(batch=1, seqlen_local=8, heads_q=1, heads_kv=1, head_dim=1, block_size=4, topk=1)
    with pytest.raises(ValueError, match="rank must be <= 1"):
        estimate_communication("selective", **sizes, world_size=2, rank=2, causal=True, dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        estimate_communication("allgather", **sizes, world_size=2, rank=0, causal=True, dtype="float32")
    with pytest.raises(ValueError, match="must be a multiple of block_size"):
        estimate_communication(
            "allgather", **{**sizes, "block_size": 3}, world_size=2, rank=0, causal=True, dtype=torch.float32
        )


def test_one_rank_is_moba_attn(tmp_path):
    """A group of one: the local slice is the whole sequence (and the group check passes)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        q, k, v, _ = _whole_inputs(0, 1)
        for causal in (True, False):
            expected = moba_attn(q, k, v, BLOCK, 2, causal=causal, backend="reference")
            for scheme in SCHEMES:
                actual = moba_attn_context_parallel(
                    q, k, v, BLOCK, 2, causal=causal, backend="reference", scheme=scheme
                )
                assert_close(actual, expected, "float64", name=f"causal={causal}, {scheme}")
    finally:
        dist.destroy_process_group()
