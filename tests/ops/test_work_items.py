"""Work items (``flashmoba.ops.work_items``): long columns split over several programs, results exact.

Routing is made skewed on purpose: a large common direction added to every query and to the keys of
blocks 0 and 3 sends nearly every row to those two blocks (besides its own), so that with a small
``rows_per_item`` their columns split into many items. Outputs and gradients must still match the float64
reference, whichever dQ path runs, and dK/dV, now summed from the items' float32 partials, must be bitwise
reproducible. The item tables themselves are checked against a direct computation on the host.
"""

from __future__ import annotations

import pytest
import torch

from flashmoba import reference
from flashmoba.ops import autograd as triton_autograd
from flashmoba.ops.config import KernelConfig
from flashmoba.ops.forward import forward_tiles
from flashmoba.ops.index import build_block_index, num_block_slots
from flashmoba.ops.utils import interpreting
from flashmoba.ops.work_items import NEVER_SPLIT, rows_per_item, work_items
from tests.helpers import assert_close, cu_seqlens

DEVICE = "cpu" if interpreting() else "cuda"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.usefixtures("poison_empty"),  # conftest.py: unwritten scratch shows as NaN
]

B = 16
HOT_BLOCKS = (0, 3)
SMALL_ITEMS = 2 * forward_tiles(32, B)["BLOCK_M"]  # two row tiles per item


def _skewed(lengths, heads_q, heads_kv, head_dim, seed=0, block_size=B):
    """q, k, v, dO, dlse with every query pulled towards the keys of the blocks in HOT_BLOCKS."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads_q, head_dim, generator=generator)
    k = torch.randn(total, heads_kv, head_dim, generator=generator)
    v = torch.randn(total, heads_kv, head_dim, generator=generator)
    direction = torch.randn(head_dim, generator=generator)
    direction *= 5 / direction.norm()  # |direction|^2 = 25: above the random part of the router's scores
    q += direction
    start = 0
    for length in lengths:
        for block in HOT_BLOCKS:
            k[start + block * block_size : min(start + (block + 1) * block_size, start + length)] += direction
        start += length
    grad_out = torch.randn(total, heads_q, head_dim, generator=generator)
    grad_lse = torch.randn(heads_q, total, generator=generator)
    return [t.to(DEVICE) for t in (q, k, v, grad_out, grad_lse)]


def _loss(out, lse, grad_out, grad_lse):
    return (out * grad_out).sum() + (lse.masked_fill(torch.isinf(lse), 0) * grad_lse).sum()


def _run(inputs, selected, cu, causal, deterministic=False, config=None, block_size=B):
    q, k, v, grad_out, grad_lse = inputs
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = triton_autograd.sparse_attention_varlen(
        *leaves, selected, cu, cu, block_size, causal, q.shape[-1] ** -0.5, deterministic, config
    )
    _loss(out, lse, grad_out, grad_lse).backward()
    return out, lse, *(leaf.grad for leaf in leaves)


def _expected(inputs, cu, topk, causal, block_size=B):
    q, k, v, grad_out, grad_lse = inputs
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference.moba_attn_varlen_reference(
        *leaves, cu, cu, block_size, topk, causal, q.shape[-1] ** -0.5
    )
    _loss(out, lse, grad_out.double(), grad_lse.double()).backward()
    return out.detach(), lse.detach(), *(leaf.grad for leaf in leaves)


def _selection(inputs, cu, topk, causal, block_size=B):
    q, k = inputs[0], inputs[1]
    return reference.moba_select_reference(q.double(), k.double(), block_size, topk, causal, cu, cu)


def _check(got, expected):
    for name, actual, wanted in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert not torch.isnan(actual).any(), f"{name} has NaN (an element was not written)"
        assert_close(actual, wanted, "kernel_float32", name=name)


def _column_rows(offsets, heads, block_slots, num_chunks, group, chunk=None):
    """Rows per (block, unit) column, [block_slots, heads // group], units fastest as in the tables."""
    counts = (offsets[1:] - offsets[:-1]).long().view(heads, block_slots, num_chunks)
    counts = counts.sum(-1) if chunk is None else counts[..., chunk]
    return counts.view(heads // group, group, block_slots).sum(1).T


def test_skewed_routing_really_splits_columns():
    # Guards the other tests: the skew must make the hot columns longer than an item, many times over.
    lengths, heads, topk = [300, 77, 150], 4, 3
    inputs = _skewed(lengths, heads, 2, 32)
    cu = cu_seqlens(lengths, DEVICE)
    selected = _selection(inputs, cu, topk, True)
    block_slots = num_block_slots(sum(lengths), len(lengths), B)
    _, offsets = build_block_index(selected, cu, cu, B, block_slots, 1, sum(lengths))
    rows = _column_rows(offsets, heads, block_slots, 1, 1)
    hot = rows[list(HOT_BLOCKS)]
    assert hot.min() > 2 * SMALL_ITEMS and hot.max() > 8 * SMALL_ITEMS
    assert hot.float().mean() > 4 * rows[rows > 0].float().mean()


@pytest.mark.parametrize("scratch_slots", [None, 1000, 7, 0], ids=["no_scratch", "ample", "short", "none"])
def test_item_tables_match_a_direct_computation(scratch_slots):
    lengths, heads_q, heads_kv, topk, num_chunks, chunk_rows = [300, 77, 150], 4, 2, 3, 2, 300
    group = heads_q // heads_kv
    inputs = _skewed(lengths, heads_q, heads_kv, 32)
    cu = cu_seqlens(lengths, DEVICE)
    selected = _selection(inputs, cu, topk, True)
    block_slots = num_block_slots(sum(lengths), len(lengths), B)
    _, offsets = build_block_index(selected, cu, cu, B, block_slots, num_chunks, chunk_rows)
    item_size = 48
    # Forward-like: query-head columns of one row chunk, 3 heads a launch (launches of 3 and 1 heads).
    # dK/dV-like: kv-head columns over both row chunks, one kv head a launch, an empty column one item.
    layouts = [
        dict(units_per_launch=3, heads_per_unit=1, row_chunks=num_chunks, segments_per_column=1, min_items=0),
        dict(
            units_per_launch=1,
            heads_per_unit=group,
            row_chunks=1,
            segments_per_column=num_chunks,
            min_items=1,
        ),
    ]
    for layout in layouts:
        units_total = heads_q // layout["heads_per_unit"]
        items = work_items(
            offsets,
            block_slots,
            num_chunks,
            units_total=units_total,
            rows_per_item=item_size,
            scratch_slots=scratch_slots,
            **layout,
        )
        launch = 0
        for unit_first in range(0, units_total, layout["units_per_launch"]):
            units_here = min(layout["units_per_launch"], units_total - unit_first)
            for chunk in range(layout["row_chunks"]):
                rows = _column_rows(
                    offsets,
                    heads_q,
                    block_slots,
                    num_chunks,
                    layout["heads_per_unit"],
                    chunk if layout["row_chunks"] > 1 else None,
                )[:, unit_first : unit_first + units_here].reshape(-1)
                wanted = (-(-rows // item_size)).clamp(min=layout["min_items"])
                if scratch_slots is not None:  # split columns take slots in order while they fit
                    needs = torch.where(wanted > 1, wanted, 0)
                    slot_ends = needs.cumsum(0)
                    wanted = torch.where(slot_ends <= scratch_slots, wanted, wanted.clamp(max=1))
                    split = wanted > 1
                    got_first = items.scratch_first[launch, : rows.numel()].long()
                    assert torch.equal(got_first[split], (slot_ends - needs)[split])
                ends = items.item_ends[launch, : rows.numel()].long()
                assert torch.equal(ends, wanted.cumsum(0))
                entries = (
                    units_here
                    * layout["heads_per_unit"]
                    * topk
                    * (chunk_rows if layout["row_chunks"] > 1 else sum(lengths))
                )
                assert ends[-1] <= items.grid(entries, rows.numel())
                if scratch_slots in (None, 1000):
                    assert ends[-1] > (rows > 0).sum()  # columns did split
                launch += 1
        assert launch == items.item_ends.shape[0]


def test_rows_per_item_rounds_to_whole_tiles():
    assert rows_per_item(KernelConfig(rows_per_item=40), 16) == 48
    assert rows_per_item(KernelConfig(rows_per_item=1024), 64) == 1024
    assert rows_per_item(KernelConfig(rows_per_item=0), 64) == NEVER_SPLIT
    with pytest.raises(ValueError):
        KernelConfig(rows_per_item=-1)


ATOMICS = dict(dq_by_stored_partials=False)  # dQ by atomics, or by the dQ pass when deterministic
ROW_CHUNKS = dict(partial_buffer_bytes=60 * 3 * (32 * 4 + 4))  # 60-row chunks of the forward's partials
# id, lengths, heads_q, heads_kv, block_size, topk, causal, deterministic, config, run twice
CASES = [
    ("mha_one_sequence", [300], 2, 2, B, 3, True, False, dict(), False),
    ("gqa_varlen", [300, 45, 77], 4, 2, B, 3, True, False, dict(), True),
    ("gqa_varlen_dq_atomics", [300, 45, 77], 4, 2, B, 3, True, False, ATOMICS, True),
    ("gqa_varlen_dq_pass", [300, 45, 77], 4, 2, B, 3, True, True, ATOMICS, True),
    ("two_key_tiles_dq_pass", [300, 100], 2, 1, 48, 3, True, True, dict(), False),
    ("noncausal_row_chunks", [130, 170], 2, 1, B, 3, False, False, ROW_CHUNKS, False),
]


@pytest.mark.parametrize(
    "lengths,heads_q,heads_kv,block_size,topk,causal,deterministic,config,twice",
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_split_columns_match_reference(
    lengths, heads_q, heads_kv, block_size, topk, causal, deterministic, config, twice
):
    inputs = _skewed(lengths, heads_q, heads_kv, 32, block_size=block_size)
    cu = cu_seqlens(lengths, DEVICE)
    selected = _selection(inputs, cu, topk, causal, block_size)
    config = KernelConfig(rows_per_item=SMALL_ITEMS, **config)
    got = _run(inputs, selected, cu, causal, deterministic, config, block_size)
    _check(got, _expected(inputs, cu, topk, causal, block_size))
    if not twice:
        return
    again = _run(inputs, selected, cu, causal, deterministic, config, block_size)
    # dK/dV always reproducible; dQ too unless it goes by atomics (non-deterministic, no stored partials).
    reproducible = ("dk", "dv") if config.dq_by_stored_partials is False and not deterministic else None
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, again):
        if reproducible is None or name in reproducible:
            assert torch.equal(a, b), f"{name} differs between two runs"


def test_unsplit_columns_give_the_same_answers():
    # rows_per_item above every column's rows (and 0, never split): one item per column, as before the
    # split; both the same bits, and against the reference.
    lengths, topk = [300, 77, 150], 3
    inputs = _skewed(lengths, 4, 2, 32, seed=2)
    cu = cu_seqlens(lengths, DEVICE)
    selected = _selection(inputs, cu, topk, True)
    whole = _run(inputs, selected, cu, True, False, KernelConfig(rows_per_item=4096))
    never = _run(inputs, selected, cu, True, False, KernelConfig(rows_per_item=0))
    _check(whole, _expected(inputs, cu, topk, True))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), whole, never):
        assert torch.equal(a, b), name
