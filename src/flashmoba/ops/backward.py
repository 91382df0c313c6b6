"""Sparse attention backward by recomputation from the saved log-sum-exp (FlashAttention style).

1. Preprocess: ``delta = rowsum(dO * O) - dlse`` per (head, row) (the lse term lets a gradient flow
   through the returned lse too).
2. dK/dV, key-block-major: one program per (key tile of a block, kv head) walks, for every query head of
   its GQA group, the rows routed to the block (full gathered tiles, fixed order, no atomics), and
   recomputes ``P = exp2(S * scale * log2(e) - lse * log2(e))``. dK and dV of the kv head are summed over
   its query heads inside the program (no expanded per-query-head buffers).
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

import torch
import triton
import triton.language as tl

from flashmoba.ops.forward import (
    LOG2_E,
    chunk_pair_index,
    chunking,
    dot_precision,
    forward_tiles,
    head_dim_tile,
    interpreting,
    partial_dtype,
    program_column,
)
from flashmoba.ops.index import block_table, num_block_slots

# dQ by stored per-pair partials and a sum ("store", see above) where it applies; False: float32 atomics
# (or the second pass with deterministic=True). A switch for measurements.
DQ_BY_STORED_PARTIALS = True

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


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
    lse_index = heads.to(tl.int64) * total_q + rows
    if HAS_GRAD_LSE:
        delta -= tl.load(GradLse + lse_index, mask=pair_mask, other=0.0)
    tl.store(Delta + lse_index, delta, mask=pair_mask)


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
    Entries,
    Offsets,
    BlockTable,
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
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DQ_MODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dK, dV of one key tile of one block for one kv head, and dQ as DQ_MODE says ("store": each pair's
    partial into GradQ laid out [query head in chunk, row, slot]; "atomic": added into GradQ [rows, Hq, D]
    float32; "none")."""
    # kv heads vary fastest, then the key tiles of a block: the early blocks, which collect the most routed
    # rows under causal routing, start first instead of trailing at the end of the grid.
    kv_head = kv_head_first + tl.program_id(0) % kv_heads_here
    block_tile = tl.program_id(0) // kv_heads_here
    block = block_tile // tiles_per_block
    key_tile = block_tile % tiles_per_block
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
    key_tile_values = tl.load(
        K + keys64[:, None] * stride_k_row + kv_head * stride_k_head + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    value_tile = tl.load(
        V + keys64[:, None] * stride_v_row + kv_head * stride_v_head + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    grad_key = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_value = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # A key tile past the block's end has nothing to do (its block is shorter than tiles_per_block tiles).
    has_keys = key_first + key_tile * BLOCK_N < key_end
    for head_in_group in range(group):
        head = kv_head * group + head_in_group
        column = (head * block_slots + block) * num_chunks
        begin = tl.load(Offsets + column)
        end = tl.load(Offsets + column + num_chunks)
        end = tl.where(has_keys, end, begin)
        for tile_start in range(begin, end, BLOCK_M):
            # Inline on purpose: the same loads through a helper shared with the dQ pass compiled to other
            # register allocation and ran 4% slower on H100 (benchmarks/NOTES.md section 4).
            entry_mask = tile_start + offs_m < end
            entry = tl.load(Entries + tile_start + offs_m, mask=entry_mask, other=0)
            rows = entry // (heads_q * topk)
            rows64 = rows.to(tl.int64)
            row_mask = entry_mask[:, None] & d_mask[None, :]
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
            lse = tl.load(Lse + head * total_q + rows64, mask=entry_mask, other=float("inf"))
            # A routed row always sees a key; the guard only keeps a malformed selection from making inf.
            lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(Delta + head * total_q + rows64, mask=entry_mask, other=0.0)

            # Transposed scores [keys, rows]: dK and dV accumulate along the rows.
            scores_t = tl.dot(key_tile_values, tl.trans(query), input_precision=DOT_PRECISION) * qk_scale
            probabilities_t = tl.math.exp2(scores_t - lse_log2[None, :])
            visible = key_mask[:, None] & entry_mask[None, :]
            if CAUSAL:
                visible = visible & (keys[:, None] <= rows[None, :] + shift)
            probabilities_t = tl.where(visible, probabilities_t, 0.0)
            grad_value += tl.dot(probabilities_t.to(grad_out.dtype), grad_out, input_precision=DOT_PRECISION)
            grad_probabilities_t = tl.dot(value_tile, tl.trans(grad_out), input_precision=DOT_PRECISION)
            grad_scores_t = probabilities_t * (grad_probabilities_t - delta[None, :])
            grad_scores_t = grad_scores_t.to(query.dtype)
            grad_key += tl.dot(grad_scores_t, query, input_precision=DOT_PRECISION)
            if DQ_MODE != "none":
                grad_query = tl.dot(tl.trans(grad_scores_t), key_tile_values, input_precision=DOT_PRECISION)
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
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Deterministic dQ: the partial dQ of each (row, slot) routed to one (key block, query head)."""
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

    for tile_start in range(begin, end, BLOCK_M):
        entry_mask = tile_start + offs_m < end
        entry = tl.load(Entries + tile_start + offs_m, mask=entry_mask, other=0)
        rows = entry // (heads_q * topk)
        rows64 = rows.to(tl.int64)
        row_mask = entry_mask[:, None] & d_mask[None, :]
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
        lse = tl.load(Lse + head * total_q + rows64, mask=entry_mask, other=float("inf"))
        lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(Delta + head * total_q + rows64, mask=entry_mask, other=0.0)

        grad_query = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for key_start in range(key_first, key_end, BLOCK_N):
            keys = key_start + offs_n
            key_mask = keys < key_end
            kv_mask = key_mask[:, None] & d_mask[None, :]
            key_tile = tl.load(
                k_base + keys.to(tl.int64)[:, None] * stride_k_row + offs_d[None, :], mask=kv_mask, other=0.0
            )
            value_tile = tl.load(
                v_base + keys.to(tl.int64)[:, None] * stride_v_row + offs_d[None, :], mask=kv_mask, other=0.0
            )
            scores = tl.dot(query, tl.trans(key_tile), input_precision=DOT_PRECISION) * qk_scale
            probabilities = tl.math.exp2(scores - lse_log2[:, None])
            visible = key_mask[None, :] & entry_mask[:, None]
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + shift)
            probabilities = tl.where(visible, probabilities, 0.0)
            grad_probabilities = tl.dot(grad_out, tl.trans(value_tile), input_precision=DOT_PRECISION)
            grad_scores = (probabilities * (grad_probabilities - delta[:, None])).to(query.dtype)
            grad_query += tl.dot(grad_scores, key_tile, input_precision=DOT_PRECISION)

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
# Launch configuration and launcher
# ----------------------------------------------------------------------------------------------------


def backward_tiles(head_dim: int, block_size: int) -> dict:
    """Key rows x gathered query rows per dK/dV tile (sm_90 defaults; small tiles in the interpreter)."""
    block_n_cap = 32 if interpreting() else (128 if head_dim <= 128 else 32)
    block_n = min(block_n_cap, max(16, triton.next_power_of_2(block_size)))
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=block_n, num_warps=4, num_stages=1)
    if head_dim > 128:
        return dict(BLOCK_M=64, BLOCK_N=block_n, num_warps=8, num_stages=2)
    # Measured on H100 at 64K, d=128, dQ by stored partials (fwd+bwd minus fwd, ms; benchmarks/NOTES.md
    # section 4): B=128: M64/8 warps/3 stages 17.3, M32/8/2 19.6, M64/8/2 19.0, M16/8/2 23.8; B=64/k=16:
    # M64/4/3 20.1, M32/4/3 20.9, M64/8/3 26.4; B=32/k=32: M32/4/3 34.6, M128/8/3 36.3, M64/8/3 39.9.
    if block_n >= 128:
        return dict(BLOCK_M=64, BLOCK_N=block_n, num_warps=8, num_stages=3)
    if block_n == 64:
        return dict(BLOCK_M=64, BLOCK_N=block_n, num_warps=4, num_stages=3)
    return dict(BLOCK_M=32, BLOCK_N=block_n, num_warps=4, num_stages=3)


def _row_stride_ok(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq ``[total_q, Hq, D]``, dk, dv ``[total_k, Hkv, D]`` from dO ``[total_q, Hq, D]`` (and dlse ``[Hq, total_q]``)."""
    grad_out, q, k, v, out = (_row_stride_ok(t) for t in (grad_out, q, k, v, out))
    total_q, heads_q, head_dim = q.shape
    total_k, heads_kv, _ = k.shape
    topk = entries.numel() // max(1, total_q * heads_q)
    batch = cu_seqlens_q.numel() - 1
    block_slots = num_block_slots(total_k, batch, block_size)
    split = chunking(total_q, heads_q, topk, head_dim, q.dtype)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if total_q == 0 or block_slots == 0:
        return torch.zeros_like(q), grad_k.zero_(), grad_v.zero_()

    block_d = head_dim_tile(head_dim)
    block_r = 16 if interpreting() else 64
    delta = torch.empty(heads_q, total_q, dtype=torch.float32, device=q.device)
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    _moba_bwd_preprocess_kernel[(triton.cdiv(total_q * heads_q, block_r),)](
        out,
        grad_out,
        grad_lse if grad_lse is not None else delta,
        delta,
        total_q,
        heads_q,
        out.stride(0),
        out.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        HAS_GRAD_LSE=grad_lse is not None,
        HEAD_DIM=head_dim,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
    )

    table = block_table(cu_seqlens_q, cu_seqlens_k, block_size, block_slots)
    qk_scale = softmax_scale * LOG2_E
    precision = dot_precision(q.dtype)
    tiles = backward_tiles(head_dim, block_size)
    tiles_per_block = triton.cdiv(block_size, tiles["BLOCK_N"])
    group = heads_q // heads_kv
    grad_q = torch.empty(total_q, heads_q, head_dim, dtype=q.dtype, device=q.device)

    def launch_dkdv(grad_q_target, dq_mode, kv_head_first, kv_heads_here):
        _moba_bwd_dkdv_kernel[(block_slots * tiles_per_block * kv_heads_here,)](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            grad_k,
            grad_v,
            grad_q_target,
            entries,
            offsets,
            table,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            grad_out.stride(0),
            grad_out.stride(1),
            grad_k.stride(0),
            grad_k.stride(1),
            grad_v.stride(0),
            grad_v.stride(1),
            block_slots,
            tiles_per_block,
            split.row_chunks,
            kv_head_first,
            kv_heads_here,
            heads_q,
            topk,
            group,
            total_q,
            softmax_scale,
            qk_scale,
            HEAD_DIM=head_dim,
            CAUSAL=causal,
            DQ_MODE=dq_mode,
            DOT_PRECISION=precision,
            BLOCK_M=tiles["BLOCK_M"],
            BLOCK_N=tiles["BLOCK_N"],
            BLOCK_D=block_d,
            num_warps=tiles["num_warps"],
            num_stages=tiles["num_stages"],
        )

    def sum_partials(partial, head_first, heads_here, first_row, rows_here):
        chunk_pairs = heads_here * rows_here
        _moba_bwd_dq_sum_kernel[(triton.cdiv(chunk_pairs, block_r),)](
            partial,
            grad_q[first_row:],
            head_first,
            rows_here,
            chunk_pairs,
            topk,
            grad_q.stride(0),
            grad_q.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
        )

    # "store": chunks of whole kv heads (their query heads together) whose dQ partials fit the scratch.
    store_split = chunking(total_q, heads_q, topk, head_dim, q.dtype, group=group)
    if DQ_BY_STORED_PARTIALS and tiles_per_block == 1 and store_split.row_chunks == 1:
        partial = torch.empty(
            store_split.scratch_pairs(topk), head_dim, dtype=partial_dtype(q.dtype), device=q.device
        )
        # Small in the interpreter, so that tests stride over the tail more than once.
        block_e, zero_programs = (16, 2) if interpreting() else (256, 1024)
        for head_first, heads_here, _, _, _ in store_split.chunks(total_q, heads_q):
            used = partial[: heads_here * total_q * topk]
            # Unused slots (-1) add zero: clear just their partials (the index lists them last).
            _moba_bwd_zero_unrouted_kernel[(min(triton.cdiv(entries.numel(), block_e), zero_programs),)](
                used,
                entries,
                offsets,
                offsets.numel() - 1,
                entries.numel(),
                head_first,
                heads_here,
                total_q,
                heads_q,
                topk,
                HEAD_DIM=head_dim,
                BLOCK_E=block_e,
                BLOCK_D=block_d,
            )
            launch_dkdv(used, "store", head_first // group, heads_here // group)
            sum_partials(used, head_first, heads_here, 0, total_q)
        return grad_q, grad_k, grad_v

    if not deterministic:
        # float32 atomics: straight into dQ for float32 inputs; otherwise into a buffer copied once.
        if q.dtype == torch.float32:
            launch_dkdv(grad_q.zero_(), "atomic", 0, heads_kv)
        else:
            grad_q_accum = torch.zeros(total_q, heads_q, head_dim, dtype=torch.float32, device=q.device)
            launch_dkdv(grad_q_accum, "atomic", 0, heads_kv)
            grad_q.copy_(grad_q_accum)
        return grad_q, grad_k, grad_v

    # Deterministic dQ: per-(row, head, slot) partials of one chunk, summed in slot order.
    launch_dkdv(delta, "none", 0, heads_kv)
    # One stage, as before v1.3: three were measured for the forward's query-tile loop only; here the
    # inner loop walks K/V tiles, whose pipelining would need about three times their shared memory.
    dq_tiles = dict(forward_tiles(head_dim, block_size), num_stages=1)
    partial = torch.empty(split.scratch_pairs(topk), head_dim, dtype=torch.float32, device=q.device)
    for head_first, heads_here, row_chunk, first_row, rows_here in split.chunks(total_q, heads_q):
        used = partial[: heads_here * rows_here * topk]
        used.zero_()  # slots that no program writes add zero
        _moba_bwd_dq_partial_kernel[(block_slots * heads_here,)](
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            used,
            entries,
            offsets,
            table,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            grad_out.stride(0),
            grad_out.stride(1),
            block_slots,
            split.row_chunks,
            row_chunk,
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
            HEAD_DIM=head_dim,
            CAUSAL=causal,
            DOT_PRECISION=precision,
            BLOCK_M=dq_tiles["BLOCK_M"],
            BLOCK_N=dq_tiles["BLOCK_N"],
            BLOCK_D=block_d,
            num_warps=dq_tiles["num_warps"],
            num_stages=dq_tiles["num_stages"],
        )
        sum_partials(used, head_first, heads_here, first_row, rows_here)
    return grad_q, grad_k, grad_v
