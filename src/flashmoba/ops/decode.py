"""Decode with a KV cache in Triton: append, route against the centroid cache, split-K attention, merge.

``moba_attn_with_kvcache`` (``flashmoba.kvcache``) calls ``moba_decode_triton``; the contract is the
reference's (../shared/inference.md, section 1). Four kernels (five with a split router) and no host
synchronisation anywhere: every length and page id is read on the device, every grid and scratch buffer
is sized from shapes alone, so a decode step (append + route + attend) can be captured in a CUDA graph.

1. ``_decode_append_kernel``, program (touched block j, sequence b, kv head h): writes the new keys and
   values of sequence b that fall into its j-th touched block (positions ``cache_seqlens[b] + t``) into
   the caches (contiguous or paged) and adds their float32 sum to that block's ``block_sums`` row. One
   program owns each (sequence, block, head) row, so the update is a load-add-store, not an atomic: the
   result is deterministic. A chunk of T new keys touches at most ``cdiv(T, B) + 1`` blocks.
2. ``_decode_route_kernel``, program (row tile, sequence b, kv head h): the rows are the (query row,
   query head of h's group) pairs of sequence b, so each centroid tile is read once per kv head. It scores
   the rows against ``block_sums / B`` with ``tile_dot`` (every candidate block is complete: candidates
   end before the own block, so its count is B) and keeps each row's running top-k on chip with the
   router's packed (score, block id) keys (``flashmoba.ops.router``: ties go to the later block). float32
   scores are ``q . sum / B`` and 16-bit ones ``q . (sum / B rounded to q's dtype)``, the reference's two
   rules. A tile's dot has 16 rows at least; where the group's pairs are fewer (a one-token step: one
   pair per query head of the group), the top-k work runs on those rows only (``ROWS``), not on the
   padding. Output: int32 ``[batch, seqlen_q, heads_q, topk]``, the candidates ascending, then the own
   block, then -1. Where that grid is small against the device (a few long sequences), the centroid tiles
   of each (row tile, sequence, kv head) are split over ``block_splits`` programs, each storing its
   running lists, and ``_decode_route_merge_kernel`` merges them (the keys order globally), or, where
   the attention runs by query head (``DecodeConfig.route_merge_in_attention``), each attention program
   merges its own pair's lists first and no merge kernel is launched. A tile's keys enter a row's list
   by maxima: at most ``picks`` rounds (the row's best ``picks`` after the tile take no more of its keys),
   one int64 maximum each, then one bitonic merge.
   With ``DecodeConfig.fold_append`` (default ``DEFAULT_FOLD_APPEND``), a step of one new token per
   sequence (seqlen_q 1 with k, v) launches no append kernel: the route grid holds one more program per
   (b, h), which writes the token's key and value and updates its block's ``block_sums`` row
   (``_append_block``, the append kernel's code) while the others route, off their critical path. No
   router program reads that row: the token's block is the own block, and candidates end before it. One
   program still owns each (sequence, block, head) row, so the result is the same, bit for bit. Chunks
   (seqlen_q > 1) always launch the append kernel.
3. ``_decode_attn_partial_kernel``, program (query row and head, split): one query row of one head
   against the keys of the selected blocks of slots ``[split * S, (split + 1) * S)`` of its selection,
   in tiles of BLOCK_N keys of a block, as a matrix-vector product on CUDA cores (a decode row is one row:
   a tensor-core tile would be 15/16 padding, and the step is bound by the bytes of K and V anyway). The
   causal rule ``key <= row position`` masks the own block; slots holding -1 mask everything. It stores a
   partial output normalised by its own sum and its log2-sum-exp (-inf where it saw no key). The NaN
   rule of ``flashmoba.reference``: a visible logit that is not finite, or a visible value vector with
   a NaN or an inf, makes the split's partial output and lse NaN (an FMA per logit; for values, the
   accumulator they leave non-finite, checked once after the loop); masked keys are never loaded
   (zeros), so NaN or inf there changes nothing. The key tiles of a
   split are one flat loop whose K and V loads Triton software-pipelines (``tl.range(num_stages=...)``:
   the next tile is in flight while the current one is reduced; without it nothing is prefetched, since
   the launch option pipelines only loads that feed a ``tl.dot``). With one split (large batches) the
   program writes o and lse itself, as the merge of one partial would: no scratch, no merge launch.
   ``_decode_attn_group_kernel``, program (sequence b, query row t, kv head h; split), the default where a
   kv head has several query heads: the same partials for all query heads of h's group at once. Their
   selections are its entries (member, slot); a split takes a share of the entries, and a block is
   loaded once, at its first entry, for every member that selected it (the own block, always shared, and
   whatever blocks the members' selections have in common). Scores and probability-weighted values are
   tensor-core dots of the group's rows (padded to 16) against a key tile; the probabilities enter the
   second dot as a 16-bit high part plus the rest, which keeps them as exact as float32 products. The
   NaN rule holds per member: a non-finite value vector poisons the accumulators of the members that
   see it; the others keep theirs as they were (their probability 0 times inf would be NaN).
4. ``_decode_merge_kernel``, program (query row and head): combines the splits' partials by their
   log-sum-exp into o (q's dtype) and the float32 natural-log lse; a row that saw no key (an empty
   sequence) gets zeros and -inf, a row with a NaN partial lse gets NaN in o and lse. Not launched with
   one split.

With ``DecodeConfig.pdl`` (off by default: measured no faster) every kernel is a programmatic dependent
launch on sm_90 and newer, and waits for the kernel before it first thing (``_wait_for_previous_grid``).

The Triton path reads no values on the host, so it cannot check them: lengths past the capacity and page
ids out of range are the caller's to avoid (the reference backend checks them). Writes past the capacity
are dropped and rows before the sequence start (a cached sequence shorter than the queries) see nothing.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from flashmoba._checks import bool_fields, check_bool, check_positive_int
from flashmoba.ops.router import (
    EMPTY_KEY,
    MAX_RUNNING_TOPK,
    _key_score,
    _merge_tile,
    _ordered_scores,
    _score_keys,
)
from flashmoba.ops.utils import (
    LN_2,
    LOG2_E,
    MAX_HEAD_DIM,
    dot_in_float32,
    dot_precision,
    head_dim_tile,
    interpreting,
    next_power_of_2,
    supports_pdl,
    tile_dot,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_DIM = 65535  # CUDA's limit on grid dimensions 1 and 2
# Programs the split-K attention aims for when the device's SM count is unknown (an H100 has 132 SMs).
DEFAULT_SM_COUNT = 132
MAX_ROUTE_SPLITS = 16  # router block splits the heuristic takes at most (a config may ask for more)
_LN_2 = tl.constexpr(LN_2)  # a kernel reads module globals only as constexprs


# Measured on an H200 (benchmarks/NOTES.md, "Decode attention by kv head group"): folding the append saves
# 1-4 us of device time per step at every measured shape; attention by group with tiles of 128 keys is
# as fast or faster than by query head at every GQA shape (4-7% at batch 32 and 64).
DEFAULT_FOLD_APPEND = True
DEFAULT_ATTN_BY_GROUP = True  # where a kv head has several query heads (group > 1); by query head else
# Programmatic dependent launch (sm_90 on) lets each decode kernel's launch overlap the one before; off by
# default: replayed steps were as fast or slower with it on an H200 (benchmarks/NOTES.md, "Decode kernels
# launched programmatically").
DEFAULT_PDL = False
# The by-head attention merges the router's split lists: one launch fewer per split step, 2.5-2.7 us off
# a 16/16-head batch-8 step at 32K and 128K on an H200 (NOTES, "The decode router's top-k by maxima").
DEFAULT_ROUTE_MERGE_IN_ATTENTION = True
# Bytes of one K (or V) tile of the group kernel at most: 2 pipeline stages of a K and a V tile take at
# most 4x this in shared memory (128 KB of the H100's and H200's 227 KB; 78 KB compiled at head_dim 128).
GROUP_TILE_BYTES = 32768


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch settings of the decode kernels (None: the launcher's heuristic decides for the shapes)."""

    # Router: (row, query head) pairs per program, centroids per tile, warps.
    route_block_m: int | None = None
    route_block_n: int | None = None
    route_num_warps: int | None = None
    route_num_stages: int | None = None
    # Programs that share one (row tile, sequence, kv head)'s centroid tiles (1: no split, no merge).
    route_block_splits: int | None = None
    # Attention: keys per tile, warps, and splits of a row's selected blocks (one split: no split-K).
    attn_block_n: int | None = None
    attn_num_warps: int | None = None
    # Software-pipeline stages of the attention's key-tile loop (1: no pipelining).
    attn_num_stages: int | None = None
    num_splits: int | None = None
    # One-token steps with new k, v (seqlen_q 1): the route kernel's programs write the new key and value
    # and update block_sums themselves, and the append kernel is not launched (None: DEFAULT_FOLD_APPEND).
    fold_append: bool | None = None
    # Attention by kv head group (_decode_attn_group_kernel: a block's keys and values loaded once for the
    # group's query heads, tensor-core dots) or by query head (_decode_attn_partial_kernel) (None:
    # DEFAULT_ATTN_BY_GROUP where group > 1, by query head for one query head per kv head).
    attn_by_group: bool | None = None
    # Where the router splits and the attention runs by query head: each attention program merges its
    # pair's split lists itself, and the route merge kernel is not launched (None:
    # DEFAULT_ROUTE_MERGE_IN_ATTENTION).
    route_merge_in_attention: bool | None = None
    # Launch every decode kernel with programmatic dependent launch where the device supports it
    # (ops.utils.supports_pdl; ignored elsewhere) (None: DEFAULT_PDL).
    pdl: bool | None = None

    def __post_init__(self):
        bool_fields_here = bool_fields(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if field.name in bool_fields_here:
                check_bool(field.name, value)
            else:
                check_positive_int(field.name, value)


DEFAULT_DECODE_CONFIG = DecodeConfig()


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _wait_for_previous_grid(PDL: tl.constexpr):
    """The first statement of every decode kernel. Under PDL (a programmatic dependent launch) the program
    may start while the kernel before it in the stream still runs: it waits here until that kernel has
    finished and its writes are visible, before any load or store of its own. Then it lets the next
    kernel launch (it too waits before touching memory). Since every kernel waits before it signals, at
    most two overlap, and whatever was written before the previous kernel was complete by then. Without
    PDL: nothing (stream order does it)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _bfloat16_nearest(values):
    """float32 values rounded to the nearest bfloat16 (ties to even), still as float32: what ``.to(bf16)``
    does on a GPU. Triton 3.6's interpreter truncates there instead, so the kernels round by the bits
    under ``ROUND_BF16`` (the carry never reaches the sign bit of a finite value or an inf; NaN stays as is,
    whatever its payload)."""
    bits = values.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(values == values, rounded.to(tl.float32, bitcast=True), values)


@triton.jit
def _append_block(
    KNew,
    VNew,
    KCache,
    VCache,
    BlockSums,
    BlockTable,
    stride_new_batch,
    stride_new_token,
    stride_new_head,
    stride_new_dim,
    stride_vnew_batch,
    stride_vnew_token,
    stride_vnew_head,
    stride_vnew_dim,
    stride_k_page,
    stride_k_slot,
    stride_k_head,
    stride_k_dim,
    stride_v_page,
    stride_v_slot,
    stride_v_head,
    stride_v_dim,
    stride_sums_batch,
    stride_sums_block,
    stride_sums_head,
    stride_sums_dim,
    stride_table_batch,
    start,
    touched,
    seq,
    head,
    seqlen_q,
    block_size,
    page_size,
    capacity,
    max_blocks,
    head_dim,
    PAGED: tl.constexpr,
    TOKEN_TILE: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """The new keys and values of sequence ``seq`` (``start`` keys cached) that fall into its touched block
    ``start // B + touched``, kv head ``head``: written into the caches, their float32 sum added to the
    block's ``block_sums`` row (one caller owns the row: a load-add-store)."""
    block = start // block_size + touched
    # The chunk's tokens [first, last) that fall into this block (empty for the last j of some chunks).
    first = tl.maximum(block * block_size - start, 0)
    last = tl.minimum((block + 1) * block_size - start, seqlen_q)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < head_dim
    token_offsets = tl.arange(0, TOKEN_TILE)
    k_new_base = KNew + seq.to(tl.int64) * stride_new_batch + head.to(tl.int64) * stride_new_head
    v_new_base = VNew + seq.to(tl.int64) * stride_vnew_batch + head.to(tl.int64) * stride_vnew_head

    block_sum = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for tile_start in range(first, last, TOKEN_TILE):
        tokens = tile_start + token_offsets
        positions = start + tokens
        token_ok = (tokens < last) & (positions < capacity)  # writes past the capacity are dropped
        mask = token_ok[:, None] & dim_ok[None, :]
        keys = tl.load(
            k_new_base + tokens.to(tl.int64)[:, None] * stride_new_token + dims[None, :] * stride_new_dim,
            mask=mask,
            other=0.0,
        )
        values = tl.load(
            v_new_base + tokens.to(tl.int64)[:, None] * stride_vnew_token + dims[None, :] * stride_vnew_dim,
            mask=mask,
            other=0.0,
        )
        if PAGED:
            pages = tl.load(BlockTable + seq * stride_table_batch + positions // page_size, mask=token_ok)
            slots = positions % page_size
        else:
            pages = tl.zeros([TOKEN_TILE], dtype=tl.int32) + seq
            slots = positions
        k_rows = pages.to(tl.int64) * stride_k_page + slots.to(tl.int64) * stride_k_slot
        v_rows = pages.to(tl.int64) * stride_v_page + slots.to(tl.int64) * stride_v_slot
        k_ptrs = KCache + head.to(tl.int64) * stride_k_head + k_rows[:, None] + dims[None, :] * stride_k_dim
        v_ptrs = VCache + head.to(tl.int64) * stride_v_head + v_rows[:, None] + dims[None, :] * stride_v_dim
        tl.store(k_ptrs, keys.to(KCache.dtype.element_ty), mask=mask)
        tl.store(v_ptrs, values.to(VCache.dtype.element_ty), mask=mask)
        block_sum += tl.sum(keys.to(tl.float32), axis=0)

    sums_ptrs = (
        BlockSums
        + seq.to(tl.int64) * stride_sums_batch
        + block.to(tl.int64) * stride_sums_block
        + head.to(tl.int64) * stride_sums_head
        + dims * stride_sums_dim
    )
    sums_mask = dim_ok & (first < last) & (block < max_blocks)
    old_sum = tl.load(sums_ptrs, mask=sums_mask, other=0.0)
    tl.store(sums_ptrs, old_sum + block_sum, mask=sums_mask)


_APPEND_STRIDES = (
    "stride_new_batch",
    "stride_new_token",
    "stride_new_head",
    "stride_new_dim",
    "stride_vnew_batch",
    "stride_vnew_token",
    "stride_vnew_head",
    "stride_vnew_dim",
    "stride_k_page",
    "stride_k_slot",
    "stride_k_head",
    "stride_k_dim",
    "stride_v_page",
    "stride_v_slot",
    "stride_v_head",
    "stride_v_dim",
    "stride_table_batch",
)


@triton.jit
def _decode_append_kernel(
    KNew,
    VNew,
    KCache,
    VCache,
    BlockSums,
    CacheSeqlens,
    BlockTable,  # None for a contiguous cache (PAGED False)
    stride_new_batch,
    stride_new_token,
    stride_new_head,
    stride_new_dim,
    stride_vnew_batch,
    stride_vnew_token,
    stride_vnew_head,
    stride_vnew_dim,
    stride_k_page,  # contiguous: the batch stride, and a sequence is one page of `capacity` slots
    stride_k_slot,
    stride_k_head,
    stride_k_dim,
    stride_v_page,
    stride_v_slot,
    stride_v_head,
    stride_v_dim,
    stride_sums_batch,
    stride_sums_block,
    stride_sums_head,
    stride_sums_dim,
    stride_table_batch,
    seqlen_q,
    block_size,
    page_size,
    capacity,
    max_blocks,
    head_dim,
    PAGED: tl.constexpr,
    TOKEN_TILE: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (_wait_for_previous_grid)
):
    """Program (touched block j, sequence b, kv head h): the new keys of block ``start // B + j``."""
    _wait_for_previous_grid(PDL)
    seq = tl.program_id(1)
    _append_block(
        KNew,
        VNew,
        KCache,
        VCache,
        BlockSums,
        BlockTable,
        stride_new_batch,
        stride_new_token,
        stride_new_head,
        stride_new_dim,
        stride_vnew_batch,
        stride_vnew_token,
        stride_vnew_head,
        stride_vnew_dim,
        stride_k_page,
        stride_k_slot,
        stride_k_head,
        stride_k_dim,
        stride_v_page,
        stride_v_slot,
        stride_v_head,
        stride_v_dim,
        stride_sums_batch,
        stride_sums_block,
        stride_sums_head,
        stride_sums_dim,
        stride_table_batch,
        tl.load(CacheSeqlens + seq),
        tl.program_id(0),
        seq,
        tl.program_id(2),
        seqlen_q,
        block_size,
        page_size,
        capacity,
        max_blocks,
        head_dim,
        PAGED,
        TOKEN_TILE,
        HEAD_DIM_PAD,
    )


@triton.jit
def _best_keys(keys, rounds, RUNNING_TOPK: tl.constexpr):
    """The best ``rounds`` (<= RUNNING_TOPK) of each row of packed keys [M, N], descending in
    [M, RUNNING_TOPK], EMPTY_KEY after them: one maximum per round. Keys of a row are distinct (each
    holds its block id) except EMPTY_KEY, so a round removes exactly its winner."""
    columns = tl.arange(0, RUNNING_TOPK)
    best = tl.full([keys.shape[0], RUNNING_TOPK], EMPTY_KEY, dtype=tl.int64)
    for rank in range(rounds):
        row_best = tl.max(keys, axis=1)
        keys = tl.where(keys == row_best[:, None], EMPTY_KEY, keys)
        best = tl.where(columns[None, :] == rank, row_best[:, None], best)
    return best


@triton.jit
def _merge_best(running_topk, best):
    """An ascending running list [M, K] with descending keys [M, K] (as ``_best_keys`` gives): the best K
    of both, ascending (the bitonic split, as ``router._merge_tile``)."""
    return tl.bitonic_merge(tl.maximum(running_topk, best), dim=1, descending=False)


@triton.jit
def _route_pairs(
    CacheSeqlens,
    tile,
    seq,
    kv_head,
    appended,
    seqlen_q,
    group,
    block_size,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
):
    """The first ROWS (query row, query head) pairs of a router row tile of BLOCK_M: in range, row, query
    head, own block (-1 for a row before the sequence start)."""
    length = tl.load(CacheSeqlens + seq) + appended
    pairs = tile * BLOCK_M + tl.arange(0, ROWS)
    pair_ok = pairs < seqlen_q * group
    rows = pairs // group
    heads = kv_head * group + pairs % group
    positions = length - seqlen_q + rows
    own_block = tl.where(positions >= 0, positions // block_size, -1)
    return pair_ok, rows, heads, own_block


@triton.jit
def _split_lists(
    SplitKeys,
    tile,
    seq,
    kv_head,
    batch,
    heads_kv,
    block_splits,
    ROWS: tl.constexpr,
    RUNNING_TOPK: tl.constexpr,
):
    """Split 0's running list of (row tile, sequence, kv head) in the scratch
    ``[row tiles, batch, heads_kv, block_splits, ROWS, RUNNING_TOPK]``; split s's follows at
    ``s * ROWS * RUNNING_TOPK``."""
    index = ((tile.to(tl.int64) * batch + seq) * heads_kv + kv_head) * block_splits
    return SplitKeys + index * (ROWS * RUNNING_TOPK)


@triton.jit
def _merged_split_lists(
    lists,
    list_rows,
    block_splits,
    picks,
    ROWS: tl.constexpr,
    RUNNING_TOPK: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """The running lists [R, RUNNING_TOPK] (ascending) of rows ``list_rows`` ([R] of a split's ROWS) over
    every split at ``lists`` (``_split_lists``): all splits' keys at once, [R, SPLITS_PAD * RUNNING_TOPK]
    (split-major columns), and their best ``picks``, one maximum per pick (packed keys order globally,
    ties to the later block as within a split)."""
    columns = tl.arange(0, SPLITS_PAD * RUNNING_TOPK)
    column_split = columns // RUNNING_TOPK
    offsets = (
        list_rows[:, None] * RUNNING_TOPK
        + (column_split * (ROWS * RUNNING_TOPK) + columns % RUNNING_TOPK)[None, :]
    )
    keys = tl.load(lists + offsets, mask=(column_split < block_splits)[None, :], other=EMPTY_KEY)
    empty = tl.full([list_rows.shape[0], RUNNING_TOPK], EMPTY_KEY, dtype=tl.int64)
    return _merge_best(empty, _best_keys(keys, picks, RUNNING_TOPK))


@triton.jit
def _store_selection(
    Selected,
    running_topk,
    own_block,
    pair_ok,
    rows,
    heads,
    seq,
    stride_selected_batch,
    stride_selected_token,
    stride_selected_head,
    picks,
    topk,
    RUNNING_TOPK: tl.constexpr,
    TAIL_TILE: tl.constexpr,
):
    """Write the selections of a row tile from its running lists (ascending packed keys)."""
    columns = tl.arange(0, RUNNING_TOPK)
    # Keep the best `picks` of each row, list their block ids ascending, then the own block (the latest).
    rank = RUNNING_TOPK - 1 - columns
    kept = (running_topk != EMPTY_KEY) & (rank < picks)[None, :]
    block_ids_kept = (running_topk & 0xFFFFFFFF).to(tl.int32)
    block_ids_kept = tl.sort(tl.where(kept, block_ids_kept, 0x7FFFFFFF), dim=1)
    kept_count = tl.sum(kept.to(tl.int32), axis=1)
    own_column = tl.where(own_block >= 0, kept_count, -1)
    out_base = (
        Selected
        + seq.to(tl.int64) * stride_selected_batch
        + rows.to(tl.int64)[:, None] * stride_selected_token
        + heads.to(tl.int64)[:, None] * stride_selected_head
    )
    selected = tl.where(
        columns[None, :] < kept_count[:, None],
        block_ids_kept,
        tl.where(columns[None, :] == own_column[:, None], own_block[:, None], -1),
    )
    tl.store(out_base + columns[None, :], selected, mask=pair_ok[:, None] & (columns < topk)[None, :])
    # Slots past the running list: the own block (when every running slot is kept) or -1.
    tail_offsets = tl.arange(0, TAIL_TILE)
    for tail_start in range(RUNNING_TOPK, topk, TAIL_TILE):
        tail_columns = tail_start + tail_offsets
        tail = tl.where(tail_columns[None, :] == own_column[:, None], own_block[:, None], -1)
        tl.store(
            out_base + tail_columns[None, :], tail, mask=pair_ok[:, None] & (tail_columns < topk)[None, :]
        )


@triton.jit
def _decode_route_kernel(
    Q,
    BlockSums,
    CacheSeqlens,
    Selected,
    SplitKeys,  # int64 running lists of each block split (SPLIT_BLOCKS), else None
    KNew,  # FOLD_APPEND: the step's new keys and values, the caches and the block table; else None
    VNew,
    KCache,
    VCache,
    BlockTable,
    stride_new_batch,
    stride_new_token,
    stride_new_head,
    stride_new_dim,
    stride_vnew_batch,
    stride_vnew_token,
    stride_vnew_head,
    stride_vnew_dim,
    stride_k_page,
    stride_k_slot,
    stride_k_head,
    stride_k_dim,
    stride_v_page,
    stride_v_slot,
    stride_v_head,
    stride_v_dim,
    stride_table_batch,
    page_size,
    capacity,
    max_blocks,
    stride_q_batch,
    stride_q_token,
    stride_q_head,
    stride_q_dim,
    stride_sums_batch,
    stride_sums_block,
    stride_sums_head,
    stride_sums_dim,
    stride_selected_batch,
    stride_selected_token,
    stride_selected_head,
    seqlen_q,
    appended,  # new keys per sequence of this call: seqlen_q with k, v, else 0
    group,  # query heads per kv head
    head_dim,
    block_size,
    topk,
    picks,  # candidates a row keeps: min(topk - 1, max_blocks) <= RUNNING_TOPK
    heads_kv,
    block_splits,  # programs sharing one (row tile, sequence, kv head)'s centroid tiles
    tiles_per_split,
    SPLIT_BLOCKS: tl.constexpr,  # block_splits > 1: store the running lists for the merge kernel
    RUNNING_TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,  # pairs a tile routes: BLOCK_M, or fewer where the group's pairs are fewer
    BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    TAIL_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    SUMS_ROUTE: tl.constexpr,  # float32: score q . sum / B; 16-bit: q . (sum / B rounded to q's dtype)
    INSERT_ROUNDS: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # round to bfloat16 by the bits (the interpreter truncates in .to)
    FOLD_APPEND: tl.constexpr,  # seqlen_q 1 with new k, v: programs (0, b, heads_kv * block_splits + h)
    PAGED: tl.constexpr,
    APPEND_TILE: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (_wait_for_previous_grid)
):
    """Program (row tile, sequence b, kv head h and block split): selections of the (query row t, query
    head of h's group) pairs ``t * group + g`` of the tile, from the split's centroid tiles
    ``[split * tiles_per_split, ...)``. With one split it writes the selections; with several it stores
    its running lists and ``_decode_route_merge_kernel`` merges them. With FOLD_APPEND (one new token per
    sequence) the grid's dimension 2 holds heads_kv more programs, past the routing ones: program
    (0, b, heads_kv * block_splits + h) writes the token's key and value of kv head h into the caches and
    adds the key to its block's block_sums row, as ``_decode_append_kernel`` would, and routes nothing
    (no program reads that row: candidates end before the own block, the token's; one program owns it).
    Beside the routing programs rather than after one of them, the append's dependent loads and stores
    stay off the launch's critical path.

    The scores are a tensor-core dot of BLOCK_M (at least 16) query rows. Where the tile has fewer
    pairs (ROWS < BLOCK_M: a one-token step has one pair per query head of the group), only the first
    ROWS rows of the scores are kept, and the top-k work on every tile (threshold, filter, insertions,
    merges) runs on [ROWS, BLOCK_N] instead of [BLOCK_M, BLOCK_N]."""
    _wait_for_previous_grid(PDL)
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    if FOLD_APPEND:
        # The grid's last heads_kv programs of dimension 2 append (those of row tile 0 do; no routing).
        if tl.program_id(2) >= heads_kv * block_splits:
            if tile == 0:
                _append_block(
                    KNew,
                    VNew,
                    KCache,
                    VCache,
                    BlockSums,
                    BlockTable,
                    stride_new_batch,
                    stride_new_token,
                    stride_new_head,
                    stride_new_dim,
                    stride_vnew_batch,
                    stride_vnew_token,
                    stride_vnew_head,
                    stride_vnew_dim,
                    stride_k_page,
                    stride_k_slot,
                    stride_k_head,
                    stride_k_dim,
                    stride_v_page,
                    stride_v_slot,
                    stride_v_head,
                    stride_v_dim,
                    stride_sums_batch,
                    stride_sums_block,
                    stride_sums_head,
                    stride_sums_dim,
                    stride_table_batch,
                    tl.load(CacheSeqlens + seq),
                    0,
                    seq,
                    tl.program_id(2) - heads_kv * block_splits,  # its kv head
                    1,
                    block_size,
                    page_size,
                    capacity,
                    max_blocks,
                    head_dim,
                    PAGED,
                    APPEND_TILE,
                    HEAD_DIM_PAD,
                )
            return
    kv_head = tl.program_id(2) // block_splits
    split = tl.program_id(2) % block_splits
    pair_ok, rows, heads, own_block = _route_pairs(
        CacheSeqlens, tile, seq, kv_head, appended, seqlen_q, group, block_size, BLOCK_M, ROWS
    )
    candidate_limit = tl.where(pair_ok, own_block, 0)  # candidates: blocks j < own block, all complete
    blocks_to_visit = tl.max(candidate_limit, axis=0)

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < head_dim
    dot_pair_ok, dot_rows, dot_heads, _ = _route_pairs(
        CacheSeqlens, tile, seq, kv_head, appended, seqlen_q, group, block_size, BLOCK_M, BLOCK_M
    )
    q_ptrs = (
        Q
        + seq.to(tl.int64) * stride_q_batch
        + dot_rows.to(tl.int64)[:, None] * stride_q_token
        + dot_heads.to(tl.int64)[:, None] * stride_q_head
        + dims[None, :] * stride_q_dim
    )
    queries = tl.load(q_ptrs, mask=dot_pair_ok[:, None] & dim_ok[None, :], other=0.0)
    sums_base = BlockSums + seq.to(tl.int64) * stride_sums_batch + kv_head.to(tl.int64) * stride_sums_head

    columns = tl.arange(0, RUNNING_TOPK)
    threshold_column = RUNNING_TOPK - picks  # a row's picks-th best, in an ascending list
    block_offsets = tl.arange(0, BLOCK_N)
    num_tiles = tl.where(picks > 0, tl.cdiv(blocks_to_visit, BLOCK_N), 0)
    first_tile = split * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, num_tiles)  # <= first_tile: nothing to score
    running_topk = tl.full([ROWS, RUNNING_TOPK], EMPTY_KEY, dtype=tl.int64)  # ascending
    for tile_index in range(first_tile, last_tile):
        # Latest tiles first: with attention's locality they raise the thresholds early.
        block_ids = (first_tile + last_tile - 1 - tile_index) * BLOCK_N + block_offsets
        sums_ptrs = (
            sums_base + block_ids.to(tl.int64)[None, :] * stride_sums_block + dims[:, None] * stride_sums_dim
        )
        sums_mask = dim_ok[:, None] & (block_ids < blocks_to_visit)[None, :]
        sums = tl.load(sums_ptrs, mask=sums_mask, other=0.0)  # [HEAD_DIM_PAD, BLOCK_N] float32
        if SUMS_ROUTE:
            block_scores = tile_dot(queries, sums, DOT_PRECISION, DOT_IN_FLOAT32) / block_size
        else:
            centroids = sums / block_size
            if ROUND_BF16:
                centroids = _bfloat16_nearest(centroids)
            centroids = centroids.to(Q.dtype.element_ty)
            block_scores = tile_dot(queries, centroids, DOT_PRECISION, DOT_IN_FLOAT32)
        if ROWS < BLOCK_M:
            # Rows ROWS.. are padding (zero queries): zeroed, the [BLOCK_M // ROWS, ROWS, BLOCK_N] view
            # sums to the first ROWS rows, exactly (x + 0.0 is x; -0.0 becomes +0.0, which the key
            # order does not tell apart).
            padding = (tl.arange(0, BLOCK_M) >= ROWS)[:, None]
            block_scores = tl.where(padding, 0.0, block_scores)
            block_scores = tl.sum(tl.reshape(block_scores, [BLOCK_M // ROWS, ROWS, BLOCK_N]), axis=0)
        # A NaN or inf key makes its block's centroid NaN or inf, and so may a NaN or inf in q: NaN scores
        # rank first (one NaN, see router._ordered_scores), +-inf by value; a candidate scored -inf still
        # fills an empty slot before any non-candidate (may_enter masks those), as in the reference.
        may_enter = block_ids[None, :] < candidate_limit[:, None]
        # Only a score above a row's picks-th best can change its top picks: tiles are visited latest
        # first, so an equal score belongs to an earlier block and loses the tie.
        at_threshold = columns[None, :] == threshold_column
        threshold_key = tl.max(tl.where(at_threshold, running_topk, EMPTY_KEY), axis=1)
        below = block_scores <= _key_score(threshold_key)[:, None]  # False while a list has empty slots
        may_enter &= ~below
        # A row's top `picks` after the tile take at most `picks` of the tile's keys, its best ones.
        rounds = tl.minimum(tl.max(tl.sum(may_enter.to(tl.int32), axis=1), axis=0), picks)
        if rounds > 0:
            keys = _score_keys(_ordered_scores(block_scores), block_ids[None, :])
            keys = tl.where(may_enter, keys, EMPTY_KEY)
            if rounds <= INSERT_ROUNDS:
                running_topk = _merge_best(running_topk, _best_keys(keys, rounds, RUNNING_TOPK))
            else:
                running_topk = _merge_tile(running_topk, keys, RUNNING_TOPK)

    if SPLIT_BLOCKS:
        # A split's best `picks` are a superset of its share of the overall best: store the whole list.
        batch = tl.num_programs(1)
        lists = _split_lists(SplitKeys, tile, seq, kv_head, batch, heads_kv, block_splits, ROWS, RUNNING_TOPK)
        offsets = tl.arange(0, ROWS)[:, None] * RUNNING_TOPK + tl.arange(0, RUNNING_TOPK)[None, :]
        tl.store(lists + split * (ROWS * RUNNING_TOPK) + offsets, running_topk)
    else:
        _store_selection(
            Selected,
            running_topk,
            own_block,
            pair_ok,
            rows,
            heads,
            seq,
            stride_selected_batch,
            stride_selected_token,
            stride_selected_head,
            picks,
            topk,
            RUNNING_TOPK,
            TAIL_TILE,
        )


@triton.jit
def _decode_route_merge_kernel(
    SplitKeys,
    CacheSeqlens,
    Selected,
    stride_selected_batch,
    stride_selected_token,
    stride_selected_head,
    seqlen_q,
    appended,
    group,
    block_size,
    topk,
    picks,
    heads_kv,
    block_splits,
    RUNNING_TOPK: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # block_splits rounded up to a power of 2
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    TAIL_TILE: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (_wait_for_previous_grid)
):
    """Program (row tile, sequence b, kv head h): merge the block splits' running lists into the
    selections (packed keys order globally, ties to the later block as within a split)."""
    _wait_for_previous_grid(PDL)
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    pair_ok, rows, heads, own_block = _route_pairs(
        CacheSeqlens, tile, seq, kv_head, appended, seqlen_q, group, block_size, BLOCK_M, ROWS
    )
    batch = tl.num_programs(1)
    lists = _split_lists(SplitKeys, tile, seq, kv_head, batch, heads_kv, block_splits, ROWS, RUNNING_TOPK)
    list_rows = tl.arange(0, ROWS)
    running_topk = _merged_split_lists(lists, list_rows, block_splits, picks, ROWS, RUNNING_TOPK, SPLITS_PAD)
    _store_selection(
        Selected,
        running_topk,
        own_block,
        pair_ok,
        rows,
        heads,
        seq,
        stride_selected_batch,
        stride_selected_token,
        stride_selected_head,
        picks,
        topk,
        RUNNING_TOPK,
        TAIL_TILE,
    )


@triton.jit
def _decode_attn_partial_kernel(
    Q,
    KCache,
    VCache,
    Selected,
    CacheSeqlens,
    BlockTable,  # None for a contiguous cache (PAGED False)
    PartialOut,  # float32 [batch * seqlen_q * heads_q, num_splits, head_dim] (None when FINAL)
    PartialLse,  # float32 [batch * seqlen_q * heads_q, num_splits], log2 domain (None when FINAL)
    Out,  # o like q, written here when FINAL (one split), else None
    Lse,  # float32 [batch, heads_q, seqlen_q], written here when FINAL, else None
    stride_q_batch,
    stride_q_token,
    stride_q_head,
    stride_q_dim,
    stride_k_page,  # contiguous: the batch stride (a sequence is one page of `capacity` slots)
    stride_k_slot,
    stride_k_head,
    stride_k_dim,
    stride_v_page,
    stride_v_slot,
    stride_v_head,
    stride_v_dim,
    stride_table_batch,
    stride_selected_batch,
    stride_selected_token,
    stride_selected_head,
    stride_o_batch,
    stride_o_token,
    stride_o_head,
    stride_o_dim,
    stride_lse_batch,
    stride_lse_head,
    stride_lse_token,
    seqlen_q,
    heads_q,
    group,
    appended,
    block_size,
    page_size,
    head_dim,
    used_slots,  # selection slots that can hold a block: min(topk, max_blocks)
    slots_per_split,
    num_splits,
    qk_scale,  # softmax_scale * log2(e)
    SplitKeys,  # MERGE_ROUTE: the router's split lists (_decode_route_kernel's scratch), else None
    batch,
    route_splits,  # MERGE_ROUTE: the router's block splits, its row tiles' pairs and rows, top-k picks
    topk,
    picks,
    ROUTE_BLOCK_M: tl.constexpr,
    ROUTE_ROWS: tl.constexpr,
    RUNNING_TOPK: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    TAIL_TILE: tl.constexpr,
    MERGE_ROUTE: tl.constexpr,  # merge the router's split lists here (no route merge launch)
    PAGED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software pipelining of the key-tile loop (tl.range), 1: none
    FINAL: tl.constexpr,  # one split: write o and lse, no partials and no merge
    ROUND_BF16: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (_wait_for_previous_grid)
):
    """Program (pair (b, t, head), split): partial softmax of query row t of head ``head`` over the keys of
    the blocks in selection slots ``[split * slots_per_split, ...)``. With MERGE_ROUTE the pair's selection
    is first merged from the router's split lists, as ``_decode_route_merge_kernel`` would, and written
    to its row of Selected by every split program of the pair (the same values), then read back."""
    _wait_for_previous_grid(PDL)
    pair = tl.program_id(0)
    split = tl.program_id(1)
    head = pair % heads_q
    seq = pair // heads_q // seqlen_q
    row = pair // heads_q % seqlen_q
    kv_head = head // group
    position = tl.load(CacheSeqlens + seq) + appended - seqlen_q + row
    if MERGE_ROUTE:
        # The router's pair of this program: (row, member of the group), in router row tiles of
        # ROUTE_BLOCK_M pairs whose lists hold ROUTE_ROWS rows.
        route_pair = row * group + head % group
        lists = _split_lists(
            SplitKeys,
            route_pair // ROUTE_BLOCK_M,
            seq,
            kv_head,
            batch,
            heads_q // group,
            route_splits,
            ROUTE_ROWS,
            RUNNING_TOPK,
        )
        one = tl.zeros([1], dtype=tl.int32)
        running_topk = _merged_split_lists(
            lists, one + route_pair % ROUTE_BLOCK_M, route_splits, picks, ROUTE_ROWS, RUNNING_TOPK, SPLITS_PAD
        )
        _store_selection(
            Selected,
            running_topk,
            one + tl.where(position >= 0, position // block_size, -1),
            one == 0,
            one + row,
            one + head,
            seq,
            stride_selected_batch,
            stride_selected_token,
            stride_selected_head,
            picks,
            topk,
            RUNNING_TOPK,
            TAIL_TILE,
        )
        tl.debug_barrier()  # the row's slots, written by this program's threads, read below by others

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < head_dim
    q_ptrs = (
        Q
        + seq.to(tl.int64) * stride_q_batch
        + row.to(tl.int64) * stride_q_token
        + head.to(tl.int64) * stride_q_head
        + dims * stride_q_dim
    )
    query = tl.load(q_ptrs, mask=dim_ok, other=0.0).to(tl.float32)
    selection = (
        Selected
        + seq.to(tl.int64) * stride_selected_batch
        + row.to(tl.int64) * stride_selected_token
        + head.to(tl.int64) * stride_selected_head
    )
    k_base = KCache + kv_head.to(tl.int64) * stride_k_head
    v_base = VCache + kv_head.to(tl.int64) * stride_v_head
    key_offsets = tl.arange(0, BLOCK_N)

    row_max = tl.full([], float("-inf"), dtype=tl.float32)  # log2 domain
    row_sum = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    first_slot = split * slots_per_split
    last_slot = tl.minimum(first_slot + slots_per_split, used_slots)
    # One flat loop over the key tiles of the split's slots (tiles_per_block per slot, in the same order
    # as a loop over slots and then tiles): tl.range's num_stages makes Triton pipeline its K and V loads
    # (the launch option num_stages pipelines only loads that feed a tl.dot), so each program keeps the
    # next tiles in flight while it reduces the current one.
    tiles_per_block = tl.cdiv(block_size, BLOCK_N)
    for tile in tl.range(first_slot * tiles_per_block, last_slot * tiles_per_block, num_stages=NUM_STAGES):
        slot = tile // tiles_per_block
        block = tl.load(selection + slot)  # -1: an unused slot, every key masked
        in_block = (tile - slot * tiles_per_block) * BLOCK_N + key_offsets
        key_positions = block * block_size + in_block
        visible = (block >= 0) & (in_block < block_size) & (key_positions <= position)
        if PAGED:
            pages = tl.load(
                BlockTable + seq * stride_table_batch + key_positions // page_size, mask=visible, other=0
            )
            slots = key_positions % page_size
        else:
            pages = tl.zeros([BLOCK_N], dtype=tl.int32) + seq
            slots = key_positions
        # The NaN rule (flashmoba.reference): only visible keys are loaded, masked ones read as zeros,
        # so a NaN or inf a row does not see (its own block's later keys, slots past the length, -1
        # slots, unselected blocks, unwritten cache) never enters its arithmetic: not even 0 * NaN.
        mask = visible[:, None] & dim_ok[None, :]
        k_rows = pages.to(tl.int64) * stride_k_page + slots.to(tl.int64) * stride_k_slot
        keys = tl.load(k_base + k_rows[:, None] + dims[None, :] * stride_k_dim, mask=mask, other=0.0)
        scores = tl.sum(keys.to(tl.float32) * query[None, :], axis=1) * qk_scale
        # A visible logit that is not finite (NaN or inf in q or k, an overflow) poisons the row:
        # x * 0 + x is NaN for +-inf and NaN (forward.py's nan_if_infinite); masked keys get -inf.
        scores = tl.where(visible, tl.fma(scores, 0.0, scores), float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing seen yet: no NaN
        # A NaN logit gives a NaN probability (whether the max ignores NaN, as on a GPU, or not, as in
        # the interpreter), hence a NaN row_sum and acc in every column from then on.
        probs = tl.exp2(scores - safe_max)
        rescale = tl.exp2(row_max - safe_max)
        v_rows = pages.to(tl.int64) * stride_v_page + slots.to(tl.int64) * stride_v_slot
        values = tl.load(v_base + v_rows[:, None] + dims[None, :] * stride_v_dim, mask=mask, other=0.0)
        # A visible value vector with a NaN or an inf leaves an inf or a NaN in acc (its probability times
        # it: masked keys are zeros, never loaded), which poisons the row after the loop.
        acc = acc * rescale + tl.sum(probs[:, None] * values.to(tl.float32), axis=0)
        row_sum = row_sum * rescale + tl.sum(probs, axis=0)
        row_max = new_max

    # The NaN rule for values, once per split rather than per key: a finite acc has finite columns
    # (x * 0 is NaN for inf and NaN only). An accumulator that overflows float32 from finite values (a
    # sum of values near float32's largest) reads as poisoned too: o is NaN there instead of inf.
    row_sum = tl.where(tl.sum((acc * 0.0 != 0.0).to(tl.int32), axis=0) > 0, float("nan"), row_sum)
    # row_sum is 0 where the split saw no key (lse -inf), NaN where it is poisoned (lse NaN: the merge
    # must see it), positive otherwise.
    seen = row_sum != 0.0
    out = acc / tl.where(seen, row_sum, 1.0)
    lse = tl.where(seen, row_max + tl.log2(tl.where(seen, row_sum, 1.0)), float("-inf"))
    if FINAL:
        # One split: the merge of one partial is the partial itself (weight exp2(0) = 1, total 1), so the
        # program writes o (q's dtype) and the natural-log lse as _decode_merge_kernel would.
        o_ptrs = (
            Out
            + seq.to(tl.int64) * stride_o_batch
            + row.to(tl.int64) * stride_o_token
            + head.to(tl.int64) * stride_o_head
            + dims * stride_o_dim
        )
        if ROUND_BF16:
            out = _bfloat16_nearest(out)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=dim_ok)
        lse_ptr = Lse + seq.to(tl.int64) * stride_lse_batch + head * stride_lse_head + row * stride_lse_token
        tl.store(lse_ptr, lse * _LN_2)
    else:
        partial = pair.to(tl.int64) * num_splits + split
        tl.store(PartialOut + partial * head_dim + dims, out, mask=dim_ok)
        tl.store(PartialLse + partial, lse)


@triton.jit
def _decode_attn_group_kernel(
    Q,
    KCache,
    VCache,
    Selected,
    CacheSeqlens,
    BlockTable,  # None for a contiguous cache (PAGED False)
    PartialOut,  # float32 [batch * seqlen_q * heads_q, num_splits, head_dim] (None when FINAL)
    PartialLse,  # float32 [batch * seqlen_q * heads_q, num_splits], log2 domain (None when FINAL)
    Out,  # o like q, written here when FINAL (one split), else None
    Lse,  # float32 [batch, heads_q, seqlen_q], written here when FINAL, else None
    stride_q_batch,
    stride_q_token,
    stride_q_head,
    stride_q_dim,
    stride_k_page,  # contiguous: the batch stride (a sequence is one page of `capacity` slots)
    stride_k_slot,
    stride_k_head,
    stride_k_dim,
    stride_v_page,
    stride_v_slot,
    stride_v_head,
    stride_v_dim,
    stride_table_batch,
    stride_selected_batch,
    stride_selected_token,
    stride_selected_head,
    stride_o_batch,
    stride_o_token,
    stride_o_head,
    stride_o_dim,
    stride_lse_batch,
    stride_lse_head,
    stride_lse_token,
    seqlen_q,
    heads_q,
    group,
    appended,
    block_size,
    page_size,
    head_dim,
    used_slots,  # selection slots that can hold a block: min(topk, max_blocks)
    entries_per_split,
    num_splits,
    qk_scale,  # softmax_scale * log2(e)
    PAGED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # the group's query heads, padded to a tl.dot tile (16 rows at least)
    SLOTS_PAD: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software pipelining of the key-tile loop (tl.range), 1: none
    FINAL: tl.constexpr,  # one split: write o and lse, no partials and no merge
    ROUND_BF16: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    SPLIT_PROBS: tl.constexpr,  # 16-bit values: probabilities enter the dot as a 16-bit high and low part
    PDL: tl.constexpr,  # launched with programmatic dependent launch (_wait_for_previous_grid)
):
    """Program (sequence b, query row t, kv head h; split): partial softmax of the query heads of h's group
    at row t over their selected blocks, each block's keys and values loaded once for the whole group.

    The group's selections are its entries ``(member, slot)``, numbered ``member * used_slots + slot``;
    split s takes entries ``[s * entries_per_split, ...)``. A block is attended at its first entry, for
    every member that selected it (its readers), and skipped (nothing loaded) at the later ones: each
    (member, block) pair is counted once over all splits. Scores and the probability-weighted values
    are tensor-core dots of the group's rows against a key tile."""
    _wait_for_previous_grid(PDL)
    program = tl.program_id(0)
    split = tl.program_id(1)
    heads_kv = heads_q // group
    kv_head = program % heads_kv
    row = program // heads_kv % seqlen_q
    seq = program // heads_kv // seqlen_q
    position = tl.load(CacheSeqlens + seq) + appended - seqlen_q + row

    members = tl.arange(0, GROUP_PAD)
    member_ok = members < group
    heads = kv_head * group + members
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < head_dim
    q_ptrs = (
        Q
        + seq.to(tl.int64) * stride_q_batch
        + row.to(tl.int64) * stride_q_token
        + heads[:, None].to(tl.int64) * stride_q_head
        + dims[None, :] * stride_q_dim
    )
    query = tl.load(q_ptrs, mask=member_ok[:, None] & dim_ok[None, :], other=0.0)
    selection = Selected + seq.to(tl.int64) * stride_selected_batch + row.to(tl.int64) * stride_selected_token
    slots = tl.arange(0, SLOTS_PAD)
    entry_ok = member_ok[:, None] & (slots[None, :] < used_slots)
    group_blocks = tl.load(  # [GROUP_PAD, SLOTS_PAD], -1 past the group and the used slots
        selection + heads[:, None] * stride_selected_head + slots[None, :], mask=entry_ok, other=-1
    )
    entry_ids = members[:, None] * used_slots + slots[None, :]
    k_base = KCache + kv_head.to(tl.int64) * stride_k_head
    v_base = VCache + kv_head.to(tl.int64) * stride_v_head
    key_offsets = tl.arange(0, BLOCK_N)

    row_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)  # log2 domain
    row_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    first_entry = split * entries_per_split
    last_entry = tl.minimum(first_entry + entries_per_split, group * used_slots)
    # One flat loop over the key tiles of the split's entries (tiles_per_block per entry), pipelined by
    # tl.range's num_stages as in _decode_attn_partial_kernel.
    tiles_per_block = tl.cdiv(block_size, BLOCK_N)
    for tile in tl.range(first_entry * tiles_per_block, last_entry * tiles_per_block, num_stages=NUM_STAGES):
        entry = tile // tiles_per_block
        member = entry // used_slots
        block = tl.load(selection + (kv_head * group + member) * stride_selected_head + entry % used_slots)
        holders = group_blocks == block  # -1 (an unused slot) is never attended: block >= 0 below
        first = tl.sum((holders & (entry_ids < entry)).to(tl.int32)) == 0
        readers = (tl.sum(holders.to(tl.int32), axis=1) > 0) & member_ok
        in_block = (tile - entry * tiles_per_block) * BLOCK_N + key_offsets
        key_positions = block * block_size + in_block
        visible = first & (block >= 0) & (in_block < block_size) & (key_positions <= position)
        if PAGED:
            pages = tl.load(
                BlockTable + seq * stride_table_batch + key_positions // page_size, mask=visible, other=0
            )
            key_slots = key_positions % page_size
        else:
            pages = tl.zeros([BLOCK_N], dtype=tl.int32) + seq
            key_slots = key_positions
        # The NaN rule as in _decode_attn_partial_kernel: only visible keys are loaded (zeros elsewhere).
        mask = visible[:, None] & dim_ok[None, :]
        k_rows = pages.to(tl.int64) * stride_k_page + key_slots.to(tl.int64) * stride_k_slot
        keys = tl.load(k_base + k_rows[:, None] + dims[None, :] * stride_k_dim, mask=mask, other=0.0)
        scores = tile_dot(query, tl.trans(keys), DOT_PRECISION, DOT_IN_FLOAT32) * qk_scale
        seen = readers[:, None] & visible[None, :]
        scores = tl.where(seen, tl.fma(scores, 0.0, scores), float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(row_max - safe_max)
        v_rows = pages.to(tl.int64) * stride_v_page + key_slots.to(tl.int64) * stride_v_slot
        values = tl.load(v_base + v_rows[:, None] + dims[None, :] * stride_v_dim, mask=mask, other=0.0)
        if SPLIT_PROBS:
            # A 16-bit tile of probabilities would round each to 8 (bfloat16) or 11 bits; the high part
            # and the rest keep ~16, as the float32 products of _decode_attn_partial_kernel do.
            probs_high = probs.to(values.dtype)
            probs_low = (probs - probs_high.to(tl.float32)).to(values.dtype)
            weighted = tile_dot(probs_high, values, DOT_PRECISION, DOT_IN_FLOAT32)
            weighted += tile_dot(probs_low, values, DOT_PRECISION, DOT_IN_FLOAT32)
        else:
            weighted = tile_dot(probs, values, DOT_PRECISION, DOT_IN_FLOAT32)
        # A visible value vector with a NaN or an inf leaves an inf or a NaN in its readers' acc rows,
        # which poisons them after the loop; the other members have probability 0 at every key of the
        # tile, where 0 * inf is NaN: their rows keep acc as it was (rescale is 1 or acc 0 for them).
        acc = tl.where(readers[:, None], acc * rescale[:, None] + weighted, acc)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        row_max = new_max

    # The NaN rule for values, once per split (as in _decode_attn_partial_kernel).
    row_sum = tl.where(tl.sum((acc * 0.0 != 0.0).to(tl.int32), axis=1) > 0, float("nan"), row_sum)
    # Per member as in _decode_attn_partial_kernel: row_sum 0 where it saw no key, NaN where poisoned.
    seen_any = row_sum != 0.0
    out = acc / tl.where(seen_any, row_sum, 1.0)[:, None]
    lse = tl.where(seen_any, row_max + tl.log2(tl.where(seen_any, row_sum, 1.0)), float("-inf"))
    out_mask = member_ok[:, None] & dim_ok[None, :]
    if FINAL:
        o_ptrs = (
            Out
            + seq.to(tl.int64) * stride_o_batch
            + row.to(tl.int64) * stride_o_token
            + heads[:, None].to(tl.int64) * stride_o_head
            + dims[None, :] * stride_o_dim
        )
        if ROUND_BF16:
            out = _bfloat16_nearest(out)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=out_mask)
        lse_ptrs = (
            Lse + seq.to(tl.int64) * stride_lse_batch + heads * stride_lse_head + row * stride_lse_token
        )
        tl.store(lse_ptrs, lse * _LN_2, mask=member_ok)
    else:
        # The merge kernel's pair (b, t, head) and split.
        pairs = (seq.to(tl.int64) * seqlen_q + row) * heads_q + heads
        partials = pairs * num_splits + split
        tl.store(PartialOut + partials[:, None] * head_dim + dims[None, :], out, mask=out_mask)
        tl.store(PartialLse + partials, lse, mask=member_ok)


@triton.jit
def _decode_merge_kernel(
    PartialOut,
    PartialLse,
    Out,
    Lse,  # float32 [batch, heads_q, seqlen_q]
    stride_o_batch,
    stride_o_token,
    stride_o_head,
    stride_o_dim,
    stride_lse_batch,
    stride_lse_head,
    stride_lse_token,
    seqlen_q,
    heads_q,
    head_dim,
    num_splits,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (_wait_for_previous_grid)
):
    """Program (pair (b, t, head)): o and lse of the row from its splits' partials."""
    _wait_for_previous_grid(PDL)
    pair = tl.program_id(0)
    head = pair % heads_q
    seq = pair // heads_q // seqlen_q
    row = pair // heads_q % seqlen_q
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < head_dim
    partials = pair.to(tl.int64) * num_splits + splits
    lses = tl.load(PartialLse + partials, mask=split_ok, other=float("-inf"))
    top = tl.max(lses, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    # 0 for a split that saw nothing, NaN for a poisoned one (whether tl.max kept its NaN or not): the
    # total, the lse and every column of the output are then NaN.
    weights = tl.exp2(lses - safe_top)
    total = tl.sum(weights, axis=0)
    outs = tl.load(
        PartialOut + partials[:, None] * head_dim + dims[None, :],
        mask=split_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    seen = total != 0.0  # 0: no split saw a key; NaN: poisoned
    out = tl.sum(weights[:, None] * outs, axis=0) / tl.where(seen, total, 1.0)
    o_ptrs = (
        Out
        + seq.to(tl.int64) * stride_o_batch
        + row.to(tl.int64) * stride_o_token
        + head.to(tl.int64) * stride_o_head
        + dims * stride_o_dim
    )
    if ROUND_BF16:
        out = _bfloat16_nearest(out)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=dim_ok)
    lse = tl.where(seen, (safe_top + tl.log2(tl.where(seen, total, 1.0))) * _LN_2, float("-inf"))
    lse_ptr = Lse + seq.to(tl.int64) * stride_lse_batch + head * stride_lse_head + row * stride_lse_token
    tl.store(lse_ptr, lse)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _round_bf16_by_bits(dtype: torch.dtype) -> bool:
    """Round float32 to bfloat16 by the bits: only in the interpreter, whose ``.to`` truncates."""
    return dtype == torch.bfloat16 and interpreting()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


def decode_tiles(
    head_dim: int,
    block_size: int,
    topk: int,
    max_blocks: int,
    rows: int,
    group: int,
    seqlen_q: int,
    sm_count: int,
    config: DecodeConfig = DEFAULT_DECODE_CONFIG,
    *,
    element_size: int = 2,
    pdl_supported: bool = False,
) -> dict:
    """Every launch setting of the decode kernels for these shapes (the config's fields where set).

    rows: query (row, head) pairs of the batch, ``batch * seqlen_q * heads_q``; element_size: bytes of
    one element of the caches (2 for 16-bit, 4 for float32); pdl_supported: the device takes programmatic
    dependent launches (``ops.utils.supports_pdl``).
    """
    picks = min(topk - 1, max_blocks)
    running_topk = max(2, next_power_of_2(picks))
    head_dim_pad = head_dim_tile(head_dim)
    route_block_n = 64 if head_dim_pad <= 128 else 32
    route_block_n = max(16, min(route_block_n, next_power_of_2(max_blocks)), running_topk)
    # Pairs per router program: the group's heads of a few rows (tl.dot needs 16 rows at least).
    route_block_m = config.route_block_m or max(16, min(64, next_power_of_2(seqlen_q * group)))
    # Pairs each program routes (the dot's rows past them are padding): fewer than BLOCK_M only where the
    # group's pairs are fewer (one-token steps of group < 16).
    route_rows = min(route_block_m, next_power_of_2(seqlen_q * group))
    route = dict(
        BLOCK_M=route_block_m,
        ROWS=route_rows,
        BLOCK_N=config.route_block_n or route_block_n,
        # 2 stages: 3 stages of float32 sums tiles spill on sm_90 (tools/compile_hopper.py). The warps
        # follow the splits (below).
        num_stages=config.route_num_stages or 2,
    )
    # Split the centroid tiles of a row tile when the router alone would leave most SMs idle (small
    # batches of long caches: one program per kv head would walk every centroid alone), towards about
    # two programs per SM, as the attention's splits; each split keeps a quarter of the tiles, 1 to 4 of
    # them (one-row programs: below), and the route merge kernel, or the by-head attention, takes every
    # split's list at once (hence at most MAX_ROUTE_SPLITS of them). Measured (benchmarks/NOTES.md,
    # "Decode launch settings swept"): at 4 tiles (32K, batch 8) one tile per split took the router from
    # 23.7 to 10.4 us; at 16 tiles, splits of 4 or 2 tiles route alike.
    centroid_tiles = -(-max_blocks // route["BLOCK_N"])
    route_programs = -(-seqlen_q * group // route["BLOCK_M"]) * max(1, rows // max(1, seqlen_q * group))
    if route_programs >= sm_count or centroid_tiles < 2:  # (also: no queries, route_programs 0)
        block_splits = 1
    elif route["ROWS"] == 1:
        # Programs of one row (2 warps) split towards 8 per SM, down to one tile each: at batch 8, 16 / 16
        # heads, 8 splits of 2 tiles (128K) and 4 of 1 (32K) routed faster than 3 and 2 (NOTES, "The
        # decode router's top-k by maxima").
        block_splits = min(-(-8 * sm_count // route_programs), centroid_tiles, MAX_ROUTE_SPLITS)
    else:
        least_tiles = min(4, max(1, centroid_tiles // 4))
        block_splits = min(
            -(-2 * sm_count // route_programs), centroid_tiles // least_tiles, MAX_ROUTE_SPLITS
        )
    block_splits = min(config.route_block_splits or block_splits, centroid_tiles)
    tiles_per_split = -(-centroid_tiles // block_splits)
    block_splits = -(-centroid_tiles // tiles_per_split)  # no split left without a tile
    # 8 warps for full tiles: 4 spill at head_dim 128 (bfloat16) and 64 (float32) on sm_90
    # (tools/compile_hopper.py). Tiles of fewer rows take 4 (no spills at head_dim 128; benchmarks/NOTES.md,
    # "The decode router on the group's rows only"). Tiles of one row take 2 (more programs per SM),
    # except where a launch of fewer programs than SMs walks its tiles unsplit: there one program's path
    # is the kernel's time, and 4 warps shorten it (NOTES, "The decode router's top-k by maxima").
    if route_rows == 1:
        route_warps = 4 if block_splits == 1 and route_programs < sm_count else 2
    else:
        route_warps = 4 if route_rows < route_block_m else 8
    route["num_warps"] = config.route_num_warps or route_warps
    used_slots = min(topk, max_blocks)
    if config.attn_by_group is None:
        attn_by_group = DEFAULT_ATTN_BY_GROUP and group > 1
    else:
        attn_by_group = bool(config.attn_by_group)
    if attn_by_group:
        # Tiles of up to 128 keys (a B=128 block per tile) within GROUP_TILE_BYTES: at head_dim 128 in bf16
        # 128 beat 64 and 32 at every measured shape (benchmarks/NOTES.md, "Decode attention by kv head
        # group").
        widest = GROUP_TILE_BYTES // (head_dim_pad * element_size)
        attn_block_n = config.attn_block_n or max(16, min(next_power_of_2(block_size), widest, 128))
    else:
        # Tiles of 8192 elements, at most 128 keys: 64 keys at head_dim 128; 128 at head_dim 64, which took
        # the 16/16-head d 64 attention 20-25% faster at batch 8-64 (benchmarks/NOTES.md, "The by-head
        # attention's key tiles at head_dim 64").
        attn_block_n = config.attn_block_n or max(
            16, min(next_power_of_2(block_size), 8192 // head_dim_pad, 128)
        )
    if attn_by_group and attn_block_n < 16 and not interpreting():
        raise ValueError(f"attn_block_n must be >= 16 with attn_by_group (a tl.dot tile), got {attn_block_n}")
    if attn_by_group:
        # Programs per (sequence, row, kv head); a split takes a share of the group's entries (query head,
        # slot). Towards about four programs per SM (two resident at a time at head_dim 128: 208 registers,
        # 78 KB of shared memory), measured against 4 and 16 splits (NOTES, as above).
        entries = group * used_slots
        programs = rows // group
        num_splits = config.num_splits or max(1, min(entries, -(-4 * sm_count // max(programs, 1))))
        num_splits = min(num_splits, entries)
        entries_per_split = -(-entries // num_splits)
        num_splits = -(-entries // entries_per_split)  # no split left without an entry
        slots_per_split = None
        attention = dict(
            BLOCK_N=attn_block_n,
            num_warps=config.attn_num_warps or 4,
            NUM_STAGES=config.attn_num_stages or 2,
        )
    else:
        # Split the selected blocks until the grid fills the device about twice (shapes only).
        num_splits = config.num_splits or max(1, min(used_slots, -(-2 * sm_count // max(rows, 1))))
        num_splits = min(num_splits, used_slots)
        slots_per_split = -(-used_slots // num_splits)
        num_splits = -(-used_slots // slots_per_split)  # no split left without a slot
        entries_per_split = None
        attention = dict(
            BLOCK_N=attn_block_n,
            num_warps=config.attn_num_warps or (8 if attn_block_n * head_dim_pad >= 64 * 256 else 4),
            # 2 stages: the next K and V tile in flight while one is reduced, 35 KB of shared memory at
            # head_dim 128 (bf16), 5 programs per SM with 92 registers; 3 stages take 68 KB (3 per SM).
            NUM_STAGES=config.attn_num_stages or 2,
        )
    return dict(
        fold_append=DEFAULT_FOLD_APPEND if config.fold_append is None else bool(config.fold_append),
        # Selection slots past the running list, written in tiles of this many (_store_selection).
        tail_tile=min(64, max(16, next_power_of_2(max(1, topk - running_topk)))),
        route_merge_in_attention=block_splits > 1
        and not attn_by_group
        and (
            DEFAULT_ROUTE_MERGE_IN_ATTENTION
            if config.route_merge_in_attention is None
            else bool(config.route_merge_in_attention)
        ),
        pdl=pdl_supported and (DEFAULT_PDL if config.pdl is None else bool(config.pdl)),
        attn_by_group=attn_by_group,
        entries_per_split=entries_per_split,
        picks=picks,
        running_topk=running_topk,
        head_dim_pad=head_dim_pad,
        route=route,
        block_splits=block_splits,
        tiles_per_split=tiles_per_split,
        used_slots=used_slots,
        num_splits=num_splits,
        slots_per_split=slots_per_split,
        attention=attention,
    )


def check_decode_supported(q: torch.Tensor, block_size: int, topk: int, max_blocks: int, batch: int) -> None:
    """Raise ValueError naming what the Triton decode kernels do not run (before any launch)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"the Triton decode kernels support float16, bfloat16 and float32, got {q.dtype}; "
            "use backend='reference' for float64"
        )
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the Triton decode kernels support head_dim 1..{MAX_HEAD_DIM}, got {head_dim}")
    picks = min(topk - 1, max_blocks)
    if next_power_of_2(picks) > MAX_RUNNING_TOPK:
        raise ValueError(
            f"the Triton decode router keeps at most {MAX_RUNNING_TOPK} blocks per query on chip: "
            f"min(topk - 1, ceil(capacity / block_size)) must be <= {MAX_RUNNING_TOPK}, got topk {topk}, "
            f"{max_blocks} blocks of {block_size}"
        )
    if batch > MAX_GRID_DIM:
        raise ValueError(f"the Triton decode kernels support at most {MAX_GRID_DIM} sequences, got {batch}")


def _append_strides(k, v, k_cache, v_cache, block_table) -> dict:
    """The strides ``_append_block`` takes (``_APPEND_STRIDES``), of the new k, v, the caches and the
    block table (0 for a contiguous cache)."""
    values = (*k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride())
    values += (block_table.stride(0) if block_table is not None else 0,)
    return dict(zip(_APPEND_STRIDES, values, strict=True))


def decode_append(
    k, v, k_cache, v_cache, block_sums, cache_seqlens, block_table, block_size, capacity, *, pdl=False
) -> None:
    """Write k, v ``[batch, T, Hkv, D]`` at positions ``cache_seqlens[b] ..`` and add the keys to block_sums
    (in place; cache_seqlens is not advanced); ``pdl``: a programmatic dependent launch."""
    batch, seqlen_q, heads_kv, head_dim = k.shape
    if batch == 0 or seqlen_q == 0:
        return
    head_dim_pad = next_power_of_2(head_dim)
    paged = block_table is not None
    grid = (triton.cdiv(seqlen_q, block_size) + 1, batch, heads_kv)
    _decode_append_kernel[grid](
        KNew=k,
        VNew=v,
        KCache=k_cache,
        VCache=v_cache,
        BlockSums=block_sums,
        CacheSeqlens=cache_seqlens,
        BlockTable=block_table,
        stride_new_batch=k.stride(0),
        stride_new_token=k.stride(1),
        stride_new_head=k.stride(2),
        stride_new_dim=k.stride(3),
        stride_vnew_batch=v.stride(0),
        stride_vnew_token=v.stride(1),
        stride_vnew_head=v.stride(2),
        stride_vnew_dim=v.stride(3),
        stride_k_page=k_cache.stride(0),
        stride_k_slot=k_cache.stride(1),
        stride_k_head=k_cache.stride(2),
        stride_k_dim=k_cache.stride(3),
        stride_v_page=v_cache.stride(0),
        stride_v_slot=v_cache.stride(1),
        stride_v_head=v_cache.stride(2),
        stride_v_dim=v_cache.stride(3),
        stride_sums_batch=block_sums.stride(0),
        stride_sums_block=block_sums.stride(1),
        stride_sums_head=block_sums.stride(2),
        stride_sums_dim=block_sums.stride(3),
        stride_table_batch=block_table.stride(0) if paged else 0,
        seqlen_q=seqlen_q,
        block_size=block_size,
        page_size=k_cache.shape[1],
        capacity=capacity,
        max_blocks=block_sums.shape[1],
        head_dim=head_dim,
        PAGED=paged,
        # At most 4096 elements of k per tile, whole decode steps and small blocks in one.
        TOKEN_TILE=max(2, min(next_power_of_2(min(seqlen_q, block_size)), 4096 // head_dim_pad, 64)),
        HEAD_DIM_PAD=head_dim_pad,
        PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )


def decode_route(
    q, block_sums, cache_seqlens, block_size, topk, appended, tiles, out=None, fold=None
) -> torch.Tensor:
    """Selections int32 ``[batch, T, Hq, topk]`` of the queries against block_sums (after the append):
    candidates ascending, then the own block, then -1. ``fold``: None, or for one new token per sequence
    (T 1) ``(k, v, k_cache, v_cache, block_table, capacity)``, which the route kernel appends itself
    (``appended`` must then be 1)."""
    selected, _ = _launch_route(q, block_sums, cache_seqlens, block_size, topk, appended, tiles, out, fold)
    return selected


def _launch_route(
    q, block_sums, cache_seqlens, block_size, topk, appended, tiles, out=None, fold=None, merge=True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``decode_route``'s launches; with ``merge`` False and a split router the route merge kernel is not
    launched and the selections are left unwritten: returns them with the splits' lists (None without
    splits), for the attention to merge (``decode_attend``'s ``split_keys``)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = block_sums.shape[2]
    group = heads_q // heads_kv
    selected = (
        torch.empty(batch, seqlen_q, heads_q, topk, dtype=torch.int32, device=q.device)
        if out is None
        else out
    )
    route = tiles["route"]
    row_tiles = triton.cdiv(seqlen_q * group, route["BLOCK_M"])
    if row_tiles == 0 or batch == 0:
        return selected, None
    running_topk, block_splits = tiles["running_topk"], tiles["block_splits"]
    split_keys = None
    if block_splits > 1:
        split_keys = torch.empty(
            row_tiles,
            batch,
            heads_kv,
            block_splits,
            route["ROWS"],
            running_topk,
            dtype=torch.int64,
            device=q.device,
        )
    tail_tile = tiles["tail_tile"]
    if fold is not None:
        if seqlen_q != 1 or appended != 1:
            raise ValueError(f"the folded append takes one new token per sequence, got seqlen_q {seqlen_q}")
        k, v, k_cache, v_cache, block_table, capacity = fold
        paged = block_table is not None
        append = dict(
            KNew=k,
            VNew=v,
            KCache=k_cache,
            VCache=v_cache,
            BlockTable=block_table,
            **_append_strides(k, v, k_cache, v_cache, block_table),
            page_size=k_cache.shape[1],
            capacity=capacity,
            max_blocks=block_sums.shape[1],
            FOLD_APPEND=True,
            PAGED=paged,
            APPEND_TILE=2,  # one token (TOKEN_TILE's floor in decode_append)
        )
    else:
        append = dict(
            KNew=None,
            VNew=None,
            KCache=None,
            VCache=None,
            BlockTable=None,
            **dict.fromkeys(_APPEND_STRIDES, 0),
            page_size=1,
            capacity=0,
            max_blocks=0,
            FOLD_APPEND=False,
            PAGED=False,
            APPEND_TILE=2,
        )
    # With the append folded in, heads_kv more programs per (row tile, sequence) append (row tile 0's).
    append_programs = heads_kv if fold is not None else 0
    _decode_route_kernel[(row_tiles, batch, heads_kv * block_splits + append_programs)](
        Q=q,
        BlockSums=block_sums,
        CacheSeqlens=cache_seqlens,
        Selected=selected,
        SplitKeys=split_keys,
        **append,
        stride_q_batch=q.stride(0),
        stride_q_token=q.stride(1),
        stride_q_head=q.stride(2),
        stride_q_dim=q.stride(3),
        stride_sums_batch=block_sums.stride(0),
        stride_sums_block=block_sums.stride(1),
        stride_sums_head=block_sums.stride(2),
        stride_sums_dim=block_sums.stride(3),
        stride_selected_batch=selected.stride(0),
        stride_selected_token=selected.stride(1),
        stride_selected_head=selected.stride(2),
        seqlen_q=seqlen_q,
        appended=appended,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        topk=topk,
        picks=tiles["picks"],
        heads_kv=heads_kv,
        block_splits=block_splits,
        tiles_per_split=tiles["tiles_per_split"],
        SPLIT_BLOCKS=block_splits > 1,
        RUNNING_TOPK=running_topk,
        HEAD_DIM_PAD=tiles["head_dim_pad"],
        TAIL_TILE=tail_tile,
        DOT_PRECISION=dot_precision(q.dtype),
        DOT_IN_FLOAT32=dot_in_float32(q.dtype),  # see ops.utils.dot_in_float32
        SUMS_ROUTE=q.dtype == torch.float32,
        INSERT_ROUNDS=8,
        ROUND_BF16=_round_bf16_by_bits(q.dtype),
        PDL=tiles["pdl"],
        **route,
        launch_pdl=tiles["pdl"],
    )
    if block_splits > 1 and merge:
        _decode_route_merge_kernel[(row_tiles, batch, heads_kv)](
            SplitKeys=split_keys,
            CacheSeqlens=cache_seqlens,
            Selected=selected,
            stride_selected_batch=selected.stride(0),
            stride_selected_token=selected.stride(1),
            stride_selected_head=selected.stride(2),
            seqlen_q=seqlen_q,
            appended=appended,
            group=group,
            block_size=block_size,
            topk=topk,
            picks=tiles["picks"],
            heads_kv=heads_kv,
            block_splits=block_splits,
            RUNNING_TOPK=running_topk,
            SPLITS_PAD=next_power_of_2(block_splits),
            BLOCK_M=route["BLOCK_M"],
            ROWS=route["ROWS"],
            TAIL_TILE=tail_tile,
            PDL=tiles["pdl"],
            num_warps=4,
            launch_pdl=tiles["pdl"],
        )
    return selected, split_keys


def decode_attend(
    q,
    k_cache,
    v_cache,
    selected,
    cache_seqlens,
    block_table,
    block_size,
    appended,
    scale,
    tiles,
    split_keys=None,
):
    """o like q and the float32 lse ``[batch, Hq, T]`` of the queries over their selected blocks. With
    ``split_keys`` (the router's unmerged split lists, ``_launch_route``; by-head attention only) each
    attention program first merges its pair's selection into ``selected``."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads_q, seqlen_q, dtype=torch.float32, device=q.device)
    pairs = batch * seqlen_q * heads_q
    if pairs == 0:
        return out, lse
    num_splits = tiles["num_splits"]
    final = num_splits == 1  # the partial kernel writes o and lse itself: no scratch, no merge launch
    partial_out = partial_lse = None
    if not final:
        partial_out = torch.empty(pairs, num_splits, head_dim, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(pairs, num_splits, dtype=torch.float32, device=q.device)
    paged = block_table is not None
    head_dim_pad = next_power_of_2(head_dim)
    group = heads_q // heads_kv
    if tiles["attn_by_group"]:
        kernel, programs = _decode_attn_group_kernel, pairs // group
        by_kind = dict(
            entries_per_split=tiles["entries_per_split"],
            GROUP_PAD=max(16, next_power_of_2(group)),
            SLOTS_PAD=next_power_of_2(tiles["used_slots"]),
            DOT_PRECISION=dot_precision(q.dtype),
            DOT_IN_FLOAT32=dot_in_float32(q.dtype),
            SPLIT_PROBS=q.dtype != torch.float32,
        )
        attention_dim_pad = tiles["head_dim_pad"]  # head_dim_tile: a tl.dot operand, 16 columns at least
    else:
        kernel, programs = _decode_attn_partial_kernel, pairs
        attention_dim_pad = head_dim_pad
        route = tiles["route"]
        by_kind = dict(
            slots_per_split=tiles["slots_per_split"],
            SplitKeys=split_keys,
            batch=batch,
            route_splits=tiles["block_splits"],
            topk=selected.shape[3],
            picks=tiles["picks"],
            ROUTE_BLOCK_M=route["BLOCK_M"],
            ROUTE_ROWS=route["ROWS"],
            RUNNING_TOPK=tiles["running_topk"],
            SPLITS_PAD=next_power_of_2(tiles["block_splits"]),
            TAIL_TILE=tiles["tail_tile"],
            MERGE_ROUTE=split_keys is not None,
        )
    kernel[(programs, num_splits)](
        Q=q,
        KCache=k_cache,
        VCache=v_cache,
        Selected=selected,
        CacheSeqlens=cache_seqlens,
        BlockTable=block_table,
        PartialOut=partial_out,
        PartialLse=partial_lse,
        Out=out if final else None,
        Lse=lse if final else None,
        stride_q_batch=q.stride(0),
        stride_q_token=q.stride(1),
        stride_q_head=q.stride(2),
        stride_q_dim=q.stride(3),
        stride_k_page=k_cache.stride(0),
        stride_k_slot=k_cache.stride(1),
        stride_k_head=k_cache.stride(2),
        stride_k_dim=k_cache.stride(3),
        stride_v_page=v_cache.stride(0),
        stride_v_slot=v_cache.stride(1),
        stride_v_head=v_cache.stride(2),
        stride_v_dim=v_cache.stride(3),
        stride_table_batch=block_table.stride(0) if paged else 0,
        stride_selected_batch=selected.stride(0),
        stride_selected_token=selected.stride(1),
        stride_selected_head=selected.stride(2),
        stride_o_batch=out.stride(0),
        stride_o_token=out.stride(1),
        stride_o_head=out.stride(2),
        stride_o_dim=out.stride(3),
        stride_lse_batch=lse.stride(0),
        stride_lse_head=lse.stride(1),
        stride_lse_token=lse.stride(2),
        seqlen_q=seqlen_q,
        heads_q=heads_q,
        group=group,
        appended=appended,
        block_size=block_size,
        page_size=k_cache.shape[1],
        head_dim=head_dim,
        used_slots=tiles["used_slots"],
        num_splits=num_splits,
        qk_scale=scale * LOG2_E,
        PAGED=paged,
        HEAD_DIM_PAD=attention_dim_pad,
        FINAL=final,
        ROUND_BF16=_round_bf16_by_bits(q.dtype),
        PDL=tiles["pdl"],
        **by_kind,
        **tiles["attention"],
        launch_pdl=tiles["pdl"],
    )
    if final:
        return out, lse
    _decode_merge_kernel[(pairs,)](
        PartialOut=partial_out,
        PartialLse=partial_lse,
        Out=out,
        Lse=lse,
        stride_o_batch=out.stride(0),
        stride_o_token=out.stride(1),
        stride_o_head=out.stride(2),
        stride_o_dim=out.stride(3),
        stride_lse_batch=lse.stride(0),
        stride_lse_head=lse.stride(1),
        stride_lse_token=lse.stride(2),
        seqlen_q=seqlen_q,
        heads_q=heads_q,
        head_dim=head_dim,
        num_splits=num_splits,
        SPLITS_PAD=max(2, next_power_of_2(num_splits)),
        HEAD_DIM_PAD=head_dim_pad,
        ROUND_BF16=_round_bf16_by_bits(q.dtype),
        PDL=tiles["pdl"],
        num_warps=4 if head_dim_pad * num_splits >= 4096 else 2,
        launch_pdl=tiles["pdl"],
    )
    return out, lse


def moba_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_sums: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    block_table: torch.Tensor | None,
    softmax_scale: float,
    config: DecodeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moba_attn_with_kvcache``'s Triton backend (arguments checked by the caller; ``block_size`` at
    most the capacity). Appends k, v (if given) in place, routes, attends; returns o like q and the
    float32 lse ``[batch, Hq, T]``. Reads no tensor value on the host."""
    config = DEFAULT_DECODE_CONFIG if config is None else config
    batch, seqlen_q, heads_q, head_dim = q.shape
    # The kernels index lengths and page ids by position (no-ops for the usual contiguous tensors).
    cache_seqlens = cache_seqlens.contiguous()
    block_table = None if block_table is None else block_table.contiguous()
    capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    max_blocks = block_sums.shape[1]
    check_decode_supported(q, block_size, topk, max_blocks, batch)
    rows = batch * seqlen_q * heads_q
    tiles = decode_tiles(
        head_dim,
        block_size,
        topk,
        max_blocks,
        rows,
        heads_q // k_cache.shape[2],
        seqlen_q,
        _sm_count(q.device),
        config,
        element_size=q.element_size(),
        pdl_supported=supports_pdl(q.device),
    )
    appended = 0 if k is None else seqlen_q
    # One new token per sequence: the route kernel appends it (DecodeConfig.fold_append), no append launch.
    fold = None
    if k is not None and seqlen_q == 1 and tiles["fold_append"] and batch > 0:
        fold = (k, v, k_cache, v_cache, block_table, capacity)
    elif k is not None:
        decode_append(
            k,
            v,
            k_cache,
            v_cache,
            block_sums,
            cache_seqlens,
            block_table,
            block_size,
            capacity,
            pdl=tiles["pdl"],
        )
    # The by-head attention may merge the router's split lists itself (tiles["route_merge_in_attention"]).
    merge_in_attention = tiles["route_merge_in_attention"]
    selected, split_keys = _launch_route(
        q,
        block_sums,
        cache_seqlens,
        block_size,
        topk,
        appended,
        tiles,
        fold=fold,
        merge=not merge_in_attention,
    )
    return decode_attend(
        q,
        k_cache,
        v_cache,
        selected,
        cache_seqlens,
        block_table,
        block_size,
        appended,
        softmax_scale,
        tiles,
        split_keys=split_keys if merge_in_attention else None,
    )
