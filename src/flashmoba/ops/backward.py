"""Sparse attention backward by recomputation from the saved log-sum-exp (FlashAttention style).

1. Preprocess: ``delta = rowsum(dO * O) - dlse`` per (head, row) (the lse term lets a gradient flow
   through the returned lse too).
2. dK/dV, key-block-major: one program per (key tile of a block, kv head, work item) walks, for every
   query head of its GQA group, its part of the rows routed to the block (full gathered tiles, fixed
   order, no atomics), and recomputes ``P = exp2(S * scale * log2(e) - lse * log2(e))``. dK and dV of the
   kv head are summed over its query heads inside the program (no expanded per-query-head buffers). A
   column of one item writes dK, dV directly; the items of a longer one write float32 partials that a
   small kernel sums in item order (``flashmoba.ops.work_items``; deterministic either way).
3. dQ, one of three ways:
   - ``"store"`` (default where it applies: a block is one key tile and one kv head's pairs fit the
     forward's scratch budget): the dK/dV program also computes each routed pair's whole ``dS K`` and
     stores it as that (row, head, slot)'s partial, like the forward's partial outputs; a sum kernel then
     adds the topk partials of each row in slot order. Launched per chunk of whole kv heads. Deterministic.
   - ``"atomic"``: the dK/dV program adds ``dS K`` into a float32 dQ accumulator with atomics.
   - ``"none"`` (``deterministic=True`` where "store" does not apply): a second key-block-major pass writes
     one partial per (row, head, slot) for one chunk at a time, summed in slot order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashmoba.ops.config import DEFAULT_CONFIG, KernelConfig
from flashmoba.ops.forward import bad_keys, forward_tiles, nonfinite_rows
from flashmoba.ops.index import block_table, num_block_slots
from flashmoba.ops.partials import chunk_pair_index, chunking, partial_dtype
from flashmoba.ops.utils import (
    LOG2_E,
    dot_in_float32,
    dot_precision,
    head_dim_tile,
    interpreting,
    maybe_contiguous,
    next_power_of_2,
    tile_dot,
)
from flashmoba.ops.work_items import (
    WorkItems,
    find_item,
    item_rows,
    program_item,
    rows_per_item,
    search_steps,
    work_items,
)

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

# The gradient NaN rule of flashmoba.reference, by a flag and zeroed tiles, without a pass of its own: the
# preprocess sets delta to NaN for gradient-poisoned rows (O, dO or dlse not finite); the programs then
# recompute such a row's probabilities against lse NaN and count it as seeing every key of the block (the
# causal limit lifted), so that its dQ and the whole dK/dV rows of the keys of its blocks come out NaN,
# however its own q or dO hold NaN (a masked product 0 * NaN then only lands where NaN goes anyway).
# Keys whose k or v holds a NaN or an inf are loaded as zeros: only poisoned rows see them, and a zero
# cannot turn a masked probability into NaN (0 * NaN) in a row that does not.


@triton.jit
def gradient_poison(lse, delta):
    """The log2 lse of a tile of routed rows, NaN for gradient-poisoned ones (delta NaN), so that their
    probabilities are NaN at every key they count as seeing."""
    # A routed row always sees a key; the guard only keeps a malformed selection from making inf.
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return tl.where(delta == delta, lse_log2, float("nan"))


@triton.jit
def _moba_bwd_preprocess_kernel(
    Out,
    GradOut,
    GradLse,
    Delta,
    total_q,
    heads_q,
    stride_o_row,
    stride_o_head,
    stride_do_row,
    stride_do_head,
    HAS_GRAD_LSE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta[h, r] = sum_d dO[r, h, d] * O[r, h, d] (minus dlse[h, r]) in float32."""
    pairs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pair_mask = pairs < total_q * heads_q
    rows = (pairs // heads_q).to(tl.int64)
    heads = pairs % heads_q
    offs_d = tl.arange(0, BLOCK_D)
    mask = pair_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    out = tl.load(
        Out + rows[:, None] * stride_o_row + heads[:, None] * stride_o_head + offs_d[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    grad_out = tl.load(
        GradOut + rows[:, None] * stride_do_row + heads[:, None] * stride_do_head + offs_d[None, :],
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    delta = tl.sum(out * grad_out, 1)
    # The gradient NaN rule (flashmoba.reference): a row whose O (poisoned in the forward), dO or dlse
    # holds a NaN or an inf gets delta NaN, the flag the dK/dV and dQ programs read.
    bad = nonfinite_rows(out) | nonfinite_rows(grad_out)
    lse_index = heads.to(tl.int64) * total_q + rows
    if HAS_GRAD_LSE:
        grad_lse = tl.load(GradLse + lse_index, mask=pair_mask, other=0.0)
        delta -= grad_lse
        bad = bad | ~(tl.abs(grad_lse) < float("inf"))
    tl.store(Delta + lse_index, tl.where(bad, float("nan"), delta), mask=pair_mask)


@triton.jit
def _moba_bwd_dkdv_kernel(
    Q,
    K,
    V,
    GradOut,
    Lse,
    Delta,
    GradK,
    GradV,
    GradQ,
    ScratchGradK,
    ScratchGradV,
    Entries,
    Offsets,
    BlockTable,
    ItemEnds,
    ScratchFirst,
    stride_q_row,
    stride_q_head,
    stride_k_row,
    stride_k_head,
    stride_v_row,
    stride_v_head,
    stride_do_row,
    stride_do_head,
    stride_dk_row,
    stride_dk_head,
    stride_dv_row,
    stride_dv_head,
    block_slots,
    tiles_per_block,
    num_chunks,
    kv_head_first,
    kv_heads_here,
    heads_q,
    topk,
    group,
    total_q,
    softmax_scale,
    qk_scale,
    search_steps,
    rows_per_item,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DQ_MODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dK, dV of one key tile of one block for one kv head over one work item (a part of the rows routed
    to the block for the kv head's query heads, taken in head order), and dQ as DQ_MODE says ("store":
    each pair's partial into GradQ laid out [query head in chunk, row, slot]; "atomic": added into GradQ
    [rows, Hq, D] float32; "none"). The only item of a column writes dK, dV; the items of a split column
    write float32 partials to their scratch slots, which ``_moba_bwd_dkdv_sum_kernel`` sums."""
    # Items of the (block, kv head) columns in the table's order, kv heads varying fastest: the early
    # blocks, which collect the most routed rows under causal routing, start first. Key tiles of an item
    # are consecutive programs.
    key_tile = tl.program_id(0) % tiles_per_block
    column, item_in_column, items, is_item = find_item(
        ItemEnds, block_slots * kv_heads_here, search_steps, tl.program_id(0) // tiles_per_block
    )
    if not is_item:  # past the launch's last item
        return
    kv_head = kv_head_first + column % kv_heads_here
    block = column // kv_heads_here
    # The item's rows [item_begin, item_end) count along the column's heads, one segment each.
    item_begin, item_end = item_rows(0, 2147483647, item_in_column, items, rows_per_item)
    key_first = tl.load(BlockTable + block)
    key_end = tl.load(BlockTable + block_slots + block)
    shift = tl.load(BlockTable + 2 * block_slots + block)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    keys = key_first + key_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    key_mask = keys < key_end
    kv_mask = key_mask[:, None] & d_mask[None, :]
    keys64 = keys.to(tl.int64)
    k_ptrs = K + keys64[:, None] * stride_k_row + kv_head * stride_k_head + offs_d[None, :]
    v_ptrs = V + keys64[:, None] * stride_v_row + kv_head * stride_v_head + offs_d[None, :]
    # Keys holding a NaN or an inf load as zeros (see above): a second, masked load of the tiles (a
    # tl.where on them instead keeps both tiles in registers across the loop, and the kernel spills).
    bad = nonfinite_rows(tl.load(k_ptrs, mask=kv_mask, other=0.0)) | nonfinite_rows(
        tl.load(v_ptrs, mask=kv_mask, other=0.0)
    )
    finite_kv_mask = kv_mask & (bad == 0)[:, None]
    key_tile_values = tl.load(k_ptrs, mask=finite_kv_mask, other=0.0)
    value_tile = tl.load(v_ptrs, mask=finite_kv_mask, other=0.0)
    grad_key = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_value = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # A key tile past the block's end has nothing to do (its block is shorter than tiles_per_block tiles).
    has_keys = key_first + key_tile * BLOCK_N < key_end
    rows_before = tl.zeros_like(item_begin)  # the column's rows in the heads before this one
    for head_in_group in range(group):
        head = kv_head * group + head_in_group
        segment = (head * block_slots + block) * num_chunks
        begin = tl.load(Offsets + segment)
        end = tl.load(Offsets + segment + num_chunks)
        head_rows = end - begin
        # This head's part of the item: its rows in [item_begin, item_end) of the column's count.
        begin, end = (
            begin + tl.minimum(tl.maximum(item_begin - rows_before, 0), head_rows),
            begin + tl.minimum(tl.maximum(item_end - rows_before, 0), head_rows),
        )
        rows_before += head_rows
        end = tl.where(has_keys, end, begin)
        for tile_start in range(begin, end, BLOCK_M):
            # Inline on purpose: the same loads through a helper shared with the dQ pass compile to another
            # register allocation, and run slower (see "Backward: inline loads" in benchmarks/NOTES.md).
            entry_mask = tile_start + offs_m < end
            entry = tl.load(Entries + tile_start + offs_m, mask=entry_mask, other=0)
            rows = entry // (heads_q * topk)
            rows64 = rows.to(tl.int64)
            row_mask = entry_mask[:, None] & d_mask[None, :]
            lse = tl.load(Lse + head * total_q + rows64, mask=entry_mask, other=float("inf"))
            delta = tl.load(Delta + head * total_q + rows64, mask=entry_mask, other=0.0)
            lse_log2 = gradient_poison(lse, delta)
            # A gradient-poisoned row (delta NaN) counts as seeing every key of the block: P is NaN there.
            limit = tl.where(delta == delta, rows + shift, 2147483647)
            query = tl.load(
                Q + rows64[:, None] * stride_q_row + head * stride_q_head + offs_d[None, :],
                mask=row_mask,
                other=0.0,
            )
            grad_out = tl.load(
                GradOut + rows64[:, None] * stride_do_row + head * stride_do_head + offs_d[None, :],
                mask=row_mask,
                other=0.0,
            )

            # Transposed scores [keys, rows]: dK and dV accumulate along the rows.
            scores_t = tile_dot(key_tile_values, tl.trans(query), DOT_PRECISION, DOT_IN_FLOAT32) * qk_scale
            probabilities_t = tl.math.exp2(scores_t - lse_log2[None, :])
            visible = key_mask[:, None] & entry_mask[None, :]
            if CAUSAL:
                visible = visible & (keys[:, None] <= limit[None, :])
            probabilities_t = tl.where(visible, probabilities_t, 0.0)
            grad_value += tile_dot(
                probabilities_t.to(grad_out.dtype), grad_out, DOT_PRECISION, DOT_IN_FLOAT32
            )
            grad_probabilities_t = tile_dot(value_tile, tl.trans(grad_out), DOT_PRECISION, DOT_IN_FLOAT32)
            grad_scores_t = probabilities_t * (grad_probabilities_t - delta[None, :])
            grad_scores_t = grad_scores_t.to(query.dtype)
            grad_key += tile_dot(grad_scores_t, query, DOT_PRECISION, DOT_IN_FLOAT32)
            if DQ_MODE != "none":
                grad_query = tile_dot(tl.trans(grad_scores_t), key_tile_values, DOT_PRECISION, DOT_IN_FLOAT32)
                grad_query *= softmax_scale
            if DQ_MODE == "store":  # the block is one key tile: this is the pair's whole dQ
                pair = chunk_pair_index(entry, rows, head - kv_head_first * group, 0, total_q, topk)
                tl.store(
                    GradQ + pair[:, None] * HEAD_DIM + offs_d[None, :],
                    grad_query.to(GradQ.dtype.element_ty),
                    mask=row_mask,
                )
            if DQ_MODE == "atomic":
                tl.atomic_add(
                    GradQ + (rows64[:, None] * heads_q + head) * HEAD_DIM + offs_d[None, :],
                    grad_query,
                    mask=row_mask,
                    sem="relaxed",
                )

    if items == 1:
        tl.store(
            GradK + keys64[:, None] * stride_dk_row + kv_head * stride_dk_head + offs_d[None, :],
            (grad_key * softmax_scale).to(GradK.dtype.element_ty),
            mask=kv_mask,
        )
        tl.store(
            GradV + keys64[:, None] * stride_dv_row + kv_head * stride_dv_head + offs_d[None, :],
            grad_value.to(GradV.dtype.element_ty),
            mask=kv_mask,
        )
    else:  # scratch laid out [slot, key tile, BLOCK_N, HEAD_DIM]
        slot = tl.load(ScratchFirst + column) + item_in_column
        scratch = (
            (slot.to(tl.int64) * tiles_per_block + key_tile) * BLOCK_N + tl.arange(0, BLOCK_N)
        ) * HEAD_DIM
        tl.store(ScratchGradK + scratch[:, None] + offs_d[None, :], grad_key, mask=d_mask[None, :])
        tl.store(ScratchGradV + scratch[:, None] + offs_d[None, :], grad_value, mask=d_mask[None, :])


@triton.jit
def _moba_bwd_dkdv_sum_kernel(
    ScratchGradK,
    ScratchGradV,
    GradK,
    GradV,
    ItemEnds,
    ScratchFirst,
    BlockTable,
    stride_dk_row,
    stride_dk_head,
    stride_dv_row,
    stride_dv_head,
    block_slots,
    tiles_per_block,
    kv_head_first,
    kv_heads_here,
    softmax_scale,
    HEAD_DIM: tl.constexpr,
    TILE_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dK, dV of BLOCK_K keys of one key tile (TILE_N keys, the dK/dV kernel's BLOCK_N) of one split
    (block, kv head) column: the sum of its items' float32 partials, in item order. Programs of columns
    of one item, whose program wrote dK, dV itself, exit at once."""
    parts = TILE_N // BLOCK_K
    part = tl.program_id(0) % parts
    key_tile = (tl.program_id(0) // parts) % tiles_per_block
    column = tl.program_id(0) // (parts * tiles_per_block)
    item_first = tl.load(ItemEnds + column - 1, mask=column > 0, other=0)
    items = tl.load(ItemEnds + column) - item_first
    if items <= 1:
        return
    slot_first = tl.load(ScratchFirst + column)
    block = column // kv_heads_here
    kv_head = kv_head_first + column % kv_heads_here
    key_first = tl.load(BlockTable + block)
    key_end = tl.load(BlockTable + block_slots + block)
    rows_in_tile = part * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    keys64 = (key_first + key_tile * TILE_N + rows_in_tile).to(tl.int64)
    scratch_mask = (rows_in_tile < TILE_N)[:, None] & d_mask[None, :]
    grad_key = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    grad_value = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    scratch = ((slot_first.to(tl.int64) * tiles_per_block + key_tile) * TILE_N + rows_in_tile) * HEAD_DIM
    for _ in range(items):  # the column's slots are consecutive, in item order
        grad_key += tl.load(ScratchGradK + scratch[:, None] + offs_d[None, :], mask=scratch_mask, other=0.0)
        grad_value += tl.load(ScratchGradV + scratch[:, None] + offs_d[None, :], mask=scratch_mask, other=0.0)
        scratch += tiles_per_block * TILE_N * HEAD_DIM
    kv_mask = (keys64 < key_end)[:, None] & d_mask[None, :]
    tl.store(
        GradK + keys64[:, None] * stride_dk_row + kv_head * stride_dk_head + offs_d[None, :],
        (grad_key * softmax_scale).to(GradK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        GradV + keys64[:, None] * stride_dv_row + kv_head * stride_dv_head + offs_d[None, :],
        grad_value.to(GradV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _moba_bwd_dq_partial_kernel(
    Q,
    K,
    V,
    GradOut,
    Lse,
    Delta,
    PartialGradQ,
    Entries,
    Offsets,
    BlockTable,
    BadKeys,  # [Hkv, total_k] int8 (forward.bad_keys)
    total_k,
    ItemEnds,
    stride_q_row,
    stride_q_head,
    stride_k_row,
    stride_k_head,
    stride_v_row,
    stride_v_head,
    stride_do_row,
    stride_do_head,
    block_slots,
    num_chunks,
    chunk,
    head_first,
    heads_here,
    first_row,
    rows_here,
    heads_q,
    topk,
    group,
    total_q,
    softmax_scale,
    qk_scale,
    search_steps,
    rows_per_item,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Deterministic dQ: the partial dQ of each (row, slot) of one work item (a part of the rows routed
    to one (key block, query head))."""
    head_in_chunk, head, begin, end, key_first, key_end, shift = program_item(
        Offsets,
        BlockTable,
        ItemEnds,
        search_steps,
        rows_per_item,
        block_slots,
        num_chunks,
        chunk,
        head_first,
        heads_here,
    )
    if begin == end:  # past the chunk's last item
        return
    kv_head = head // group

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k_base = K + kv_head.to(tl.int64) * stride_k_head
    v_base = V + kv_head.to(tl.int64) * stride_v_head

    for tile_start in range(begin, end, BLOCK_M):
        entry_mask = tile_start + offs_m < end
        entry = tl.load(Entries + tile_start + offs_m, mask=entry_mask, other=0)
        rows = entry // (heads_q * topk)
        rows64 = rows.to(tl.int64)
        row_mask = entry_mask[:, None] & d_mask[None, :]
        lse = tl.load(Lse + head * total_q + rows64, mask=entry_mask, other=float("inf"))
        delta = tl.load(Delta + head * total_q + rows64, mask=entry_mask, other=0.0)
        lse_log2 = gradient_poison(lse, delta)
        query = tl.load(
            Q + rows64[:, None] * stride_q_row + head * stride_q_head + offs_d[None, :],
            mask=row_mask,
            other=0.0,
        )
        grad_out = tl.load(
            GradOut + rows64[:, None] * stride_do_row + head * stride_do_head + offs_d[None, :],
            mask=row_mask,
            other=0.0,
        )

        grad_query = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for key_start in range(key_first, key_end, BLOCK_N):
            keys = key_start + offs_n
            key_mask = keys < key_end
            kv_mask = key_mask[:, None] & d_mask[None, :]
            # Keys holding a NaN or an inf load as zeros (see above), by the flags of a pass over K and V.
            bad = tl.load(BadKeys + kv_head.to(tl.int64) * total_k + keys, mask=key_mask, other=0) != 0
            finite_kv_mask = kv_mask & (bad == 0)[:, None]
            key_tile = tl.load(
                k_base + keys.to(tl.int64)[:, None] * stride_k_row + offs_d[None, :],
                mask=finite_kv_mask,
                other=0.0,
            )
            value_tile = tl.load(
                v_base + keys.to(tl.int64)[:, None] * stride_v_row + offs_d[None, :],
                mask=finite_kv_mask,
                other=0.0,
            )
            scores = tile_dot(query, tl.trans(key_tile), DOT_PRECISION, DOT_IN_FLOAT32) * qk_scale
            probabilities = tl.math.exp2(scores - lse_log2[:, None])
            visible = key_mask[None, :] & entry_mask[:, None]
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + shift)
            probabilities = tl.where(visible, probabilities, 0.0)
            grad_probabilities = tile_dot(grad_out, tl.trans(value_tile), DOT_PRECISION, DOT_IN_FLOAT32)
            grad_scores = (probabilities * (grad_probabilities - delta[:, None])).to(query.dtype)
            grad_query += tile_dot(grad_scores, key_tile, DOT_PRECISION, DOT_IN_FLOAT32)

        pair = chunk_pair_index(entry, rows, head_in_chunk, first_row, rows_here, topk)
        tl.store(
            PartialGradQ + pair[:, None] * HEAD_DIM + offs_d[None, :],
            grad_query * softmax_scale,
            mask=row_mask,
        )


@triton.jit
def _moba_bwd_zero_unrouted_kernel(
    PartialGradQ,
    Entries,
    Offsets,
    num_segments,
    total_pairs,
    head_first,
    heads_here,
    rows_here,
    heads_q,
    topk,
    HEAD_DIM: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Zero the chunk's dQ partials of the pairs no dK/dV program writes: unused slots, sorted last.

    A fixed grid strides over the index's tail from its first unrouted entry (read on the device), so
    the work follows the number of unused slots, not of pairs.
    """
    first_unrouted = tl.load(Offsets + num_segments)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    stride = tl.num_programs(0) * BLOCK_E
    for start in range(first_unrouted + tl.program_id(0) * BLOCK_E, total_pairs, stride):
        positions = start + offs_e
        unrouted = positions < total_pairs
        entry = tl.load(Entries + positions, mask=unrouted, other=0)
        rows = entry // (heads_q * topk)
        heads = (entry // topk) % heads_q
        unrouted &= (heads >= head_first) & (heads < head_first + heads_here)
        pair = chunk_pair_index(entry, rows, heads - head_first, 0, rows_here, topk)
        tl.store(
            PartialGradQ + pair[:, None] * HEAD_DIM + offs_d[None, :],
            tl.zeros([BLOCK_E, BLOCK_D], dtype=PartialGradQ.dtype.element_ty),
            mask=unrouted[:, None] & (offs_d[None, :] < HEAD_DIM),
        )


@triton.jit
def _moba_bwd_dq_sum_kernel(
    PartialGradQ,
    GradQ,
    head_first,
    rows_here,
    chunk_pairs,
    topk,
    stride_dq_row,
    stride_dq_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dQ of BLOCK_R (head, row) pairs of a chunk: the sum of their topk partials, in slot order."""
    pairs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pair_mask = pairs < chunk_pairs
    offs_d = tl.arange(0, BLOCK_D)
    mask = pair_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    partial_ptrs = PartialGradQ + pairs.to(tl.int64)[:, None] * topk * HEAD_DIM + offs_d[None, :]
    accumulator = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for slot in range(topk):
        accumulator += tl.load(partial_ptrs + slot * HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    rows = (pairs % rows_here).to(tl.int64)
    heads = head_first + pairs // rows_here
    tl.store(
        GradQ + rows[:, None] * stride_dq_row + heads[:, None] * stride_dq_head + offs_d[None, :],
        accumulator.to(GradQ.dtype.element_ty),
        mask=mask,
    )


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------


def backward_tiles(head_dim: int, block_size: int, config: KernelConfig = DEFAULT_CONFIG) -> dict:
    """Key rows x gathered query rows per dK/dV tile, warps and stages: sm_90 defaults (small tiles in the
    interpreter), then what the config sets. The defaults are measured ("Backward: dK/dV tiles" in
    benchmarks/NOTES.md)."""
    block_n_cap = 32 if interpreting() else (128 if head_dim <= 128 else 32)
    block_n = min(block_n_cap, max(16, next_power_of_2(block_size)))
    if interpreting():
        tiles = dict(BLOCK_M=16, BLOCK_N=block_n, num_warps=4, num_stages=1)
    elif head_dim > 128:
        tiles = dict(BLOCK_M=64, BLOCK_N=block_n, num_warps=8, num_stages=2)
    elif block_n >= 128:
        tiles = dict(BLOCK_M=64, BLOCK_N=block_n, num_warps=8, num_stages=3)
    elif block_n == 64:
        tiles = dict(BLOCK_M=64, BLOCK_N=block_n, num_warps=4, num_stages=3)
    else:
        tiles = dict(BLOCK_M=32, BLOCK_N=block_n, num_warps=4, num_stages=3)
    return dict(tiles, **config.launch_settings("backward"))


def dq_pass_tiles(head_dim: int, block_size: int, config: KernelConfig = DEFAULT_CONFIG) -> dict:
    """Tiles of the deterministic dQ pass: the forward's, in one stage. Its inner loop walks K/V tiles,
    whose pipelining would need about three times their shared memory (see "Backward: one stage for the
    dQ pass" in benchmarks/NOTES.md)."""
    return dict(forward_tiles(head_dim, block_size, config), num_stages=1)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


class DkdvWork(NamedTuple):
    """The dK/dV launches' work items and the float32 scratch of their split columns' partials, laid out
    [slot, key tile, BLOCK_N, head_dim] (``_Backward.dkdv_work``)."""

    items: WorkItems
    scratch_grad_k: torch.Tensor
    scratch_grad_v: torch.Tensor


class _Backward:
    """The tensors and shapes every backward launch reads, and the launches themselves."""

    def __init__(
        self,
        grad_out,
        q,
        k,
        v,
        lse,
        entries,
        offsets,
        table,
        num_chunks,
        block_size,
        causal,
        softmax_scale,
        config,
    ):
        self.grad_out, self.q, self.k, self.v, self.lse = grad_out, q, k, v, lse
        self.entries, self.offsets, self.table = entries, offsets, table
        self.num_chunks = num_chunks  # row chunks of the forward's index: segments per column
        self.block_size, self.causal, self.softmax_scale, self.config = (
            block_size,
            causal,
            softmax_scale,
            config,
        )
        self.total_q, self.heads_q, self.head_dim = q.shape
        self.total_k, self.heads_kv, _ = k.shape
        self.group = self.heads_q // self.heads_kv
        self.topk = entries.numel() // max(1, self.total_q * self.heads_q)
        self.block_slots = table.shape[1]
        self.block_d = head_dim_tile(self.head_dim)
        self.block_r = 16 if interpreting() else 64
        self.tiles = backward_tiles(self.head_dim, block_size, config)
        self.tiles_per_block = triton.cdiv(block_size, self.tiles["BLOCK_N"])
        self.grad_q = torch.empty(self.total_q, self.heads_q, self.head_dim, dtype=q.dtype, device=q.device)
        self.grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        self.grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        self.delta = torch.empty(self.heads_q, self.total_q, dtype=torch.float32, device=q.device)

    def preprocess(self, out: torch.Tensor, grad_lse: torch.Tensor | None) -> None:
        """delta = rowsum(dO * O) - dlse."""
        if grad_lse is not None:
            grad_lse = grad_lse.float().contiguous()
        grad_out = self.grad_out
        _moba_bwd_preprocess_kernel[(triton.cdiv(self.total_q * self.heads_q, self.block_r),)](
            Out=out,
            GradOut=grad_out,
            GradLse=grad_lse,
            Delta=self.delta,
            total_q=self.total_q,
            heads_q=self.heads_q,
            stride_o_row=out.stride(0),
            stride_o_head=out.stride(1),
            stride_do_row=grad_out.stride(0),
            stride_do_head=grad_out.stride(1),
            HAS_GRAD_LSE=grad_lse is not None,
            HEAD_DIM=self.head_dim,
            BLOCK_R=self.block_r,
            BLOCK_D=self.block_d,
        )

    def dkdv_work(self, kv_heads_per_launch: int) -> DkdvWork:
        """The work items of the dK/dV launches over ``kv_heads_per_launch`` kv heads at a time, and the
        float32 scratch of their split columns' partial dK, dV: one slot (a block's keys) per column of a
        launch, so the size of one launch's dK and dV in float32, reused by the launches in turn."""
        columns = self.block_slots * kv_heads_per_launch
        item_size = rows_per_item(self.config, self.tiles["BLOCK_M"])
        scratch_slots = 0 if self.config.rows_per_item == 0 else columns
        items = work_items(
            self.offsets,
            self.block_slots,
            self.num_chunks,
            units_total=self.heads_kv,
            units_per_launch=kv_heads_per_launch,
            heads_per_unit=self.group,
            row_chunks=1,
            segments_per_column=self.num_chunks,  # all the row chunks' segments: every row of the column
            rows_per_item=item_size,
            min_items=1,  # an empty column's program still writes its zero dK, dV
            scratch_slots=scratch_slots,
        )
        slot_rows = self.tiles_per_block * self.tiles["BLOCK_N"]
        scratch = torch.empty(
            2, scratch_slots * slot_rows, self.head_dim, dtype=torch.float32, device=self.q.device
        )
        return DkdvWork(items, scratch[0], scratch[1])

    def dkdv(
        self,
        grad_q_target,
        dq_mode: str,
        kv_head_first: int,
        kv_heads_here: int,
        work: DkdvWork,
        launch: int,
    ) -> None:
        """dK, dV of kv heads [kv_head_first, + kv_heads_here), the dK/dV launch ``launch`` of ``work``, and
        dQ into grad_q_target as dq_mode says; then the sum of the split columns' partials."""
        q, k, v, grad_out, grad_k, grad_v = self.q, self.k, self.v, self.grad_out, self.grad_k, self.grad_v
        columns = self.block_slots * kv_heads_here
        entries = kv_heads_here * self.group * self.total_q * self.topk
        item_ends, scratch_first = work.items.item_ends[launch], work.items.scratch_first[launch]
        _moba_bwd_dkdv_kernel[(work.items.grid(entries, columns) * self.tiles_per_block,)](
            Q=q,
            K=k,
            V=v,
            GradOut=grad_out,
            Lse=self.lse,
            Delta=self.delta,
            GradK=grad_k,
            GradV=grad_v,
            GradQ=grad_q_target,
            ScratchGradK=work.scratch_grad_k,
            ScratchGradV=work.scratch_grad_v,
            Entries=self.entries,
            Offsets=self.offsets,
            BlockTable=self.table,
            ItemEnds=item_ends,
            ScratchFirst=scratch_first,
            stride_q_row=q.stride(0),
            stride_q_head=q.stride(1),
            stride_k_row=k.stride(0),
            stride_k_head=k.stride(1),
            stride_v_row=v.stride(0),
            stride_v_head=v.stride(1),
            stride_do_row=grad_out.stride(0),
            stride_do_head=grad_out.stride(1),
            stride_dk_row=grad_k.stride(0),
            stride_dk_head=grad_k.stride(1),
            stride_dv_row=grad_v.stride(0),
            stride_dv_head=grad_v.stride(1),
            block_slots=self.block_slots,
            tiles_per_block=self.tiles_per_block,
            num_chunks=self.num_chunks,
            kv_head_first=kv_head_first,
            kv_heads_here=kv_heads_here,
            heads_q=self.heads_q,
            topk=self.topk,
            group=self.group,
            total_q=self.total_q,
            softmax_scale=self.softmax_scale,
            qk_scale=self.softmax_scale * LOG2_E,
            search_steps=search_steps(columns),
            rows_per_item=work.items.rows_per_item,
            HEAD_DIM=self.head_dim,
            CAUSAL=self.causal,
            DQ_MODE=dq_mode,
            DOT_PRECISION=dot_precision(q.dtype),
            DOT_IN_FLOAT32=dot_in_float32(q.dtype),
            BLOCK_D=self.block_d,
            **self.tiles,
        )
        if work.scratch_grad_k.numel() == 0:  # rows_per_item=0: no column splits
            return
        tile_n = self.tiles["BLOCK_N"]
        sum_keys = min(32, tile_n)  # keys per program of the sum: [32, BLOCK_D] float32 tiles, no spills
        _moba_bwd_dkdv_sum_kernel[(columns * self.tiles_per_block * (tile_n // sum_keys),)](
            ScratchGradK=work.scratch_grad_k,
            ScratchGradV=work.scratch_grad_v,
            GradK=grad_k,
            GradV=grad_v,
            ItemEnds=item_ends,
            ScratchFirst=scratch_first,
            BlockTable=self.table,
            stride_dk_row=grad_k.stride(0),
            stride_dk_head=grad_k.stride(1),
            stride_dv_row=grad_v.stride(0),
            stride_dv_head=grad_v.stride(1),
            block_slots=self.block_slots,
            tiles_per_block=self.tiles_per_block,
            kv_head_first=kv_head_first,
            kv_heads_here=kv_heads_here,
            softmax_scale=self.softmax_scale,
            HEAD_DIM=self.head_dim,
            TILE_N=tile_n,
            BLOCK_K=sum_keys,
            BLOCK_D=self.block_d,
            num_warps=4,
        )

    def zero_unrouted(self, partial, head_first: int, heads_here: int) -> None:
        """Clear the dQ partials of unused slots (-1) of the query heads [head_first, + heads_here)."""
        # Small in the interpreter, so that tests stride over the tail more than once.
        block_e, zero_programs = (16, 2) if interpreting() else (256, 1024)
        _moba_bwd_zero_unrouted_kernel[(min(triton.cdiv(self.entries.numel(), block_e), zero_programs),)](
            PartialGradQ=partial,
            Entries=self.entries,
            Offsets=self.offsets,
            num_segments=self.offsets.numel() - 1,
            total_pairs=self.entries.numel(),
            head_first=head_first,
            heads_here=heads_here,
            rows_here=self.total_q,
            heads_q=self.heads_q,
            topk=self.topk,
            HEAD_DIM=self.head_dim,
            BLOCK_E=block_e,
            BLOCK_D=self.block_d,
        )

    def dq_partial_pass(
        self, partial, flags, split, items, launch, row_chunk, head_first, heads_here, first_row, rows_here
    ) -> None:
        """The deterministic dQ pass: one partial per (row, head, slot) of one chunk, the launch ``launch``
        of the work items ``items`` (``dq_pass_items``); ``flags`` from ``bad_keys``."""
        q, k, v, grad_out = self.q, self.k, self.v, self.grad_out
        columns = self.block_slots * heads_here
        _moba_bwd_dq_partial_kernel[(items.grid(heads_here * rows_here * self.topk, columns),)](
            Q=q,
            K=k,
            V=v,
            GradOut=grad_out,
            Lse=self.lse,
            Delta=self.delta,
            PartialGradQ=partial,
            Entries=self.entries,
            Offsets=self.offsets,
            BlockTable=self.table,
            BadKeys=flags,
            total_k=self.total_k,
            ItemEnds=items.item_ends[launch],
            stride_q_row=q.stride(0),
            stride_q_head=q.stride(1),
            stride_k_row=k.stride(0),
            stride_k_head=k.stride(1),
            stride_v_row=v.stride(0),
            stride_v_head=v.stride(1),
            stride_do_row=grad_out.stride(0),
            stride_do_head=grad_out.stride(1),
            block_slots=self.block_slots,
            num_chunks=split.row_chunks,
            chunk=row_chunk,
            head_first=head_first,
            heads_here=heads_here,
            first_row=first_row,
            rows_here=rows_here,
            heads_q=self.heads_q,
            topk=self.topk,
            group=self.group,
            total_q=self.total_q,
            softmax_scale=self.softmax_scale,
            qk_scale=self.softmax_scale * LOG2_E,
            search_steps=search_steps(columns),
            rows_per_item=items.rows_per_item,
            HEAD_DIM=self.head_dim,
            CAUSAL=self.causal,
            DOT_PRECISION=dot_precision(q.dtype),
            DOT_IN_FLOAT32=dot_in_float32(q.dtype),
            BLOCK_D=self.block_d,
            **dq_pass_tiles(self.head_dim, self.block_size, self.config),
        )

    def dq_pass_items(self, split) -> WorkItems:
        """The work items of the dQ pass's launches: (key block, query head) columns per chunk, as the
        forward's."""
        return work_items(
            self.offsets,
            self.block_slots,
            split.row_chunks,
            units_total=self.heads_q,
            units_per_launch=split.heads_per_chunk,
            heads_per_unit=1,
            row_chunks=split.row_chunks,
            segments_per_column=1,
            rows_per_item=rows_per_item(
                self.config, dq_pass_tiles(self.head_dim, self.block_size, self.config)["BLOCK_M"]
            ),
            min_items=0,
        )

    def sum_partials(self, partial, head_first: int, heads_here: int, first_row: int, rows_here: int) -> None:
        """dQ of a chunk's (head, row) pairs: the sum of their topk partials, in slot order."""
        chunk_pairs = heads_here * rows_here
        grad_q = self.grad_q
        _moba_bwd_dq_sum_kernel[(triton.cdiv(chunk_pairs, self.block_r),)](
            PartialGradQ=partial,
            GradQ=grad_q[first_row:],
            head_first=head_first,
            rows_here=rows_here,
            chunk_pairs=chunk_pairs,
            topk=self.topk,
            stride_dq_row=grad_q.stride(0),
            stride_dq_head=grad_q.stride(1),
            HEAD_DIM=self.head_dim,
            BLOCK_R=self.block_r,
            BLOCK_D=self.block_d,
        )


def _dq_by_stored_partials(launch: _Backward, store_split) -> None:
    """ "store": per chunk of whole kv heads, the dK/dV programs store each pair's dQ; then a sum."""
    total_q, topk, group = launch.total_q, launch.topk, launch.group
    partial = torch.empty(
        store_split.scratch_pairs(topk),
        launch.head_dim,
        dtype=partial_dtype(launch.q.dtype, launch.config),
        device=launch.q.device,
    )
    work = launch.dkdv_work(store_split.heads_per_chunk // group)
    for chunk, (head_first, heads_here, _, _, _) in enumerate(store_split.chunks(total_q, launch.heads_q)):
        used = partial[: heads_here * total_q * topk]
        # Unused slots (-1) add zero: clear just their partials (the index lists them last).
        launch.zero_unrouted(used, head_first, heads_here)
        launch.dkdv(used, "store", head_first // group, heads_here // group, work, chunk)
        launch.sum_partials(used, head_first, heads_here, 0, total_q)


def _dq_by_atomics(launch: _Backward) -> None:
    """ "atomic": float32 atomics, straight into dQ for float32 inputs, else into a buffer copied once."""
    work = launch.dkdv_work(launch.heads_kv)
    if launch.q.dtype == torch.float32:
        launch.dkdv(launch.grad_q.zero_(), "atomic", 0, launch.heads_kv, work, 0)
        return
    grad_q_accum = torch.zeros(launch.grad_q.shape, dtype=torch.float32, device=launch.q.device)
    launch.dkdv(grad_q_accum, "atomic", 0, launch.heads_kv, work, 0)
    launch.grad_q.copy_(grad_q_accum)


def _dq_by_second_pass(launch: _Backward, split) -> None:
    """ "none" in the dK/dV programs, then per chunk a dQ pass of per-(row, head, slot) partials, summed
    in slot order (deterministic)."""
    launch.dkdv(None, "none", 0, launch.heads_kv, launch.dkdv_work(launch.heads_kv), 0)
    items = launch.dq_pass_items(split)
    partial = torch.empty(
        split.scratch_pairs(launch.topk), launch.head_dim, dtype=torch.float32, device=launch.q.device
    )
    flags = bad_keys(launch.k, launch.v)
    for chunk, (head_first, heads_here, row_chunk, first_row, rows_here) in enumerate(
        split.chunks(launch.total_q, launch.heads_q)
    ):
        used = partial[: heads_here * rows_here * launch.topk]
        used.zero_()  # slots that no program writes add zero
        launch.dq_partial_pass(
            used, flags, split, items, chunk, row_chunk, head_first, heads_here, first_row, rows_here
        )
        launch.sum_partials(used, head_first, heads_here, first_row, rows_here)


def sparse_attention_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    entries: torch.Tensor,
    offsets: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int,
    causal: bool,
    softmax_scale: float,
    deterministic: bool,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq ``[total_q, Hq, D]``, dk, dv ``[total_k, Hkv, D]`` from dO ``[total_q, Hq, D]`` (and dlse
    ``[Hq, total_q]``)."""
    config = DEFAULT_CONFIG if config is None else config
    grad_out, q, k, v, out = (maybe_contiguous(t) for t in (grad_out, q, k, v, out))
    total_q, heads_q, head_dim = q.shape
    total_k, heads_kv, _ = k.shape
    topk = entries.numel() // max(1, total_q * heads_q)
    batch = cu_seqlens_q.numel() - 1
    block_slots = num_block_slots(total_k, batch, block_size)
    if total_q == 0 or block_slots == 0:
        zeros = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (k, v)]
        return torch.zeros_like(q), *zeros

    # The forward's chunking: the index holds its row chunks' segments.
    split = chunking(total_q, heads_q, topk, head_dim, q.dtype, config=config)
    table = block_table(cu_seqlens_q, cu_seqlens_k, block_size, block_slots)
    launch = _Backward(
        grad_out,
        q,
        k,
        v,
        lse,
        entries,
        offsets,
        table,
        split.row_chunks,
        block_size,
        causal,
        softmax_scale,
        config,
    )
    launch.preprocess(out, grad_lse)
    # "store": chunks of whole kv heads (their query heads together) whose dQ partials fit the scratch.
    store_split = chunking(total_q, heads_q, topk, head_dim, q.dtype, group=launch.group, config=config)
    if config.dq_by_stored_partials and launch.tiles_per_block == 1 and store_split.row_chunks == 1:
        _dq_by_stored_partials(launch, store_split)
    elif not deterministic:
        _dq_by_atomics(launch)
    else:
        _dq_by_second_pass(launch, split)
    return launch.grad_q, launch.grad_k, launch.grad_v
