"""The MoBA router in Triton: block centroids and a fused, tiled top-k (paper section 4.2(1), "Flash TopK").

Two kernels, no host synchronisation between or inside them (CUDA-graph capturable):

1. ``_block_centroids_kernel``: the mean of each key block over its real tokens, accumulated in float32
   and stored in k's dtype (float32 keys: the block sum, and the top-k kernel divides each score by the
   block's length, as the reference does, so that ties of real arithmetic stay ties, e.g. small-integer
   keys in blocks of 3 or 6 tokens). Blocks restart at every sequence. Centroids are stored packed: block j of
   sequence b lives at row ``cu_seqlens_k[b] // block_size + b + j`` of a ``[total_k // block_size +
   batch, Hkv, D]`` tensor. That row needs no prefix sum over the batch, and rows of different sequences
   never overlap (``floor((c + L) / B) + 1 >= floor(c / B) + ceil(L / B)``); the at most ``batch`` rows
   between sequences are never written nor read.

2. ``_route_topk_kernel``: one program per (query tile, sequence, query head). It scores its query tile
   against one tile of centroids at a time with ``tl.dot`` (float32 accumulation) and keeps each row's
   running top-k in registers, so the ``N x num_blocks`` score matrix never exists in memory. Scores and
   block ids are packed into one int64 key per (row, block): the high 32 bits hold an order-preserving
   integer image of the float32 score, the low 32 bits the block id, so comparing keys compares scores
   and, on equal scores, lets the later block win (the contract's tie rule). Centroid tiles are visited
   latest first, and a tile's score can only matter to a row if it beats the row's current picks-th
   best (an equal score belongs to an earlier block and loses the tie). Per tile, whichever is cheapest:
   - no row has such a score: nothing to do (the common case once the lists have filled);
   - at most ``INSERT_ROUNDS`` per row: insert the tile's best key of each row that many times (a
     ``tl.max`` over the tile and a bitonic merge of the short list per round). The tile stays int32
     here: an order-preserving integer image of each score (the keys' high half), and only each round's
     winners are packed into int64 keys;
   - otherwise cut the tile to its best ``RUNNING_TOPK`` per row (``tl.topk``, a bitonic network,
     descending) and merge with the running list (kept ascending) by a bitonic split: the elementwise
     maximum of an ascending and a descending list holds the best of both and is bitonic, so one
     ``tl.bitonic_merge`` sorts it again.

Causal rule (bottom-right): query i of a sequence with T queries and S keys sits at key position
``p = i + S - T``; its own block ``p // block_size`` is always selected and counts as one of ``topk``;
candidates are the blocks ``j < own block`` (they end before the own block starts); ``p < 0`` selects
nothing. A query tile visits only the centroid tiles below the own block of its last row. Non-causal:
the best ``topk`` of all blocks, the partial last block included.

Output (``moba_select``'s contract): int32 ``[total_q, Hq, topk]`` block ids local to each sequence,
ascending, -1 in unused slots at the end. Since the own block is later than every candidate, it is
simply written after the sorted candidates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmoba._checks import check_positive_int
from flashmoba.ops.config import DEFAULT_CONFIG, KernelConfig
from flashmoba.ops.utils import (
    MAX_HEAD_DIM,
    dot_in_float32,
    dot_precision,
    head_dim_tile,
    next_power_of_2,
)

# Limits of the Triton router (checked before any launch; MAX_HEAD_DIM as the attention's).
MAX_RUNNING_TOPK = 128  # blocks kept on chip per query row: min(topk, number of blocks), rounded up to 2^n
MAX_GRID_DIM = 65535  # CUDA's limit on grid dimensions 1 and 2 (sequences, heads)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# An int64 below every packed (score, block id) key: marks an empty slot of a running top-k list.
EMPTY_KEY = tl.constexpr(-(2**63))
# The smallest ordered score, that of the NaN with every bit set: marks the scores of a tile that may not
# enter a list on the insert path (which therefore never selects a block of that exact score).
NOT_ENTERING = tl.constexpr(-(2**31))


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _block_centroids_kernel(
    K,
    Centroids,
    CuSeqlensK,  # None for the padded layout (IS_VARLEN False)
    seqlen_k,  # keys per sequence of the padded layout (unused when IS_VARLEN)
    stride_k_batch,
    stride_k_token,
    stride_k_head,
    stride_k_dim,
    stride_centroid_row,
    stride_centroid_head,
    head_dim,
    block_size,
    IS_VARLEN: tl.constexpr,
    TOKEN_TILE: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    EVEN_HEAD_DIM: tl.constexpr,
    STORE_SUMS: tl.constexpr,
):
    """Program (block j, sequence b, kv head h): centroid of keys [j*B, min((j+1)*B, S_b)) of head h.

    With STORE_SUMS the block's sum is stored instead and the top-k kernel divides each score by the
    block's length (float32, as the reference does, so that ties of real arithmetic stay exact ties).
    """
    block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    if IS_VARLEN:
        seq_start = tl.load(CuSeqlensK + seq)
        seq_len = tl.load(CuSeqlensK + seq + 1) - seq_start
        k_base = K + seq_start.to(tl.int64) * stride_k_token
    else:
        seq_start = seq * seqlen_k
        seq_len = seqlen_k
        k_base = K + seq.to(tl.int64) * stride_k_batch
    k_base += head.to(tl.int64) * stride_k_head

    block_start = block * block_size
    # <= 0 for programs past the sequence's last block (the grid covers the longest sequence).
    block_len = tl.minimum(block_size, seq_len - block_start)
    dims = tl.arange(0, HEAD_DIM_PAD)
    if EVEN_HEAD_DIM:  # no mask along the head dim keeps the loads vectorised
        dim_ok = tl.full([HEAD_DIM_PAD], 1, dtype=tl.int1)
    else:
        dim_ok = dims < head_dim
    token_offsets = tl.arange(0, TOKEN_TILE)

    block_sum = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for tile_start in range(0, block_len, TOKEN_TILE):
        in_block = tile_start + token_offsets
        tokens = (block_start + in_block).to(tl.int64)
        mask = (in_block < block_len)[:, None] & dim_ok[None, :]
        key_ptrs = k_base + tokens[:, None] * stride_k_token + dims[None, :] * stride_k_dim
        keys = tl.load(key_ptrs, mask=mask, other=0.0)
        block_sum += tl.sum(keys.to(tl.float32), axis=0)

    if STORE_SUMS:
        centroid = block_sum
    else:
        centroid = block_sum / tl.maximum(block_len, 1).to(tl.float32)
    row = (seq_start // block_size + seq + block).to(tl.int64)
    centroid_ptrs = Centroids + row * stride_centroid_row + head.to(tl.int64) * stride_centroid_head
    centroid_ptrs += dims
    tl.store(centroid_ptrs, centroid.to(Centroids.dtype.element_ty), mask=dim_ok & (block_len > 0))


@triton.jit
def _ordered_scores(block_scores):
    """An int32 image of float32 scores that orders as the packed keys do: by value, -0.0 equal to +0.0,
    every NaN above +inf (ties to the later block), as ``reference._route_chunk``'s descending sort."""
    # torch.sort sees -0.0 == +0.0; make them one value so the tie rule decides between them.
    block_scores = tl.where(block_scores == 0.0, 0.0, block_scores)
    # A NaN's sign and payload depend on the machine (x86 makes inf - inf and inf * 0 a negative NaN,
    # which the bits would rank below -inf): every NaN becomes the one positive quiet NaN.
    block_scores = tl.where(block_scores == block_scores, block_scores, float("nan"))
    bits = block_scores.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip their magnitude bits (the sign bit stays).
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _score_keys(ordered_scores, block_ids):
    """Pack ordered scores and block ids (broadcastable, e.g. [M, N] and [1, N]) into int64 keys ordered by
    (score, block id)."""
    return (ordered_scores.to(tl.int64) << 32) | block_ids.to(tl.int64)


@triton.jit
def _key_score(keys):
    """The float32 score of packed keys (NaN for EMPTY_KEY): _ordered_scores's transform is an involution."""
    ordered = (keys >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _merge_tile(running_topk, keys, RUNNING_TOPK: tl.constexpr):
    """Best RUNNING_TOPK of an ascending running list [M, K] and a tile's keys [M, N], ascending."""
    tile_best = tl.topk(keys, RUNNING_TOPK, dim=1)  # descending
    # Bitonic split: max(ascending, descending) keeps the best K of both, as a bitonic row.
    return tl.bitonic_merge(tl.maximum(running_topk, tile_best), dim=1, descending=False)


@triton.jit
def _insert_best(running_topk, entering, block_ids, rounds, RUNNING_TOPK: tl.constexpr):
    """Move the best entering score of each row of a tile ([M, N] ordered scores, NOT_ENTERING elsewhere)
    into its running list, `rounds` times: cheaper than a merge when few keys of the tile can enter any list.
    Only each round's [M] winners are packed into int64 keys."""
    columns = tl.arange(0, RUNNING_TOPK)
    smallest = columns[None, :] == 0
    for _ in range(rounds):
        row_best = tl.max(entering, axis=1)
        # Equal scores: the later block wins, as in the key order.
        best_block = tl.max(tl.where(entering == row_best[:, None], block_ids[None, :], -1), axis=1)
        entering = tl.where(block_ids[None, :] == best_block[:, None], NOT_ENTERING, entering)
        best_key = tl.where(row_best == NOT_ENTERING, EMPTY_KEY, _score_keys(row_best, best_block))
        # Overwrite the smallest entry if beaten: the row is then a rotated bitonic sequence.
        running_topk = tl.where(smallest, tl.maximum(running_topk, best_key[:, None]), running_topk)
        running_topk = tl.bitonic_merge(running_topk, dim=1, descending=False)
    return running_topk


@triton.jit
def _route_topk_kernel(
    Q,
    Centroids,
    Selected,
    PathCounts,  # int32 [4] with COUNT_PATHS (else None): tiles skipped, inserted, merged; insertion rounds
    CuSeqlensQ,  # None for the padded layout (IS_VARLEN False)
    CuSeqlensK,
    seqlen_q,  # padded layout only (unused when IS_VARLEN)
    seqlen_k,
    stride_q_batch,
    stride_q_token,
    stride_q_head,
    stride_q_dim,
    stride_centroid_row,
    stride_centroid_head,
    stride_centroid_dim,
    stride_selected_token,
    stride_selected_head,
    head_dim,
    block_size,
    heads_per_kv,
    topk,
    picks,  # candidates each row keeps: topk - 1 (causal) or topk, at most RUNNING_TOPK
    IS_VARLEN: tl.constexpr,
    CAUSAL: tl.constexpr,
    RUNNING_TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    EVEN_HEAD_DIM: tl.constexpr,
    TAIL_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
    CENTROIDS_ARE_SUMS: tl.constexpr,
    FILTER: tl.constexpr,
    INSERT_ROUNDS: tl.constexpr,
    COUNT_PATHS: tl.constexpr,
):
    """Program (query tile, sequence b, query head h): selected blocks of BLOCK_M queries of head h."""
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // heads_per_kv
    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + seq)
        q_len = tl.load(CuSeqlensQ + seq + 1) - q_start
        k_start = tl.load(CuSeqlensK + seq)
        k_len = tl.load(CuSeqlensK + seq + 1) - k_start
        q_base = Q + q_start.to(tl.int64) * stride_q_token
    else:
        q_start = seq * seqlen_q
        q_len = seqlen_q
        k_start = seq * seqlen_k
        k_len = seqlen_k
        q_base = Q + seq.to(tl.int64) * stride_q_batch
    q_base += head.to(tl.int64) * stride_q_head
    centroid_base = Centroids + kv_head.to(tl.int64) * stride_centroid_head
    first_centroid_row = k_start // block_size + seq  # see _block_centroids_kernel
    num_blocks = (k_len + block_size - 1) // block_size

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    if CAUSAL:
        positions = rows + k_len - q_len
        own_block = tl.where(positions >= 0, positions // block_size, -1)
        candidate_limit = own_block  # candidates: blocks j < own block
    else:
        own_block = tl.full([BLOCK_M], -1, dtype=tl.int32)
        candidate_limit = tl.full([BLOCK_M], 0, dtype=tl.int32) + num_blocks
    candidate_limit = tl.where(row_ok, candidate_limit, 0)
    blocks_to_visit = tl.max(candidate_limit, axis=0)  # the causal rule skips later centroid tiles

    dims = tl.arange(0, HEAD_DIM_PAD)
    if EVEN_HEAD_DIM:  # no mask along the head dim: loads stay vectorised, the centroid loads pipelined
        dim_ok = tl.full([HEAD_DIM_PAD], 1, dtype=tl.int1)
    else:
        dim_ok = dims < head_dim
    q_ptrs = q_base + rows.to(tl.int64)[:, None] * stride_q_token + dims[None, :] * stride_q_dim
    queries = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_IN_FLOAT32:
        queries = queries.to(tl.float32)

    columns = tl.arange(0, RUNNING_TOPK)
    threshold_column = RUNNING_TOPK - picks  # a row's picks-th best, in an ascending list
    block_offsets = tl.arange(0, BLOCK_N)
    num_tiles = tl.where(picks > 0, tl.cdiv(blocks_to_visit, BLOCK_N), 0)

    # Ascending: the best key of a row sits in its last column.
    running_topk = tl.full([BLOCK_M, RUNNING_TOPK], EMPTY_KEY, dtype=tl.int64)
    tiles_inserted = 0  # path counters, kept only with COUNT_PATHS (a measurement aid)
    tiles_merged = 0
    insertion_rounds = 0
    for tile_index in range(0, num_tiles):
        # Latest tiles first: with attention's locality they raise the thresholds early.
        block_ids = (num_tiles - 1 - tile_index) * BLOCK_N + block_offsets
        centroid_ptrs = (
            centroid_base
            + (first_centroid_row + block_ids).to(tl.int64)[None, :] * stride_centroid_row
            + dims[:, None] * stride_centroid_dim
        )
        centroid_mask = dim_ok[:, None] & (block_ids < num_blocks)[None, :]
        centroids = tl.load(centroid_ptrs, mask=centroid_mask, other=0.0)
        if DOT_IN_FLOAT32:
            centroids = centroids.to(tl.float32)
        block_scores = tl.dot(queries, centroids, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if CENTROIDS_ARE_SUMS:
            block_lengths = tl.maximum(tl.minimum(block_size, k_len - block_ids * block_size), 1)
            block_scores = block_scores / block_lengths.to(tl.float32)[None, :]
        may_enter = block_ids[None, :] < candidate_limit[:, None]
        if FILTER:
            # Only a score above a row's picks-th best can change its top picks: tiles are visited latest
            # first, so an equal score belongs to an earlier block and loses the tie. When no row of the
            # tile has such a score, the sort is skipped.
            at_threshold = columns[None, :] == threshold_column
            threshold_key = tl.max(tl.where(at_threshold, running_topk, EMPTY_KEY), axis=1)
            below = block_scores <= _key_score(threshold_key)[:, None]  # False while a list has empty slots
            may_enter &= ~below
            rounds = tl.max(tl.sum(may_enter.to(tl.int32), axis=1), axis=0)
        else:
            rounds = INSERT_ROUNDS + 1
        if rounds > 0:
            ordered = _ordered_scores(block_scores)
            if rounds <= INSERT_ROUNDS:
                entering = tl.where(may_enter, ordered, NOT_ENTERING)
                running_topk = _insert_best(running_topk, entering, block_ids, rounds, RUNNING_TOPK)
                if COUNT_PATHS:
                    tiles_inserted += 1
                    insertion_rounds += rounds
            else:
                keys = tl.where(may_enter, _score_keys(ordered, block_ids[None, :]), EMPTY_KEY)
                running_topk = _merge_tile(running_topk, keys, RUNNING_TOPK)
                if COUNT_PATHS:
                    tiles_merged += 1
    if COUNT_PATHS:
        tl.atomic_add(PathCounts + 0, num_tiles - tiles_inserted - tiles_merged)
        tl.atomic_add(PathCounts + 1, tiles_inserted)
        tl.atomic_add(PathCounts + 2, tiles_merged)
        tl.atomic_add(PathCounts + 3, insertion_rounds)

    # Keep the best `picks` of each row, then list their block ids in ascending order.
    rank = RUNNING_TOPK - 1 - columns
    kept = (running_topk != EMPTY_KEY) & (rank < picks)[None, :]
    block_ids_kept = (running_topk & 0xFFFFFFFF).to(tl.int32)
    block_ids_kept = tl.sort(tl.where(kept, block_ids_kept, 0x7FFFFFFF), dim=1)
    kept_count = tl.sum(kept.to(tl.int32), axis=1)
    # The own block is later than every candidate: it goes right after them.
    has_own = own_block >= 0
    own_column = tl.where(has_own, kept_count, -1)

    out_base = Selected + (q_start + rows).to(tl.int64)[:, None] * stride_selected_token
    out_base += head.to(tl.int64) * stride_selected_head
    selected = tl.where(
        columns[None, :] < kept_count[:, None],
        block_ids_kept,
        tl.where(columns[None, :] == own_column[:, None], own_block[:, None], -1),
    )
    tl.store(out_base + columns[None, :], selected, mask=row_ok[:, None] & (columns < topk)[None, :])
    # Slots past the running list: the own block (when every running slot is kept) or -1.
    tail_offsets = tl.arange(0, TAIL_TILE)
    for tail_start in range(RUNNING_TOPK, topk, TAIL_TILE):
        tail_columns = tail_start + tail_offsets
        tail = tl.where(tail_columns[None, :] == own_column[:, None], own_block[:, None], -1)
        tail_mask = row_ok[:, None] & (tail_columns < topk)[None, :]
        tl.store(out_base + tail_columns[None, :], tail, mask=tail_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _running_topk(topk: int, max_blocks: int, causal: bool) -> tuple[int, int]:
    """(picks, RUNNING_TOPK): candidates a row keeps, and the on-chip list length (a power of two)."""
    picks = min(topk - 1 if causal else topk, max_blocks)
    return picks, max(2, next_power_of_2(picks))


def _topk_config(
    head_dim_pad: int, running_topk: int, max_blocks: int, config: KernelConfig = DEFAULT_CONFIG
) -> dict:
    """Launch settings of the top-k kernel: measured sm_90 defaults for these shapes, then what the config
    sets (see "Router: top-k tiles" in benchmarks/NOTES.md; measure before changing)."""
    block_n = 64 if head_dim_pad <= 128 else 32
    # No wider than the blocks a sequence can have; never narrower than the running list (tl.topk).
    block_n = max(16, min(block_n, next_power_of_2(max_blocks)), running_topk)
    block_m = 64 if running_topk <= 32 else 32
    if 16 < running_topk <= 32 and max_blocks >= 1024:
        # Lists of 32 slots over many blocks: 128 query rows per program, 8 warps (fewer programs make
        # shorter sequences slower, hence the bound).
        block_m = 128
    num_warps = 8 if running_topk * block_m >= 64 * 64 or block_m == 128 or head_dim_pad >= 256 else 4
    # FILTER skips tiles no row can use; INSERT_ROUNDS: see KernelConfig.router_insert_rounds.
    settings = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, FILTER=True, INSERT_ROUNDS=8, num_warps=num_warps, num_stages=2
    )
    settings.update(config.launch_settings("router"))
    return settings


def _check_supported(
    q: torch.Tensor, k: torch.Tensor, batch: int, max_seqlen_k: int, block_size: int, topk: int, causal: bool
) -> None:
    """Raise ValueError naming the limit for anything the Triton router does not run."""
    check_positive_int("block_size", block_size)
    check_positive_int("topk", topk)
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(
            f"the Triton router supports float16, bfloat16 and float32 (q and k alike), got q {q.dtype} and "
            f"k {k.dtype}; use backend='reference' for float64"
        )
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(
            f"the Triton router supports head_dim 1..{MAX_HEAD_DIM} (same for q and k), got q "
            f"{tuple(q.shape)} and k {tuple(k.shape)}"
        )
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(f"heads_q ({heads_q}) must be a multiple of heads_kv ({heads_kv})")
    if heads_q > MAX_GRID_DIM or batch > MAX_GRID_DIM:
        raise ValueError(
            f"the Triton router supports at most {MAX_GRID_DIM} sequences and heads, got batch {batch}, "
            f"heads_q {heads_q}"
        )
    _, running_topk = _running_topk(topk, triton.cdiv(max_seqlen_k, block_size), causal)
    if running_topk > MAX_RUNNING_TOPK:
        raise ValueError(
            f"the Triton router keeps at most {MAX_RUNNING_TOPK} blocks per query on chip: "
            f"min(topk, ceil(max_seqlen_k / block_size)) must be <= {MAX_RUNNING_TOPK}, got topk {topk}, "
            f"max_seqlen_k {max_seqlen_k}, block_size {block_size}"
        )


def _stores_sums(dtype: torch.dtype) -> bool:
    """float32 routes on block sums divided once per score (exact ties stay ties, as in the reference);
    float16/bfloat16 on means rounded to the input dtype, the tensor cores' operands."""
    return dtype == torch.float32


def _launch_centroids(
    k, cu_seqlens_k, batch, seqlen_k, max_seqlen_k, block_size, is_varlen, store_sums=False
):
    """k [total_k, Hkv, D] (varlen) or [B, S, Hkv, D] -> centroids [total // block_size + batch, Hkv, D]
    (block sums instead of means with store_sums)."""
    heads_kv, head_dim = k.shape[-2], k.shape[-1]
    total_keys = k.shape[0] if is_varlen else batch * seqlen_k
    rows = total_keys // block_size + batch
    centroids = torch.empty(rows, heads_kv, head_dim, dtype=k.dtype, device=k.device)
    max_blocks = triton.cdiv(max_seqlen_k, block_size)
    if max_blocks == 0 or batch == 0:
        return centroids
    if is_varlen:
        stride_batch, (stride_token, stride_head, stride_dim) = 0, k.stride()
    else:
        stride_batch, stride_token, stride_head, stride_dim = k.stride()
    head_dim_pad = next_power_of_2(head_dim)
    _block_centroids_kernel[(max_blocks, batch, heads_kv)](
        K=k,
        Centroids=centroids,
        CuSeqlensK=cu_seqlens_k if is_varlen else None,
        seqlen_k=seqlen_k,
        stride_k_batch=stride_batch,
        stride_k_token=stride_token,
        stride_k_head=stride_head,
        stride_k_dim=stride_dim,
        stride_centroid_row=centroids.stride(0),
        stride_centroid_head=centroids.stride(1),
        head_dim=head_dim,
        block_size=block_size,
        IS_VARLEN=is_varlen,
        # At most 4096 elements of k per tile: whole small blocks, no register spills at head_dim 256.
        TOKEN_TILE=max(2, min(next_power_of_2(block_size), 4096 // head_dim_pad, 64)),
        HEAD_DIM_PAD=head_dim_pad,
        EVEN_HEAD_DIM=head_dim == head_dim_pad,
        STORE_SUMS=store_sums,
        num_warps=4,
    )
    return centroids


def _launch_route(
    q,
    centroids,
    selected,
    cu_seqlens_q,
    cu_seqlens_k,
    batch,
    seqlen_q,
    seqlen_k,
    max_seqlen_q,
    max_seqlen_k,
    block_size,
    topk,
    causal,
    is_varlen,
    path_counts=None,
    config: KernelConfig = DEFAULT_CONFIG,
):
    """Fill selected [total_q, Hq, topk] (a view of [B, T, Hq, topk] for the padded layout); with
    path_counts (int32 [4], zeroed), also count the tile update paths (see count_topk_paths)."""
    heads_q, head_dim = q.shape[-2], q.shape[-1]
    heads_kv = centroids.shape[1]
    max_blocks = triton.cdiv(max_seqlen_k, block_size)
    picks, running_topk = _running_topk(topk, max_blocks, causal)
    head_dim_pad = head_dim_tile(head_dim)
    settings = _topk_config(head_dim_pad, running_topk, max_blocks, config)
    grid = (triton.cdiv(max_seqlen_q, settings["BLOCK_M"]), batch, heads_q)
    if 0 in grid:
        return selected
    if is_varlen:
        stride_batch, (stride_token, stride_head, stride_dim) = 0, q.stride()
    else:
        stride_batch, stride_token, stride_head, stride_dim = q.stride()
    tail = max(1, topk - running_topk)
    _route_topk_kernel[grid](
        Q=q,
        Centroids=centroids,
        Selected=selected,
        PathCounts=path_counts,
        CuSeqlensQ=cu_seqlens_q if is_varlen else None,
        CuSeqlensK=cu_seqlens_k if is_varlen else None,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        stride_q_batch=stride_batch,
        stride_q_token=stride_token,
        stride_q_head=stride_head,
        stride_q_dim=stride_dim,
        stride_centroid_row=centroids.stride(0),
        stride_centroid_head=centroids.stride(1),
        stride_centroid_dim=centroids.stride(2),
        stride_selected_token=selected.stride(0),
        stride_selected_head=selected.stride(1),
        head_dim=head_dim,
        block_size=block_size,
        heads_per_kv=heads_q // heads_kv,
        topk=topk,
        picks=picks,
        IS_VARLEN=is_varlen,
        CAUSAL=causal,
        RUNNING_TOPK=running_topk,
        HEAD_DIM_PAD=head_dim_pad,
        EVEN_HEAD_DIM=head_dim == head_dim_pad,
        TAIL_TILE=min(64, max(16, next_power_of_2(tail))),
        DOT_PRECISION=dot_precision(q.dtype),
        DOT_IN_FLOAT32=dot_in_float32(q.dtype),  # upcast before the dot: see ops.utils.dot_in_float32
        CENTROIDS_ARE_SUMS=_stores_sums(q.dtype),
        COUNT_PATHS=path_counts is not None,
        **settings,
    )
    return selected


def _new_selection(shape, device, out):
    if out is None:
        return torch.empty(shape, dtype=torch.int32, device=device)
    matches = out.shape == torch.Size(shape) and out.dtype == torch.int32 and out.device == device
    if not matches or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int32 tensor of shape {tuple(shape)} on {device}")
    return out


def _route_padded(q, k, block_size, topk, causal, out, path_counts=None, config=DEFAULT_CONFIG):
    """``route``'s work (and ``count_topk_paths``'s, with path_counts): checks, centroids, top-k."""
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    _check_supported(q, k, batch, seqlen_k, block_size, topk, causal)
    if k.shape[0] != batch:
        raise ValueError(f"k must have q's batch size {batch}, got shape {tuple(k.shape)}")
    selected = _new_selection((batch, seqlen_q, heads_q, topk), q.device, out)
    centroids = _launch_centroids(
        k, None, batch, seqlen_k, seqlen_k, block_size, is_varlen=False, store_sums=_stores_sums(k.dtype)
    )
    # The padded batch is read as packed sequences of equal length: sequence b starts at token b*T.
    _launch_route(
        q,
        centroids,
        selected.view(batch * seqlen_q, heads_q, topk),
        None,
        None,
        batch,
        seqlen_q,
        seqlen_k,
        seqlen_q,
        seqlen_k,
        block_size,
        topk,
        causal,
        is_varlen=False,
        path_counts=path_counts,
        config=config,
    )
    return selected


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def block_centroids_varlen(
    k: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_k: int, block_size: int
) -> torch.Tensor:
    """Centroids of packed keys.

    Args:
        k: ``[total_k, Hkv, D]`` (any strides).
        cu_seqlens_k: int32 ``[batch + 1]``.
        max_seqlen_k: upper bound of the sequence lengths (Python int).

    Returns:
        ``[total_k // block_size + batch, Hkv, D]`` in k's dtype: block j of sequence b at row
        ``cu_seqlens_k[b] // block_size + b + j``; other rows are uninitialised.
    """
    batch = cu_seqlens_k.numel() - 1
    _check_supported(k, k, batch, 0, block_size, 1, causal=False)
    return _launch_centroids(k, cu_seqlens_k, batch, 0, max_seqlen_k, block_size, is_varlen=True)


def route_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    topk: int,
    causal: bool = True,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Selected key blocks of packed sequences (``moba_select``'s contract).

    Args:
        q: ``[total_q, Hq, D]``; k: ``[total_k, Hkv, D]`` (any strides, same dtype).
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]``.
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (Python ints).
        out: optional contiguous int32 ``[total_q, Hq, topk]`` to write into.
        config: the top-k kernel's launch settings (None: the defaults).

    Returns:
        int32 ``[total_q, Hq, topk]``: block ids local to each sequence, ascending, -1 in unused slots at
        the end.
    """
    batch = cu_seqlens_q.numel() - 1
    _check_supported(q, k, batch, max_seqlen_k, block_size, topk, causal)
    if cu_seqlens_k.numel() != batch + 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both have batch + 1 entries")
    selected = _new_selection((q.shape[0], q.shape[1], topk), q.device, out)
    centroids = _launch_centroids(
        k, cu_seqlens_k, batch, 0, max_seqlen_k, block_size, is_varlen=True, store_sums=_stores_sums(k.dtype)
    )
    return _launch_route(
        q,
        centroids,
        selected,
        cu_seqlens_q,
        cu_seqlens_k,
        batch,
        0,
        0,
        max_seqlen_q,
        max_seqlen_k,
        block_size,
        topk,
        causal,
        is_varlen=True,
        config=DEFAULT_CONFIG if config is None else config,
    )


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool = True,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Selected key blocks of a padded batch (``moba_select``'s contract).

    Args:
        q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]`` (any strides, same dtype).
        out: optional contiguous int32 ``[B, T, Hq, topk]`` to write into.
        config: the top-k kernel's launch settings (None: the defaults).

    Returns:
        int32 ``[B, T, Hq, topk]``: block ids, ascending, -1 in unused slots at the end.
    """
    return _route_padded(
        q, k, block_size, topk, causal, out, config=DEFAULT_CONFIG if config is None else config
    )


def count_topk_paths(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool = True,
    config: KernelConfig | None = None,
) -> dict:
    """How the top-k kernel updated its running lists on a padded batch (a measurement aid, not a fast path).

    Returns the number of centroid tiles the programs visited and how each was handled: ``skipped`` (no row
    could use it), ``inserted`` (at most ``INSERT_ROUNDS`` keys per row, ``insertion_rounds`` in all) or
    ``merged`` (a full ``tl.topk``), plus ``selected``, the selection itself (unchanged by counting).
    """
    counts = torch.zeros(4, dtype=torch.int32, device=q.device)
    config = DEFAULT_CONFIG if config is None else config
    selected = _route_padded(q, k, block_size, topk, causal, None, path_counts=counts, config=config)
    skipped, inserted, merged, rounds = counts.tolist()
    return dict(
        tiles=skipped + inserted + merged,
        skipped=skipped,
        inserted=inserted,
        merged=merged,
        insertion_rounds=rounds,
        selected=selected,
    )
