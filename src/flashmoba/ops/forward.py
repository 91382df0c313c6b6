"""Sparse attention forward: key-block-major partial softmax, then a per-row merge over the slots.

One program per work item, a part of the query rows routed to one (key block, query head) (from
``flashmoba.ops.index``, cut by ``flashmoba.ops.work_items`` so that hot blocks spread over programs),
gathers them in tiles of ``BLOCK_M`` rows and runs a FlashAttention inner loop over the block's keys in
tiles of ``BLOCK_N``: ``tl.dot`` on full tiles, float32 accumulation, exp2 with log2(e) folded into the
scale, the causal rule ``key <= row + shift`` applied inside the block. Each (row, slot) pair thus gets a
partial output normalised by its own sum and a partial log2-sum-exp. A merge kernel then combines the
``topk`` partials of each row in slot order (deterministic, no atomics).
The partials are kept for a chunk of heads (or rows) at a time: ``flashmoba.ops.partials``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flashmoba.ops.config import DEFAULT_CONFIG, KernelConfig
from flashmoba.ops.index import block_table, build_block_index, num_block_slots
from flashmoba.ops.partials import (
    chunk_pair_index,
    chunking,
    partial_dtype,
    store_partial,
)
from flashmoba.ops.utils import (
    LOG2_E,
    MAX_HEAD_DIM,
    dot_in_float32,
    dot_precision,
    head_dim_tile,
    interpreting,
    maybe_contiguous,
    next_power_of_2,
    tile_dot,
)
from flashmoba.ops.work_items import program_item, rows_per_item, search_steps, work_items

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def nonfinite_rows(tile):
    """True for each row of a [R, C] tile that holds a NaN or an inf."""
    return tl.max(tl.where(tl.abs(tile.to(tl.float32)) < float("inf"), 0, 1), 1) > 0


@triton.jit
def value_poison(bad):
    """The NaN rule of flashmoba.reference for value vectors: [keys] -> NaN where the key's v holds a NaN
    or an inf, 0 elsewhere. Added to the key rows (once per program) or to the logits (one FMA with the
    scale's multiply), it poisons every row that sees such a key, and only those: the NaN is masked away
    where the key is not visible. The key's value row itself loads as zeros, so that no masked
    probability times a NaN reaches a row that does not see it."""
    return tl.where(bad, float("nan"), 0.0)


@triton.jit
def nan_if_infinite(scores):
    """Logits with +-inf made NaN: a visible logit that is not finite poisons its row (flashmoba.reference's
    NaN rule; -inf alone would drop out of the softmax). One FMA, x * 0 + x: x for finite x, NaN for
    +-inf and NaN (no fast-math flag lets the compiler fold it)."""
    return tl.fma(scores, 0.0, scores)


@triton.jit
def _moba_bad_keys_kernel(
    K,
    V,
    BadKeys,
    total_k,
    heads_kv,
    stride_k_row,
    stride_k_head,
    stride_v_row,
    stride_v_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """BadKeys[kv head, key] = 1 where the key's k or v holds a NaN or an inf, else 0 (int8)."""
    pairs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pair_mask = pairs < total_k * heads_kv
    keys = (pairs // heads_kv).to(tl.int64)
    heads = pairs % heads_kv
    offs_d = tl.arange(0, BLOCK_D)
    mask = pair_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k_ptrs = K + keys[:, None] * stride_k_row + heads[:, None] * stride_k_head + offs_d[None, :]
    v_ptrs = V + keys[:, None] * stride_v_row + heads[:, None] * stride_v_head + offs_d[None, :]
    bad = nonfinite_rows(tl.load(k_ptrs, mask=mask, other=0.0)) | nonfinite_rows(
        tl.load(v_ptrs, mask=mask, other=0.0)
    )
    tl.store(BadKeys + heads.to(tl.int64) * total_k + keys, bad.to(tl.int8), mask=pair_mask)


@triton.jit
def _moba_fwd_partial_kernel(
    Q,
    K,
    V,
    PartialOut,
    PartialLse,
    Entries,
    Offsets,
    BlockTable,
    BadKeys,  # [Hkv, total_k] int8 from _moba_bad_keys_kernel; read only where blocks span key tiles
    total_k,
    ItemEnds,
    stride_q_row,
    stride_q_head,
    stride_k_row,
    stride_k_head,
    stride_v_row,
    stride_v_head,
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
    qk_scale,
    search_steps,
    rows_per_item,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    SINGLE_KEY_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial attention of one work item (a part of the rows routed to one (key block, query head)) for
    one chunk."""
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

    if SINGLE_KEY_TILE:
        # The whole block fits one key tile: load K and V once and stream the routed rows past them
        # (the row loop is then the innermost loop, which Triton software-pipelines).
        keys = key_first + offs_n
        key_mask = keys < key_end
        kv_mask = key_mask[:, None] & d_mask[None, :]
        key_tile = tl.load(
            k_base + keys.to(tl.int64)[:, None] * stride_k_row + offs_d[None, :], mask=kv_mask, other=0.0
        )
        v_ptrs = v_base + keys.to(tl.int64)[:, None] * stride_v_row + offs_d[None, :]
        bad = nonfinite_rows(tl.load(v_ptrs, mask=kv_mask, other=0.0))
        value_tile = tl.load(v_ptrs, mask=kv_mask & (bad == 0)[:, None], other=0.0)
        # value_poison folded into the key tile once (NaN key rows give the same NaN logits) rather than
        # added to every row tile's logits: a [keys] vector held across the row loop costs registers.
        key_tile = (key_tile.to(tl.float32) + value_poison(bad)[:, None]).to(key_tile.dtype)
        for tile_start in range(begin, end, BLOCK_M):
            entry_mask = tile_start + offs_m < end
            entry = tl.load(Entries + tile_start + offs_m, mask=entry_mask, other=0)
            rows = entry // (heads_q * topk)
            q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_q_row + head * stride_q_head + offs_d[None, :]
            query = tl.load(q_ptrs, mask=entry_mask[:, None] & d_mask[None, :], other=0.0)
            scores = tile_dot(query, tl.trans(key_tile), DOT_PRECISION, DOT_IN_FLOAT32) * qk_scale
            visible = key_mask[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + shift)
            scores = tl.where(visible, nan_if_infinite(scores), float("-inf"))
            row_max = tl.max(scores, 1)
            safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            probabilities = tl.math.exp2(scores - safe_max[:, None])
            row_sum = tl.sum(probabilities, 1)
            accumulator = tile_dot(
                probabilities.to(value_tile.dtype), value_tile, DOT_PRECISION, DOT_IN_FLOAT32
            )
            pair = chunk_pair_index(entry, rows, head_in_chunk, first_row, rows_here, topk)
            store_partial(
                PartialOut,
                PartialLse,
                pair,
                entry_mask,
                safe_max,
                row_sum,
                accumulator,
                offs_d,
                d_mask,
                HEAD_DIM,
            )
    else:
        for tile_start in range(begin, end, BLOCK_M):
            entry_mask = tile_start + offs_m < end
            entry = tl.load(Entries + tile_start + offs_m, mask=entry_mask, other=0)
            rows = entry // (heads_q * topk)
            q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_q_row + head * stride_q_head + offs_d[None, :]
            query = tl.load(q_ptrs, mask=entry_mask[:, None] & d_mask[None, :], other=0.0)

            running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
            accumulator = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for key_start in range(key_first, key_end, BLOCK_N):
                keys = key_start + offs_n
                key_mask = keys < key_end
                kv_mask = key_mask[:, None] & d_mask[None, :]
                # value_poison from the flags of a pass over K and V (computing them here, per key tile
                # and row tile, cost this loop a third of its time on an H200).
                bad = tl.load(BadKeys + kv_head.to(tl.int64) * total_k + keys, mask=key_mask, other=0) != 0
                key_tile = tl.load(
                    k_base + keys.to(tl.int64)[:, None] * stride_k_row + offs_d[None, :],
                    mask=kv_mask,
                    other=0.0,
                )
                scores = tile_dot(query, tl.trans(key_tile), DOT_PRECISION, DOT_IN_FLOAT32) * qk_scale
                scores += value_poison(bad)[None, :]
                visible = key_mask[None, :]
                if CAUSAL:
                    visible = visible & (keys[None, :] <= rows[:, None] + shift)
                scores = tl.where(visible, nan_if_infinite(scores), float("-inf"))
                new_max = tl.maximum(running_max, tl.max(scores, 1))
                # A row that sees no key yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                probabilities = tl.math.exp2(scores - safe_max[:, None])
                correction = tl.math.exp2(running_max - safe_max)
                running_sum = running_sum * correction + tl.sum(probabilities, 1)
                value_tile = tl.load(
                    v_base + keys.to(tl.int64)[:, None] * stride_v_row + offs_d[None, :],
                    mask=kv_mask & (bad == 0)[:, None],
                    other=0.0,
                )
                accumulator = accumulator * correction[:, None] + tile_dot(
                    probabilities.to(value_tile.dtype), value_tile, DOT_PRECISION, DOT_IN_FLOAT32
                )
                running_max = new_max
            safe_max = tl.where(running_max == float("-inf"), 0.0, running_max)
            pair = chunk_pair_index(entry, rows, head_in_chunk, first_row, rows_here, topk)
            store_partial(
                PartialOut,
                PartialLse,
                pair,
                entry_mask,
                safe_max,
                running_sum,
                accumulator,
                offs_d,
                d_mask,
                HEAD_DIM,
            )


@triton.jit
def _moba_fwd_merge_kernel(
    PartialOut,
    PartialLse,
    Out,
    Lse,
    head_first,
    first_row,
    rows_here,
    chunk_pairs,
    topk,
    total_q,
    stride_o_row,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Combine the topk partials of BLOCK_R (head, row) pairs of a chunk by their log-sum-exps, in slot
    order."""
    pairs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pair_mask = pairs < chunk_pairs
    slots = tl.arange(0, TOPK_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    pair_first = pairs.to(tl.int64) * topk

    partial_lse = tl.load(
        PartialLse + pair_first[:, None] + slots[None, :],
        mask=pair_mask[:, None] & (slots[None, :] < topk),
        other=float("-inf"),
    )
    row_max = tl.max(partial_lse, 1)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(tl.math.exp2(partial_lse - safe_max[:, None]), 1)
    inverse_total = 1.0 / tl.where(total > 0, total, 1.0)

    accumulator = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for slot in range(topk):
        slot_lse = tl.load(PartialLse + pair_first + slot, mask=pair_mask, other=float("-inf"))
        # Skip unused slots (lse -inf): their partial output was never written. A NaN lse (a NaN or an
        # overflow among the pair's scores) is a used slot, so the NaN reaches the output as in the
        # reference instead of being dropped.
        used = slot_lse != float("-inf")
        weight = tl.math.exp2(slot_lse - safe_max) * inverse_total
        part = tl.load(
            PartialOut + (pair_first + slot)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=used[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        accumulator += tl.where(used, weight, 0.0)[:, None] * part

    rows = first_row + pairs % rows_here
    heads = head_first + pairs // rows_here
    out_ptrs = (
        Out + rows.to(tl.int64)[:, None] * stride_o_row + heads[:, None] * stride_o_head + offs_d[None, :]
    )
    tl.store(out_ptrs, accumulator.to(Out.dtype.element_ty), mask=pair_mask[:, None] & d_mask[None, :])
    lse = (safe_max + tl.math.log2(total)) * 0.6931471805599453  # natural log; -inf when nothing seen
    tl.store(Lse + heads.to(tl.int64) * total_q + rows, lse, mask=pair_mask)


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------


def forward_tiles(head_dim: int, block_size: int, config: KernelConfig = DEFAULT_CONFIG) -> dict:
    """Gathered query rows x keys per tile, warps and stages of the partial kernel: sm_90 defaults (small
    tiles in the interpreter), then what the config sets."""
    if interpreting():
        tiles = dict(
            BLOCK_M=16, BLOCK_N=min(32, max(16, next_power_of_2(block_size))), num_warps=4, num_stages=1
        )
    else:
        block_n = min(64 if head_dim > 128 else 128, max(16, next_power_of_2(block_size)))
        # Three stages pipeline the gathered query tiles past a block held in shared memory. Where the keys
        # loop instead (blocks wider than one tile, head_dim > 128) they would pipeline K/V tiles too,
        # near the shared-memory limit: one stage (see "Forward: tiles and stages" in benchmarks/NOTES.md).
        single_key_tile = block_size <= block_n and head_dim <= 128
        # 128 gathered rows per tile at head_dim <= 64 and blocks of 128 (the paper's model): in the 340m
        # model's training step at 32K the partial kernel took 10.8 instead of 14.2 ms (12 layers, B128/k8,
        # H200; "Forward: tiles and stages" in benchmarks/NOTES.md). Elsewhere 64, as measured before.
        tiles = dict(
            BLOCK_M=128 if head_dim <= 64 and block_n >= 128 and single_key_tile else 64,
            BLOCK_N=block_n,
            num_warps=8 if head_dim > 128 else 4,
            num_stages=3 if single_key_tile else 1,
        )
    return dict(tiles, **config.launch_settings("forward"))


def bad_keys(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """int8 ``[Hkv, total_k]``: 1 where a key's k or v holds a NaN or an inf (one pass over K and V)."""
    total_k, heads_kv, head_dim = k.shape
    flags = torch.empty(heads_kv, total_k, dtype=torch.int8, device=k.device)
    block_r = 16 if interpreting() else 64
    if total_k * heads_kv:
        _moba_bad_keys_kernel[(triton.cdiv(total_k * heads_kv, block_r),)](
            K=k,
            V=v,
            BadKeys=flags,
            total_k=total_k,
            heads_kv=heads_kv,
            stride_k_row=k.stride(0),
            stride_k_head=k.stride(1),
            stride_v_row=v.stride(0),
            stride_v_head=v.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_R=block_r,
            BLOCK_D=head_dim_tile(head_dim),
        )
    return flags


def check_supported(q: torch.Tensor, k: torch.Tensor, topk: int) -> None:
    """Raise a clear ValueError before any launch for what the kernels cannot run."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"backend='triton' supports float16, bfloat16 and float32 inputs, got {q.dtype} "
            "(use backend='reference' for float64)"
        )
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"backend='triton' supports head_dim up to {MAX_HEAD_DIM} (SRAM of one tile), got {q.shape[-1]}"
        )
    pairs = q.shape[0] * q.shape[1] * topk
    if pairs >= 2**31:
        raise ValueError(
            f"backend='triton' indexes routed (query, head, slot) pairs in int32: total_q * heads_q * topk "
            f"must be < 2**31, got {pairs}"
        )


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


def sparse_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int,
    causal: bool,
    softmax_scale: float,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over the selected blocks of packed sequences.

    q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, selected int32 ``[total_q, Hq, topk]``.
    Returns o ``[total_q, Hq, D]`` (q's dtype), lse ``[Hq, total_q]`` float32 (natural log), and the
    index (entries, offsets) that the backward walks again.
    """
    config = DEFAULT_CONFIG if config is None else config
    q, k, v = maybe_contiguous(q), maybe_contiguous(k), maybe_contiguous(v)
    total_q, heads_q, head_dim = q.shape
    total_k, heads_kv, _ = k.shape
    topk = selected.shape[-1]
    batch = cu_seqlens_q.numel() - 1
    block_slots = num_block_slots(total_k, batch, block_size)
    split = chunking(total_q, heads_q, topk, head_dim, q.dtype, config=config)
    entries, offsets = build_block_index(
        selected, cu_seqlens_q, cu_seqlens_k, block_size, block_slots, split.row_chunks, split.rows_per_chunk
    )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(heads_q, total_q, dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse, entries, offsets
    table = block_table(cu_seqlens_q, cu_seqlens_k, block_size, block_slots)

    tiles = forward_tiles(head_dim, block_size, config)
    items = work_items(
        offsets,
        block_slots,
        split.row_chunks,
        units_total=heads_q,
        units_per_launch=split.heads_per_chunk,
        heads_per_unit=1,
        row_chunks=split.row_chunks,
        segments_per_column=1,
        rows_per_item=rows_per_item(config, tiles["BLOCK_M"]),
        min_items=0,  # an empty column has nothing to write
    )
    block_d = head_dim_tile(head_dim)
    partial_out = torch.empty(
        split.scratch_pairs(topk), head_dim, dtype=partial_dtype(q.dtype, config), device=q.device
    )
    partial_lse = torch.empty(split.scratch_pairs(topk), dtype=torch.float32, device=q.device)
    block_r = 16 if interpreting() else 32
    single_key_tile = block_size <= tiles["BLOCK_N"]
    flags = None if single_key_tile else bad_keys(k, v)
    for launch, (head_first, heads_here, row_chunk, first_row, rows_here) in enumerate(
        split.chunks(total_q, heads_q)
    ):
        chunk_pairs = heads_here * rows_here
        # Slots no program writes stay -inf: the merge skips them.
        partial_lse[: chunk_pairs * topk].fill_(-math.inf)
        if block_slots > 0:
            columns = block_slots * heads_here
            _moba_fwd_partial_kernel[(items.grid(chunk_pairs * topk, columns),)](
                Q=q,
                K=k,
                V=v,
                PartialOut=partial_out,
                PartialLse=partial_lse,
                Entries=entries,
                Offsets=offsets,
                BlockTable=table,
                BadKeys=flags,
                total_k=total_k,
                ItemEnds=items.item_ends[launch],
                stride_q_row=q.stride(0),
                stride_q_head=q.stride(1),
                stride_k_row=k.stride(0),
                stride_k_head=k.stride(1),
                stride_v_row=v.stride(0),
                stride_v_head=v.stride(1),
                block_slots=block_slots,
                num_chunks=split.row_chunks,
                chunk=row_chunk,
                head_first=head_first,
                heads_here=heads_here,
                first_row=first_row,
                rows_here=rows_here,
                heads_q=heads_q,
                topk=topk,
                group=heads_q // heads_kv,
                qk_scale=softmax_scale * LOG2_E,
                search_steps=search_steps(columns),
                rows_per_item=items.rows_per_item,
                HEAD_DIM=head_dim,
                CAUSAL=causal,
                DOT_PRECISION=dot_precision(q.dtype),
                DOT_IN_FLOAT32=dot_in_float32(q.dtype),
                SINGLE_KEY_TILE=single_key_tile,
                BLOCK_D=block_d,
                **tiles,
            )
        _moba_fwd_merge_kernel[(triton.cdiv(chunk_pairs, block_r),)](
            PartialOut=partial_out,
            PartialLse=partial_lse,
            Out=out,
            Lse=lse,
            head_first=head_first,
            first_row=first_row,
            rows_here=rows_here,
            chunk_pairs=chunk_pairs,
            topk=topk,
            total_q=total_q,
            stride_o_row=out.stride(0),
            stride_o_head=out.stride(1),
            HEAD_DIM=head_dim,
            TOPK_PAD=next_power_of_2(topk),
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out, lse, entries, offsets
