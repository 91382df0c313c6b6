"""Sparse attention forward: key-block-major partial softmax, then a per-row merge over the slots.

One program per (key block, query head) takes the query rows routed to that block (from
``flashmoba.ops.index``), gathers them in tiles of ``BLOCK_M`` rows and runs a FlashAttention inner loop
over the block's keys in tiles of ``BLOCK_N``: ``tl.dot`` on full tiles, float32 accumulation, exp2 with
log2(e) folded into the scale, the causal rule ``key <= row + shift`` applied inside the block. Each
(row, slot) pair thus gets a partial output normalised by its own sum and a partial log2-sum-exp. A merge
kernel then combines the ``topk`` partials of each row in slot order (deterministic, no atomics).

The partials are kept for a chunk at a time (a static chunking from the shapes, no host synchronisation),
so the scratch stays about twice the size of the output whatever topk is. A chunk is a group of whole
query heads, so every program sees all the rows routed to its column and loads its K/V block once; only
when one head's partials exceed the budget is a head split into row ranges (``Chunking``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashmoba.ops.index import block_table, build_block_index, num_block_slots

LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453

# Scratch bound of the partial outputs per chunk; None picks max(64 MiB, 2 x output bytes).
PARTIAL_BUFFER_BYTES: int | None = None
# Partial outputs of float16/bfloat16 inputs are stored in that dtype: half the bytes written and read
# again by the merge, for one more rounding per partial. Measured on H100 at 64K, bf16 (benchmarks/NOTES.md
# section 3): forward 1.38x (B128/k8) and 1.72x (B32/k32) faster, outputs moved by at most 1-2 bf16 units
# in the last place (mean 7e-5 on outputs of mean magnitude 0.04). False keeps float32 partials.
PARTIALS_IN_INPUT_DTYPE = True


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def chunk_pair_index(entry, rows, head_in_chunk, first_row, rows_here, topk):
    """Position of routed pairs in the chunk's partial buffers, laid out [head in chunk, row, slot]."""
    return ((head_in_chunk * rows_here + rows - first_row) * topk + entry % topk).to(tl.int64)


@triton.jit
def program_column(Offsets, BlockTable, block_slots, num_chunks, chunk, head_first, heads_here):
    """The (key block, query head) column of this program in a chunk's grid: the head, the column's
    segment [begin, end) of the index, and the block's keys [key_first, key_end) and causal shift."""
    # Heads vary fastest: under causal routing the early key blocks collect the most rows, so their
    # programs start first instead of trailing at the end of the grid.
    block = tl.program_id(0) // heads_here
    head_in_chunk = tl.program_id(0) % heads_here
    head = head_first + head_in_chunk
    segment = (head * block_slots + block) * num_chunks + chunk
    begin = tl.load(Offsets + segment)
    end = tl.load(Offsets + segment + 1)
    key_first = tl.load(BlockTable + block)
    key_end = tl.load(BlockTable + block_slots + block)
    shift = tl.load(BlockTable + 2 * block_slots + block)
    return head_in_chunk, head, begin, end, key_first, key_end, shift


@triton.jit
def _store_partial(
    PartialOut,
    PartialLse,
    pair,
    entry_mask,
    row_max,
    row_sum,
    accumulator,
    offs_d,
    d_mask,
    HEAD_DIM: tl.constexpr,
):
    """Write each pair's normalised partial output and its log2-sum-exp (-inf when it saw no key)."""
    partial_lse = row_max + tl.math.log2(row_sum)
    partial_out = accumulator / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    tl.store(PartialLse + pair, partial_lse, mask=entry_mask)
    tl.store(
        PartialOut + pair[:, None] * HEAD_DIM + offs_d[None, :],
        partial_out.to(PartialOut.dtype.element_ty),
        mask=entry_mask[:, None] & d_mask[None, :],
    )


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
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SINGLE_KEY_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial attention of the rows routed to one (key block, query head) for one chunk."""
    head_in_chunk, head, begin, end, key_first, key_end, shift = program_column(
        Offsets, BlockTable, block_slots, num_chunks, chunk, head_first, heads_here
    )
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
        value_tile = tl.load(
            v_base + keys.to(tl.int64)[:, None] * stride_v_row + offs_d[None, :], mask=kv_mask, other=0.0
        )
        for tile_start in range(begin, end, BLOCK_M):
            entry_mask = tile_start + offs_m < end
            entry = tl.load(Entries + tile_start + offs_m, mask=entry_mask, other=0)
            rows = entry // (heads_q * topk)
            q_ptrs = Q + rows.to(tl.int64)[:, None] * stride_q_row + head * stride_q_head + offs_d[None, :]
            query = tl.load(q_ptrs, mask=entry_mask[:, None] & d_mask[None, :], other=0.0)
            scores = tl.dot(query, tl.trans(key_tile), input_precision=DOT_PRECISION) * qk_scale
            visible = key_mask[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + shift)
            scores = tl.where(visible, scores, float("-inf"))
            row_max = tl.max(scores, 1)
            safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
            probabilities = tl.math.exp2(scores - safe_max[:, None])
            row_sum = tl.sum(probabilities, 1)
            accumulator = tl.dot(
                probabilities.to(value_tile.dtype), value_tile, input_precision=DOT_PRECISION
            )
            pair = chunk_pair_index(entry, rows, head_in_chunk, first_row, rows_here, topk)
            _store_partial(
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
                key_tile = tl.load(
                    k_base + keys.to(tl.int64)[:, None] * stride_k_row + offs_d[None, :],
                    mask=kv_mask,
                    other=0.0,
                )
                scores = tl.dot(query, tl.trans(key_tile), input_precision=DOT_PRECISION) * qk_scale
                visible = key_mask[None, :]
                if CAUSAL:
                    visible = visible & (keys[None, :] <= rows[:, None] + shift)
                scores = tl.where(visible, scores, float("-inf"))
                new_max = tl.maximum(running_max, tl.max(scores, 1))
                # A row that sees no key yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
                safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
                probabilities = tl.math.exp2(scores - safe_max[:, None])
                correction = tl.math.exp2(running_max - safe_max)
                running_sum = running_sum * correction + tl.sum(probabilities, 1)
                value_tile = tl.load(
                    v_base + keys.to(tl.int64)[:, None] * stride_v_row + offs_d[None, :],
                    mask=kv_mask,
                    other=0.0,
                )
                accumulator = accumulator * correction[:, None] + tl.dot(
                    probabilities.to(value_tile.dtype), value_tile, input_precision=DOT_PRECISION
                )
                running_max = new_max
            safe_max = tl.where(running_max == float("-inf"), 0.0, running_max)
            pair = chunk_pair_index(entry, rows, head_in_chunk, first_row, rows_here, topk)
            _store_partial(
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
    """Combine the topk partials of BLOCK_R (head, row) pairs of a chunk by their log-sum-exps, in slot order."""
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
        used = slot_lse > float("-inf")  # skip unused slots: their partial output was never written
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

MAX_HEAD_DIM = 256


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs are for exactness tests: no TF32 rounding.
    return "ieee" if dtype == torch.float32 else "tf32"


def head_dim_tile(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def forward_tiles(head_dim: int, block_size: int) -> dict:
    """Gathered query rows x keys per tile, and warps (sm_90 defaults; small tiles in the interpreter)."""
    if interpreting():
        return dict(
            BLOCK_M=16,
            BLOCK_N=min(32, max(16, triton.next_power_of_2(block_size))),
            num_warps=4,
            num_stages=1,
        )
    block_n = min(64 if head_dim > 128 else 128, max(16, triton.next_power_of_2(block_size)))
    # Measured on H100 at 64K, d=128, head-group chunks (ms): B=128/k=8: stages 3 9.15, 1 9.47, 2 9.66, M=128 with
    # 8 warps 10.6; B=32/k=32: stages 3 24.1, 1 25.1 (benchmarks/NOTES.md section 4). Three stages pipeline the
    # gathered query tiles past a block held in shared memory; where the keys loop instead (blocks wider than
    # one tile, head_dim > 128) they would pipeline K/V tiles too, unmeasured and near the shared-memory limit.
    single_key_tile = block_size <= block_n and head_dim <= 128
    return dict(
        BLOCK_M=64,
        BLOCK_N=block_n,
        num_warps=8 if head_dim > 128 else 4,
        num_stages=3 if single_key_tile else 1,
    )


def partial_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if PARTIALS_IN_INPUT_DTYPE and dtype in (torch.float16, torch.bfloat16) else torch.float32


class Chunking(NamedTuple):
    """How the forward splits the partial outputs of all (row, head, slot) pairs to fit its scratch.

    Whole heads go together while one head's partials fit (``row_chunks == 1``); otherwise each chunk is
    one head and ``rows_per_chunk`` rows. The index keeps ``row_chunks`` segments per column.
    """

    heads_per_chunk: int
    rows_per_chunk: int
    row_chunks: int

    def chunks(self, total_q: int, heads_q: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(first head, heads, row chunk, first row, rows) of each chunk, in launch order."""
        for head_first in range(0, heads_q, self.heads_per_chunk):
            for row_chunk in range(self.row_chunks):
                first_row = row_chunk * self.rows_per_chunk
                yield (
                    head_first,
                    min(self.heads_per_chunk, heads_q - head_first),
                    row_chunk,
                    first_row,
                    min(self.rows_per_chunk, total_q - first_row),
                )

    def scratch_pairs(self, topk: int) -> int:
        return self.heads_per_chunk * self.rows_per_chunk * topk


def chunking(
    total_q: int, heads_q: int, topk: int, head_dim: int, dtype: torch.dtype, group: int = 1
) -> Chunking:
    """The static chunking of the forward's partials (and of the backward's dQ partials) for these shapes.

    With ``group`` > 1, heads go in whole groups of ``group`` consecutive heads (the query heads of one kv
    head, for the backward's dK/dV programs); a group that does not fit is split into row ranges instead.

    Measured on H100 at 64K, B128/k8 (benchmarks/NOTES.md section 4): splitting rows costs each column a
    K/V reload and shorter row loops per chunk (forward 11.2 ms in 5 row chunks against 9.2 ms in one).
    """
    budget = PARTIAL_BUFFER_BYTES
    if budget is None:  # twice the output and its lse
        budget = max(64 << 20, 2 * total_q * heads_q * (head_dim * dtype.itemsize + 4))
    bytes_per_row = group * topk * (head_dim * partial_dtype(dtype).itemsize + 4)  # one group's outputs + lse
    rows = max(total_q, 1)
    groups = heads_q // group
    groups_that_fit = min(groups, budget // (bytes_per_row * rows))
    if groups_that_fit >= 1:
        launches = -(-groups // groups_that_fit)
        return Chunking(group * -(-groups // launches), rows, 1)  # even sizes: no short last launch
    rows_per_chunk = max(1, budget // bytes_per_row)
    return Chunking(group, rows_per_chunk, -(-rows // rows_per_chunk))


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


def _row_stride_ok(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention over the selected blocks of packed sequences.

    q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, selected int32 ``[total_q, Hq, topk]``.
    Returns o ``[total_q, Hq, D]`` (q's dtype), lse ``[Hq, total_q]`` float32 (natural log), and the
    index (entries, offsets) that the backward walks again.
    """
    q, k, v = _row_stride_ok(q), _row_stride_ok(k), _row_stride_ok(v)
    total_q, heads_q, head_dim = q.shape
    total_k, heads_kv, _ = k.shape
    topk = selected.shape[-1]
    batch = cu_seqlens_q.numel() - 1
    block_slots = num_block_slots(total_k, batch, block_size)
    split = chunking(total_q, heads_q, topk, head_dim, q.dtype)
    entries, offsets = build_block_index(
        selected, cu_seqlens_q, cu_seqlens_k, block_size, block_slots, split.row_chunks, split.rows_per_chunk
    )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(heads_q, total_q, dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse, entries, offsets
    table = block_table(cu_seqlens_q, cu_seqlens_k, block_size, block_slots)

    tiles = forward_tiles(head_dim, block_size)
    block_d = head_dim_tile(head_dim)
    partial_out = torch.empty(
        split.scratch_pairs(topk), head_dim, dtype=partial_dtype(q.dtype), device=q.device
    )
    partial_lse = torch.empty(split.scratch_pairs(topk), dtype=torch.float32, device=q.device)
    qk_scale = softmax_scale * LOG2_E
    block_r = 16 if interpreting() else 32
    for head_first, heads_here, row_chunk, first_row, rows_here in split.chunks(total_q, heads_q):
        chunk_pairs = heads_here * rows_here
        partial_lse[: chunk_pairs * topk].fill_(
            -math.inf
        )  # slots no program writes stay -inf: the merge skips them
        if block_slots > 0:
            _moba_fwd_partial_kernel[(block_slots * heads_here,)](
                q,
                k,
                v,
                partial_out,
                partial_lse,
                entries,
                offsets,
                table,
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                v.stride(0),
                v.stride(1),
                block_slots,
                split.row_chunks,
                row_chunk,
                head_first,
                heads_here,
                first_row,
                rows_here,
                heads_q,
                topk,
                heads_q // heads_kv,
                qk_scale,
                HEAD_DIM=head_dim,
                CAUSAL=causal,
                DOT_PRECISION=dot_precision(q.dtype),
                SINGLE_KEY_TILE=block_size <= tiles["BLOCK_N"],
                BLOCK_M=tiles["BLOCK_M"],
                BLOCK_N=tiles["BLOCK_N"],
                BLOCK_D=block_d,
                num_warps=tiles["num_warps"],
                num_stages=tiles["num_stages"],
            )
        _moba_fwd_merge_kernel[(triton.cdiv(chunk_pairs, block_r),)](
            partial_out,
            partial_lse,
            out,
            lse,
            head_first,
            first_row,
            rows_here,
            chunk_pairs,
            topk,
            total_q,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            TOPK_PAD=triton.next_power_of_2(topk),
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out, lse, entries, offsets
