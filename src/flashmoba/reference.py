"""The exact PyTorch reference of MoBA: the function every kernel must compute.

It is the oracle of the tests and the CPU fallback, so it must be exact and must scale: queries are
processed in chunks, and each chunk's logits cover only the keys that chunk can see, so peak memory is
linear in the sequence length for a fixed chunk budget (no N x N tensor). Under autograd each chunk keeps
only its inputs and recomputes itself in the backward (``_AttendChunk``, a checkpoint with the gradients of
the NaN rule below) instead of keeping every chunk's probabilities alive.

Semantics (see README and ``flashmoba.api``):

- keys of each sequence are cut into blocks ``[j*B, (j+1)*B)``; the last block may be partial;
- a block's centroid is the mean of its real keys, accumulated in float32 (float64 for float64
  inputs); for float16/bfloat16 keys it is rounded to the input dtype, as the kernels store it (for
  float32/float64 the score is computed as ``(q . block sum) / count``, see ``_routing_keys``);
- query head h scores block j by ``q . centroid_j`` (no softmax scale) against kv head
  ``h // (heads_q // heads_kv)``;
- causal: query i of a sequence with T queries and S keys sits at key position ``p = i + S - T``; its own
  block (holding p) is always selected and counts as one of the topk; the best topk - 1 blocks that end
  before the own block starts are added; inside the own block only keys at positions <= p are visible;
  a query with p < 0 sees nothing (output 0, lse -inf);
- non-causal: the best topk of all blocks, all their keys visible;
- ties go to the later block; no gradient flows through the selection.

NaN, inf and overflow (per (query row, query head), over the keys it attends to: selected blocks,
causally visible ones; the selection itself ranks NaN scores as ``flashmoba.ops.router`` documents):

- a row is *poisoned* when one of its visible logits ``q . k * softmax_scale`` (computed in float32,
  float64 for float64 inputs) is not finite, or one of its visible keys has a non-finite entry in its value
  vector. A NaN or inf in the row's q or in a visible k always makes the logit non-finite; a product of
  finite inputs that overflows to +inf or -inf does too. A poisoned row's output (every column) and lse are
  NaN; a row that sees no key gives 0 and lse -inf whatever its q;
- every other row is computed as if the non-finite entries it does not attend to were 0: exactly the
  same values (bitwise) as with any finite numbers there. So nothing crosses rows, heads or sequences;
- gradients: a row is *gradient-poisoned* when it sees a key and is poisoned, or its dO has a non-finite
  entry, or its dlse is not finite. Its dq row is NaN, and so are the whole dk and dv rows (kv head of
  the row's head) of every key of every block it selected: the keys it attends to and, in causal mode,
  the keys of its own block after it (the kernels' dK/dV programs walk whole blocks, and flagging the
  whole block costs nothing there). Every other gradient entry is the exact gradient of the other rows,
  finite, with no contribution from the gradient-poisoned rows (NaN or inf in dO or dlse of a row that
  sees nothing are ignored).
"""

from __future__ import annotations

import math

import torch

# Elements of one chunk's [heads, chunk, keys] logits; bounds the reference's working memory.
CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_sums(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of each key block over its real tokens and the token counts.

    k: [S, Hkv, D] (one sequence). Returns sums [n, Hkv, D] in float32 (float64 for float64 keys) and
    counts [n] in the same dtype, n = ceil(S / block_size).
    """
    seqlen_k, heads_kv, head_dim = k.shape
    num_blocks = -(-seqlen_k // block_size)
    padded = k.new_zeros(num_blocks * block_size, heads_kv, head_dim, dtype=_compute_dtype(k.dtype))
    padded[:seqlen_k] = k
    sums = padded.view(num_blocks, block_size, heads_kv, head_dim).sum(dim=1)
    counts = torch.full((num_blocks,), block_size, dtype=sums.dtype, device=k.device)
    if num_blocks:
        counts[-1] = seqlen_k - (num_blocks - 1) * block_size
    return sums, counts


def block_centroids(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each key block over its real tokens.

    k: [S, Hkv, D] (one sequence). Returns [num_blocks, Hkv, D] in k's dtype, accumulated in float32
    (float64 for float64 keys), num_blocks = ceil(S / block_size).
    """
    sums, counts = _block_sums(k, block_size)
    return (sums / counts[:, None, None]).to(k.dtype)


def _routing_keys(k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What queries are scored against: score_j = (q . vectors_j) / divisors_j = q . centroid_j.

    float32/float64 keys: the block sums and counts, so that the score is one dot product of exact
    inputs divided once; blocks whose scores tie in real arithmetic then tie bitwise whenever the dot
    products are exact (small integers, planted ties), instead of drifting apart through the rounding
    of each centroid. float16/bfloat16 keys: the centroids rounded to the input dtype, as the kernels
    store them for their tensor-core dot products.
    """
    return _routing_keys_from_sums(*_block_sums(k, block_size), k.dtype)


def _routing_keys_from_sums(
    sums: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_routing_keys`` from block sums kept elsewhere (a decode cache's running sums) for keys of
    ``dtype``: the same rule, so that sums equal to ``_block_sums``' give the same scores.

    sums [n, Hkv, D] in float32 (float64 for float64 keys), counts [n] (the real keys of each block).
    """
    if dtype in (torch.float32, torch.float64):
        return sums, counts.to(sums.dtype)
    centroids = (sums / counts.to(sums.dtype)[:, None, None]).to(dtype).float()
    return centroids, torch.ones(centroids.shape[0], dtype=centroids.dtype, device=sums.device)


def _route_chunk(
    q_chunk: torch.Tensor,
    routing_keys: tuple[torch.Tensor, torch.Tensor],
    query_pos: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
) -> torch.Tensor:
    """Selected blocks of a chunk of queries as a boolean mask.

    q_chunk [C, Hq, D], routing_keys from ``_routing_keys`` ([n, Hkv, D] and [n]), query_pos [C] (key
    position p of each query). Returns [C, Hq, n] bool: True where the query head attends to the block.
    """
    vectors, divisors = routing_keys
    chunk, heads_q, head_dim = q_chunk.shape
    num_blocks, heads_kv, _ = vectors.shape
    group = heads_q // heads_kv
    # [C, Hkv, group, 1, D] * [1, Hkv, 1, n, D] summed over D -> [C, Hq, n]. An elementwise product
    # and sum (not a matmul) so that identical blocks get bitwise-identical scores: a matmul may
    # round its edge columns differently, which would break exact ties.
    queries = q_chunk.to(vectors.dtype).view(chunk, heads_kv, group, 1, head_dim)
    keys = vectors.permute(1, 0, 2)[None, :, None]
    scores = (queries * keys).sum(dim=-1).reshape(chunk, heads_q, num_blocks) / divisors
    block_ids = torch.arange(num_blocks, device=q_chunk.device)
    if causal:
        own_block = torch.div(query_pos, block_size, rounding_mode="floor")  # -1 when p < 0
        candidate = block_ids[None, :] < own_block[:, None]  # blocks that end before the own block
        picks = topk - 1
    else:
        own_block = None
        candidate = torch.ones(chunk, num_blocks, dtype=torch.bool, device=q_chunk.device)
        picks = topk
    selected = torch.zeros(chunk, heads_q, num_blocks, dtype=torch.bool, device=q_chunk.device)
    picks = min(picks, num_blocks)
    if picks > 0:
        # Ties go to the later block: reverse the block axis, then a stable descending sort keeps the
        # reversed (later-first) order among equal scores. A second stable sort puts the candidates first,
        # so that a candidate scored -inf (an infinite q or centroid) still beats every non-candidate, as
        # in the Triton router, where such a block may fill an empty slot.
        by_score = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices
        flipped_candidate = candidate.flip(-1)[:, None, :].expand_as(scores)
        candidate_first = torch.gather(flipped_candidate, -1, by_score).to(torch.int8)
        by_candidate = torch.sort(candidate_first, dim=-1, descending=True, stable=True).indices
        order = torch.gather(by_score, -1, by_candidate)[..., :picks]
        best = num_blocks - 1 - order
        is_candidate = torch.gather(candidate[:, None, :].expand_as(scores), -1, best)
        selected.scatter_(-1, best, is_candidate)
    if causal:
        has_own = own_block >= 0
        own = own_block.clamp_min(0)[:, None, None].expand(chunk, heads_q, 1)
        selected.scatter_(-1, own, has_own[:, None, None].expand(chunk, heads_q, 1))
    return selected


def _attend_chunk(
    q_chunk: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    softmax_scale: float,
    in_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of a chunk of queries over the visible keys, with the NaN rule (module docstring).

    q_chunk [C, Hq, D], k/v [S', Hkv, D], visible [C, Hq, S'] bool; in_blocks [C, Hq, S'] bool, the keys
    of the selected blocks, visible or not (where a gradient-poisoned row puts NaN in dk and dv), by
    default ``visible``.
    Returns o [C, Hq, D] in the compute dtype and lse [Hq, C] (-inf for a query that sees nothing, NaN
    for a poisoned one). Differentiable in q, k and v through ``_AttendChunk``, which keeps only its
    inputs and recomputes the chunk in the backward (as a checkpoint would).
    """
    if torch.is_grad_enabled() and (q_chunk.requires_grad or k.requires_grad or v.requires_grad):
        in_blocks = visible if in_blocks is None else in_blocks
        return _AttendChunk.apply(q_chunk, k, v, visible, in_blocks, softmax_scale)
    out, lse, _ = _attend_forward(q_chunk, k, v, visible, softmax_scale)
    return out, lse


def _finite_or_zero(tensor: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(tensor), tensor, torch.zeros_like(tensor))


def _attend_forward(q_chunk, k, v, visible, softmax_scale):
    """``_attend_chunk``'s forward. Also returns what the backward needs: the unnormalised probabilities
    [Hkv, group, C, S'] (0 outside the visible keys and in poisoned rows) and their row sums (1 where 0),
    the poisoned rows [Hkv, group, C], the visibility [Hkv, group, C, S'], the output before the poisoned
    rows are set to NaN, and v with non-finite entries zeroed ([Hkv, S', D])."""
    chunk, heads_q, head_dim = q_chunk.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    compute = _compute_dtype(q_chunk.dtype)
    # [Hkv, group*C, D] @ [Hkv, D, S'] keeps GQA without copying K/V per query head.
    q_grouped = q_chunk.to(compute).view(chunk, heads_kv, group, head_dim).permute(1, 2, 0, 3)
    k_t = k.to(compute).permute(1, 2, 0)
    logits = torch.matmul(q_grouped.reshape(heads_kv, group * chunk, head_dim), k_t) * softmax_scale
    logits = logits.view(heads_kv, group, chunk, -1)
    mask = visible.permute(1, 0, 2).reshape(heads_kv, group, chunk, -1)
    # The NaN rule: a row is poisoned when a visible logit is not finite (NaN or inf in its q or in a
    # visible k, or a product that overflows) or a visible value vector has a non-finite entry.
    v_compute = v.to(compute)
    bad_value = ~torch.isfinite(v_compute).all(dim=-1).permute(1, 0)[:, None, None, :]  # [Hkv, 1, 1, S']
    poisoned = (mask & (bad_value | ~torch.isfinite(logits))).any(dim=-1)  # [Hkv, group, C]
    # Poisoned rows are computed as seeing nothing, then set to NaN: no NaN or inf enters an arithmetic
    # operation, so none can reach another row through a masked product (0 * NaN).
    logits = logits.masked_fill(~mask | poisoned[..., None], -math.inf)
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(logits - row_max)
    row_sum = probs.sum(dim=-1, keepdim=True)
    safe_sum = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    v_clean = _finite_or_zero(v_compute).permute(1, 0, 2)  # [Hkv, S', D]
    out = torch.matmul(probs.view(heads_kv, group * chunk, -1), v_clean)
    out = out.view(heads_kv, group, chunk, head_dim) / safe_sum
    lse = row_max + torch.log(row_sum)
    nan = torch.full((), math.nan, dtype=compute, device=q_chunk.device)
    out_poisoned = torch.where(poisoned[..., None], nan, out)
    lse = torch.where(poisoned[..., None], nan, lse).view(heads_q, chunk)
    saved = (probs, safe_sum, poisoned, mask, out, v_clean)
    return out_poisoned.reshape(heads_q, chunk, head_dim).permute(1, 0, 2), lse, saved


class _AttendChunk(torch.autograd.Function):
    """``_attend_chunk`` with the gradients of the NaN rule (module docstring), computed explicitly: the
    textbook softmax backward on the finite-zeroed inputs, then NaN in the gradient rows it names."""

    @staticmethod
    def forward(ctx, q_chunk, k, v, visible, in_blocks, softmax_scale):
        out, lse, _ = _attend_forward(q_chunk, k, v, visible, softmax_scale)
        ctx.save_for_backward(q_chunk, k, v, visible, in_blocks)
        ctx.softmax_scale = softmax_scale
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q_chunk, k, v, visible, in_blocks = ctx.saved_tensors
        scale = ctx.softmax_scale
        with torch.no_grad():
            _, _, saved = _attend_forward(q_chunk, k, v, visible, scale)
            probs, safe_sum, poisoned, mask, out, v_clean = saved
            probs = probs / safe_sum
            chunk, heads_q, head_dim = q_chunk.shape
            heads_kv = k.shape[1]
            group = heads_q // heads_kv
            compute = probs.dtype
            grad_out = grad_out.to(compute).view(chunk, heads_kv, group, head_dim).permute(1, 2, 0, 3)
            grad_lse = grad_lse.to(compute).view(heads_kv, group, chunk)
            # Gradient-poisoned rows: poisoned ones, and those whose dO or dlse has a non-finite entry;
            # a row that sees no key has zero gradients whatever its dO.
            sees = mask.any(dim=-1)
            bad_grad = ~torch.isfinite(grad_out).all(dim=-1) | ~torch.isfinite(grad_lse)
            flagged = (poisoned | bad_grad) & sees
            clean = ~(poisoned | bad_grad)
            grad_out = torch.where(clean[..., None], grad_out, torch.zeros_like(grad_out))
            grad_lse = torch.where(clean, grad_lse, torch.zeros_like(grad_lse))
            q_clean = _finite_or_zero(q_chunk.to(compute)).view(chunk, heads_kv, group, head_dim)
            q_clean = q_clean.permute(1, 2, 0, 3)  # [Hkv, group, C, D]
            k_clean = _finite_or_zero(k.to(compute)).permute(1, 0, 2)  # [Hkv, S', D]
            delta = (grad_out * out).sum(dim=-1) - grad_lse  # [Hkv, group, C]
            flat = (heads_kv, group * chunk, -1)
            grad_v = torch.matmul(probs.view(flat).transpose(1, 2), grad_out.reshape(flat))
            grad_probs = torch.matmul(grad_out.reshape(flat), v_clean.transpose(1, 2)).view_as(probs)
            grad_logits = probs * (grad_probs - delta[..., None]) * scale
            grad_q = torch.matmul(grad_logits.view(flat), k_clean).view(heads_kv, group, chunk, head_dim)
            grad_k = torch.matmul(grad_logits.view(flat).transpose(1, 2), q_clean.reshape(flat))
            nan = torch.full((), math.nan, dtype=compute, device=q_chunk.device)
            grad_q = torch.where(flagged[..., None], nan, grad_q)
            # The keys of every block a gradient-poisoned row selected, the causally hidden ones too.
            blocks = in_blocks.permute(1, 0, 2).reshape(heads_kv, group, chunk, -1)
            touched = (blocks & flagged[..., None]).any(dim=2).any(dim=1)[..., None]  # [Hkv, S', 1]
            grad_k = torch.where(touched, nan, grad_k)
            grad_v = torch.where(touched, nan, grad_v)
            grad_q = grad_q.reshape(heads_q, chunk, head_dim).permute(1, 0, 2).to(q_chunk.dtype)
            grad_k = grad_k.permute(1, 0, 2).to(k.dtype)
            grad_v = grad_v.permute(1, 0, 2).to(v.dtype)
        return grad_q, grad_k, grad_v, None, None, None


def sees_nothing(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape, lse_shape, lse_dtype):
    """Output 0 and lse -inf for queries that see no key, kept in the autograd graph of q, k and v (a sum
    over none of their elements is exactly 0, also where they hold NaN), so that their gradients come
    back as zeros of their own shapes rather than None."""
    anchor = sum(tensor.reshape(-1)[:0].sum() for tensor in (q, k, v))
    out = q.new_zeros(shape) + anchor.to(q.dtype)
    lse = torch.full(lse_shape, -math.inf, dtype=lse_dtype, device=q.device) + anchor.to(lse_dtype)
    return out, lse


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_size(heads_q: int, seqlen_k: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, heads_q * seqlen_k))


def moba_sequence_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoBA for one sequence: q [T, Hq, D], k/v [S, Hkv, D] -> o [T, Hq, D] (q's dtype), lse [Hq, T]
    (float32; float64 for float64 inputs)."""
    seqlen_q, heads_q, head_dim = q.shape
    seqlen_k = k.shape[0]
    compute = _compute_dtype(q.dtype)
    lse_dtype = _lse_dtype(q.dtype)
    if seqlen_q == 0 or seqlen_k == 0 or heads_q == 0:
        return sees_nothing(q, k, v, q.shape, (heads_q, seqlen_q), lse_dtype)
    # A block or topk beyond the sequence means one block, or every block: nothing sized by them.
    block_size = min(block_size, seqlen_k)
    topk = min(topk, -(-seqlen_k // block_size))
    with torch.no_grad():
        routing_keys = _routing_keys(k.detach(), block_size)
    key_pos = torch.arange(seqlen_k, device=q.device)
    key_block = torch.div(key_pos, block_size, rounding_mode="floor")
    outs, lses = [], []
    num_blocks = routing_keys[0].shape[0]
    step = _chunk_size(heads_q, max(seqlen_k, num_blocks * head_dim))
    for start in range(0, seqlen_q, step):
        stop = min(seqlen_q, start + step)
        query_pos = torch.arange(start, stop, device=q.device) + (seqlen_k - seqlen_q)
        # Keys past the own block of the chunk's last query are never visible in causal mode: skip them.
        # (The rest of that block is kept: a gradient-poisoned row puts NaN in its keys' dk and dv.)
        last_pos = stop + seqlen_k - seqlen_q
        keys_used = min(seqlen_k, -(-last_pos // block_size) * block_size) if causal else seqlen_k
        keys_used = max(0, keys_used) if last_pos > 0 else 0
        q_chunk = q[start:stop]
        if keys_used == 0:
            outs.append(torch.zeros(stop - start, heads_q, head_dim, dtype=compute, device=q.device))
            lses.append(torch.full((heads_q, stop - start), -math.inf, dtype=compute, device=q.device))
            continue
        with torch.no_grad():
            selected = _route_chunk(q_chunk.detach(), routing_keys, query_pos, block_size, topk, causal)
            in_blocks = selected[:, :, key_block[:keys_used]]
            visible = in_blocks
            if causal:
                visible = in_blocks & (key_pos[:keys_used][None, :] <= query_pos[:, None])[:, None, :]
        out, lse = _attend_chunk(q_chunk, k[:keys_used], v[:keys_used], visible, softmax_scale, in_blocks)
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs, dim=0).to(q.dtype)
    lse = torch.cat(lses, dim=1).to(lse_dtype)
    return out, lse


def select_sequence_reference(
    q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, causal: bool
) -> torch.Tensor:
    """Selected block ids of one sequence: q [T, Hq, D], k [S, Hkv, D] -> int32 [T, Hq, topk].

    Ascending block order, -1 in unused slots (at the end).
    """
    seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[0]
    result = torch.full((seqlen_q, heads_q, topk), -1, dtype=torch.int32, device=q.device)
    if seqlen_q == 0 or seqlen_k == 0 or heads_q == 0:
        return result
    block_size = min(block_size, seqlen_k)  # one block per sequence, without a tensor sized by it
    routing_keys = _routing_keys(k, block_size)
    num_blocks = routing_keys[0].shape[0]
    step = _chunk_size(heads_q, num_blocks * q.shape[-1])
    for start in range(0, seqlen_q, step):
        stop = min(seqlen_q, start + step)
        query_pos = torch.arange(start, stop, device=q.device) + (seqlen_k - seqlen_q)
        selected = _route_chunk(q[start:stop], routing_keys, query_pos, block_size, topk, causal)
        # Selected ids first in ascending order, then the unselected ones as -1.
        block_ids = torch.arange(num_blocks, device=q.device).expand_as(selected)
        keyed = torch.where(selected, block_ids, num_blocks + block_ids)
        ordered = torch.sort(keyed, dim=-1).values[..., :topk]
        ordered = torch.where(ordered < num_blocks, ordered, torch.full_like(ordered, -1))
        result[start:stop, :, : ordered.shape[-1]] = ordered.to(torch.int32)
    return result


def _sequence_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    return [int(x) for x in cu_seqlens.tolist()]


def moba_attn_varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed MoBA. q [total_q, Hq, D], k/v [total_k, Hkv, D] -> o [total_q, Hq, D], lse [Hq, total_q]."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    bounds_q, bounds_k = _sequence_bounds(cu_seqlens_q), _sequence_bounds(cu_seqlens_k)
    outs, lses = [], []
    for seq in range(len(bounds_q) - 1):
        q_seq = q[bounds_q[seq] : bounds_q[seq + 1]]
        k_seq = k[bounds_k[seq] : bounds_k[seq + 1]]
        v_seq = v[bounds_k[seq] : bounds_k[seq + 1]]
        out, lse = moba_sequence_reference(q_seq, k_seq, v_seq, block_size, topk, causal, softmax_scale)
        outs.append(out)
        lses.append(lse)
    if not outs:
        return sees_nothing(q, k, v, q.shape, (q.shape[1], q.shape[0]), _lse_dtype(q.dtype))
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def moba_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched MoBA. q [B, T, Hq, D], k/v [B, S, Hkv, D] -> o [B, T, Hq, D], lse [B, Hq, T]."""
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for batch in range(q.shape[0]):
        out, lse = moba_sequence_reference(
            q[batch], k[batch], v[batch], block_size, topk, causal, softmax_scale
        )
        outs.append(out)
        lses.append(lse)
    if not outs:
        return sees_nothing(q, k, v, q.shape, (0, q.shape[2], q.shape[1]), _lse_dtype(q.dtype))
    return torch.stack(outs), torch.stack(lses)


def moba_select_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    topk: int,
    causal: bool = True,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> torch.Tensor:
    """Router alone. Batched: q [B, T, Hq, D] -> int32 [B, T, Hq, topk]; packed: [total_q, Hq, topk]."""
    if cu_seqlens_q is None:
        return (
            torch.stack(
                [select_sequence_reference(q[b], k[b], block_size, topk, causal) for b in range(q.shape[0])]
            )
            if q.shape[0]
            else torch.empty(0, q.shape[1], q.shape[2], topk, dtype=torch.int32, device=q.device)
        )
    bounds_q, bounds_k = _sequence_bounds(cu_seqlens_q), _sequence_bounds(cu_seqlens_k)
    parts = [
        select_sequence_reference(
            q[bounds_q[s] : bounds_q[s + 1]], k[bounds_k[s] : bounds_k[s + 1]], block_size, topk, causal
        )
        for s in range(len(bounds_q) - 1)
    ]
    if not parts:
        return torch.empty(0, q.shape[1], topk, dtype=torch.int32, device=q.device)
    return torch.cat(parts, dim=0)
