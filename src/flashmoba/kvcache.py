"""Decode with a KV cache: ``moba_attn_with_kvcache`` and the centroid cache it routes with.

The contract (see ../shared/inference.md): a cache holds, per sequence b, ``cache_seqlens[b]`` keys and
values; a call may append ``seqlen_q`` new ones, and computes for the new queries exactly what
``moba_attn(..., causal=True)`` computes for the last ``seqlen_q`` rows of the whole sequence. No new
semantics: bottom-right causal, blocks at absolute positions ``[j*B, (j+1)*B)`` of the sequence, the own
block forced in and attended causally, ties to the later block.

What makes decode cheap is the centroid cache ``block_sums``: per (sequence, block, kv head) the running
sum of the block's keys, in float32 (float64 for float64 keys). Appending a key adds it to its block's
sum, so nothing rescans the cache; a query is routed against ``block_sums / count`` (count: the real keys
of the block, which follows from the sequence length) and then attends only to the keys of its selected
blocks.

Layouts (flash-attn's ``flash_attn_with_kvcache``):

- contiguous: ``k_cache``, ``v_cache`` ``[batch, max_seqlen, heads_kv, head_dim]``;
- paged: ``k_cache``, ``v_cache`` ``[num_pages, page_size, heads_kv, head_dim]`` and ``block_table``
  int32 ``[batch, max_pages]``: position p of sequence b lives at page ``block_table[b, p // page_size]``,
  slot ``p % page_size``. Any page size works: a block may span pages, a page may hold several blocks.
  Entries of ``block_table`` past the pages a sequence uses are not read.
- ``block_sums`` is ``[batch, max_blocks, heads_kv, head_dim]`` per sequence in both layouts, with
  ``max_blocks = ceil(capacity / block_size)`` and ``capacity = max_seqlen`` (contiguous) or
  ``max_pages * page_size`` (paged). The centroids are block_size times smaller than the keys, so they
  stay per sequence instead of paging with them; reordering a batch (beam search) is a gather on dim 0 of
  ``block_sums`` and ``cache_seqlens`` (and of the caches, or of ``block_table``, for a paged cache).
  Block j of sequence b holds the sum of its keys at positions < ``cache_seqlens[b]``; blocks past them
  are zero (``kvcache_block_sums`` builds it from a filled cache, a zero tensor is that of empty caches).

Backends: ``"reference"`` (PyTorch, the oracle: it loops over sequences in Python and reads
``cache_seqlens`` and ``block_table`` back to the host, checking their values), ``"triton"``
(``flashmoba.ops.decode``: append, router, split-K attention and merge kernels that read no value on the
host, so a decode step can be captured in a CUDA graph; float16, bfloat16 and float32; it cannot check
lengths or page ids, which the caller keeps in range) and ``"auto"`` (Triton for CUDA tensors of 16-bit or
float32 dtype, else the reference). There is no backward.

``MoBAKVCache`` owns one layer's caches (contiguous, or paged with ``page_size``: a page pool and a
block table it fills as the sequences grow), centroid cache and lengths for a batch, and calls
``moba_attn_with_kvcache`` for you (``append_and_attend``).
"""

from __future__ import annotations

import math

import torch

from flashmoba import reference
from flashmoba._checks import check_bool, check_int, check_positive_int, check_real
from flashmoba.api import (
    BACKENDS,
    _check_heads,
    _check_like_q,
    _check_tensor,
    _checks_enabled,
    _resolve_backend,
    _shapes_only,
    _triton_ops,
    moba_attn,
)

__all__ = ["MoBAKVCache", "kvcache_block_sums", "moba_attn_with_kvcache"]

CACHE_LAYOUT = "[batch, max_seqlen, heads_kv, head_dim] or paged [num_pages, page_size, heads_kv, head_dim]"


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------


def _check_int32_tensor(name: str, tensor, shape: tuple, layout: str, device) -> None:
    """An int32 tensor of ``shape`` (None: any size there) on ``device``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"{name} must be an int32 torch.Tensor of shape {layout}, got {type(tensor).__name__}"
        )
    if tensor.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {tensor.dtype}")
    if tensor.ndim != len(shape) or any(want not in (None, got) for want, got in zip(shape, tensor.shape)):
        expected = tuple("*" if want is None else want for want in shape)
        raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(tensor.shape)}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} must be on the tensors' device {device}, got {tensor.device}")


def _check_cache(k_cache, cache_seqlens, block_table, batch: int, device) -> int:
    """Check the key cache, cache_seqlens and block_table; returns the capacity of each sequence."""
    _check_tensor("k_cache", k_cache, 4, CACHE_LAYOUT)
    if k_cache.device != device:
        raise ValueError(f"k_cache must be on q's device {device}, got {k_cache.device}")
    _check_int32_tensor("cache_seqlens", cache_seqlens, (batch,), "[batch]", device)
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(
                f"k_cache must have the batch size {batch} (dimension 0) without block_table, "
                f"got shape {tuple(k_cache.shape)}"
            )
        return k_cache.shape[1]
    _check_int32_tensor("block_table", block_table, (batch, None), "[batch, max_pages]", device)
    if k_cache.shape[1] < 1:
        raise ValueError(f"k_cache must have page_size >= 1 (dimension 1), got shape {tuple(k_cache.shape)}")
    return block_table.shape[1] * k_cache.shape[1]


def _check_block_sums(block_sums, k_cache: torch.Tensor, batch: int, capacity: int, block_size: int) -> None:
    expected_dtype = reference._compute_dtype(k_cache.dtype)
    expected_shape = (batch, -(-capacity // block_size), k_cache.shape[2], k_cache.shape[3])
    layout = "[batch, ceil(capacity / block_size), heads_kv, head_dim]"
    if not isinstance(block_sums, torch.Tensor):
        raise TypeError(
            f"block_sums must be a {expected_dtype} torch.Tensor of shape {layout} = {expected_shape}, "
            f"got {type(block_sums).__name__}"
        )
    if block_sums.dtype != expected_dtype:
        raise TypeError(
            f"block_sums must be {expected_dtype} for {k_cache.dtype} caches, got {block_sums.dtype}"
        )
    if tuple(block_sums.shape) != expected_shape:
        raise ValueError(
            f"block_sums must have shape {layout} = {expected_shape} (capacity {capacity}, block_size "
            f"{block_size}), got {tuple(block_sums.shape)}"
        )
    if block_sums.device != k_cache.device:
        raise ValueError(
            f"block_sums must be on the cache's device {k_cache.device}, got {block_sums.device}"
        )


def _check_inputs(q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table) -> int:
    """Types, shapes, dtypes and devices (no values read); returns the capacity of each sequence."""
    _check_tensor("q", q, 4, "[batch, seqlen_q, heads_q, head_dim]")
    batch, seqlen_q, heads_q, head_dim = q.shape
    capacity = _check_cache(k_cache, cache_seqlens, block_table, batch, q.device)
    _check_tensor("v_cache", v_cache, 4, CACHE_LAYOUT)
    _check_like_q("k_cache", k_cache, q)
    _check_like_q("v_cache", v_cache, q)
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    _check_heads(q, k_cache, "k_cache")
    heads_kv = k_cache.shape[2]
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got q of shape {tuple(q.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v (the new keys and values) must be given together, or neither")
    if k is not None:
        layout = "[batch, seqlen_q, heads_kv, head_dim]"
        expected = (batch, seqlen_q, heads_kv, head_dim)
        for name, tensor in (("k", k), ("v", v)):
            _check_tensor(name, tensor, 4, layout)
            _check_like_q(name, tensor, q)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name} must have shape {layout} = {expected}, got {tuple(tensor.shape)}")
    _check_block_sums(block_sums, k_cache, batch, capacity, block_size)
    return capacity


def _check_no_grad(**tensors) -> None:
    if not torch.is_grad_enabled():
        return
    needing = [name for name, tensor in tensors.items() if tensor is not None and tensor.requires_grad]
    if needing:
        raise RuntimeError(
            f"moba_attn_with_kvcache has no backward (decode with a KV cache is inference only), but "
            f"{', '.join(needing)} require grad; call it under torch.no_grad() or torch.inference_mode(), "
            "or use moba_attn for training"
        )


def _read_lengths(cache_seqlens: torch.Tensor, capacity: int, new: int, has_new: bool, seqlen_q: int) -> list:
    """cache_seqlens read back to the host and checked: non-negative, within the capacity once the new
    keys are appended, and (without new keys) holding the queries' positions."""
    lengths = [int(x) for x in cache_seqlens.tolist()]
    for b, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {length} for sequence {b}")
        if length + new > capacity:
            appended = f" plus {new} new keys" if new else ""
            raise ValueError(
                f"cache_seqlens[{b}] = {length}{appended} exceeds the cache's capacity of {capacity} "
                "positions per sequence (max_seqlen, or max_pages * page_size for a paged cache)"
            )
        if not has_new and 0 < length < seqlen_q:
            raise ValueError(
                f"cache_seqlens[{b}] = {length} is shorter than seqlen_q = {seqlen_q}: without new k, v the "
                "queries are the last seqlen_q positions of the cached sequence (or the sequence is empty, 0)"
            )
    return lengths


def _read_pages(block_table: torch.Tensor | None, lengths: list, page_size: int, num_pages: int) -> list:
    """The page ids each sequence uses, read back and checked to be in range (None: contiguous)."""
    if block_table is None:
        return [None] * len(lengths)
    rows = block_table.tolist()
    pages = []
    for b, (row, length) in enumerate(zip(rows, lengths)):
        used = row[: -(-length // page_size)]
        bad = [page for page in used if not 0 <= page < num_pages]
        if bad:
            raise ValueError(
                f"block_table[{b}] must hold page ids in [0, {num_pages}) for the {len(used)} pages sequence "
                f"{b} uses, got {bad[0]}"
            )
        pages.append(torch.tensor(used, dtype=torch.long, device=block_table.device))
    return pages


# ----------------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------------


def _locate(cache: torch.Tensor, b: int, pages, positions: torch.Tensor, page_size: int):
    """Index of sequence b's positions in the cache: (batch row, position) or (page, slot)."""
    if pages is None:
        return b, positions
    return pages[torch.div(positions, page_size, rounding_mode="floor")], positions % page_size


def _append(k_cache, v_cache, block_sums, b, pages, start, k_new, v_new, block_size, page_size) -> None:
    """Write sequence b's new keys and values at positions start.. and add the keys to their blocks'
    sums (one sum per block of the padded new keys: deterministic, no atomics)."""
    count = k_new.shape[0]
    positions = torch.arange(start, start + count, device=k_cache.device)
    index = _locate(k_cache, b, pages, positions, page_size)
    k_cache[index] = k_new
    v_cache[index] = v_new
    first, last = start // block_size, (start + count - 1) // block_size
    padded = block_sums.new_zeros((last - first + 1) * block_size, *k_new.shape[1:])
    offset = start - first * block_size
    padded[offset : offset + count] = k_new
    block_sums[b, first : last + 1] += padded.view(-1, block_size, *k_new.shape[1:]).sum(dim=1)


def _block_counts(length: int, block_size: int, dtype, device) -> torch.Tensor:
    num_blocks = -(-length // block_size)
    counts = torch.full((num_blocks,), block_size, dtype=dtype, device=device)
    if num_blocks:
        counts[-1] = length - (num_blocks - 1) * block_size
    return counts


def _decode_sequence(q_b, k_cache, v_cache, sums_b, b, pages, length, block_size, topk, scale, page_size):
    """One sequence's new rows: route against block_sums / count, attend to the selected blocks' keys.

    q_b [T, Hq, D]; the sequence is ``length`` keys long and its queries sit at its last T positions.
    Returns o [T, Hq, D] in the compute dtype and lse [Hq, T].
    """
    seqlen_q, heads_q, head_dim = q_b.shape
    compute = reference._compute_dtype(q_b.dtype)
    if length == 0 or seqlen_q == 0:  # an empty sequence: every query sees nothing
        zeros = torch.zeros(seqlen_q, heads_q, head_dim, dtype=compute, device=q_b.device)
        return zeros, torch.full((heads_q, seqlen_q), -math.inf, dtype=compute, device=q_b.device)
    num_blocks = -(-length // block_size)
    counts = _block_counts(length, block_size, sums_b.dtype, sums_b.device)
    routing_keys = reference._routing_keys_from_sums(sums_b[:num_blocks], counts, q_b.dtype)
    in_block = torch.arange(block_size, device=q_b.device)
    outs, lses = [], []
    step = reference._chunk_size(heads_q, max(length, num_blocks * head_dim))
    for start in range(0, seqlen_q, step):
        stop = min(seqlen_q, start + step)
        q_chunk = q_b[start:stop]
        query_pos = torch.arange(start, stop, device=q_b.device) + (length - seqlen_q)
        selected = reference._route_chunk(q_chunk, routing_keys, query_pos, block_size, topk, causal=True)
        # Keys of the blocks any query head of the chunk selected, up to the chunk's last query.
        blocks = selected.any(dim=1).any(dim=0).nonzero().flatten()
        key_pos = (blocks[:, None] * block_size + in_block[None, :]).flatten()
        key_pos = key_pos[key_pos <= query_pos[-1]]
        index = _locate(k_cache, b, pages, key_pos, page_size)
        key_block = torch.div(key_pos, block_size, rounding_mode="floor")
        visible = selected[:, :, key_block] & (key_pos[None, :] <= query_pos[:, None])[:, None, :]
        out, lse = reference._attend_chunk(q_chunk, k_cache[index], v_cache[index], visible, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def moba_attn_with_kvcache_reference(
    q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, scale
):
    """The oracle of decode with a KV cache (arguments checked by the caller, block_size <= capacity).

    Appends k, v (if given) in place, then returns o [B, T, Hq, D] in q's dtype and lse [B, Hq, T] in the
    compute dtype (float64 for float64 inputs).
    """
    batch, seqlen_q, heads_q, _ = q.shape
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    page_size = k_cache.shape[1]
    new = seqlen_q if k is not None else 0
    lengths = _read_lengths(cache_seqlens, capacity, new, k is not None, seqlen_q)
    pages = _read_pages(block_table, [length + new for length in lengths], page_size, k_cache.shape[0])
    # Every check has passed: only now write into the caches.
    if new:
        for b in range(batch):
            _append(k_cache, v_cache, block_sums, b, pages[b], lengths[b], k[b], v[b], block_size, page_size)
    outs, lses = [], []
    for b in range(batch):
        out, lse = _decode_sequence(
            q[b],
            k_cache,
            v_cache,
            block_sums[b],
            b,
            pages[b],
            lengths[b] + new,
            block_size,
            topk,
            scale,
            page_size,
        )
        outs.append(out)
        lses.append(lse)
    compute = reference._compute_dtype(q.dtype)
    if not outs:
        return q.new_zeros(q.shape), torch.empty(0, heads_q, seqlen_q, dtype=compute, device=q.device)
    return torch.stack(outs).to(q.dtype), torch.stack(lses)


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def kvcache_block_sums(
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    *,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """The centroid cache of a filled KV cache: the sum of each block's keys.

    Args:
        k_cache: ``[batch, max_seqlen, heads_kv, head_dim]``, or paged ``[num_pages, page_size, heads_kv,
            head_dim]`` with ``block_table``.
        cache_seqlens: int32 ``[batch]``: only the first ``cache_seqlens[b]`` keys of sequence b count.
        block_size: keys per block.
        block_table: int32 ``[batch, max_pages]`` page ids of a paged cache.

    Returns:
        ``[batch, ceil(capacity / block_size), heads_kv, head_dim]`` in float32 (float64 for float64 keys),
        capacity = ``max_seqlen`` or ``max_pages * page_size``; blocks past ``cache_seqlens[b]`` are zero.
    """
    block_size = check_positive_int("block_size", block_size)
    _check_tensor("k_cache", k_cache, 4, CACHE_LAYOUT)
    _check_int32_tensor("cache_seqlens", cache_seqlens, (None,), "[batch]", k_cache.device)
    batch = cache_seqlens.shape[0]
    capacity = _check_cache(k_cache, cache_seqlens, block_table, batch, k_cache.device)
    num_blocks = -(-capacity // block_size)
    result = k_cache.new_zeros(
        batch, num_blocks, *k_cache.shape[2:], dtype=reference._compute_dtype(k_cache.dtype)
    )
    if k_cache.is_meta:
        return result
    lengths = _read_lengths(cache_seqlens, capacity, 0, True, 0)
    pages = _read_pages(block_table, lengths, k_cache.shape[1], k_cache.shape[0])
    block_size = min(block_size, max(1, capacity))  # one block per sequence, with nothing sized by it
    with torch.no_grad():
        for b, length in enumerate(lengths):
            positions = torch.arange(length, device=k_cache.device)
            keys = k_cache[_locate(k_cache, b, pages[b], positions, k_cache.shape[1])]
            sums, _ = reference._block_sums(keys, block_size)
            result[b, : sums.shape[0]] = sums
    return result


# The reference as a custom op, opaque to torch.compile (as the Triton backend's flashmoba::moba_decode,
# with the same schema): it reads lengths and page ids on the host, which traced would be a graph break
# each, and its per-sequence loops would be traced and recompiled for every cache length. Its outputs'
# shapes follow from the inputs' alone (the fake kernel). Registering it imports no Triton.
@torch.library.custom_op(
    "flashmoba::moba_decode_reference",
    mutates_args=("k_cache", "v_cache", "block_sums"),
    schema=(
        "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) block_sums, Tensor cache_seqlens, "
        "SymInt block_size, SymInt topk, Tensor? k, Tensor? v, Tensor? block_table, float softmax_scale) "
        "-> (Tensor, Tensor)"
    ),
)
def _reference_op(q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, scale):
    out, lse = moba_attn_with_kvcache_reference(
        q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, scale
    )
    return out, lse.float()


@_reference_op.register_fake
def _(q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, scale):
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


def moba_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_sums: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    topk: int,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Causal MoBA of new queries against a KV cache (decode, chunked prefill, speculative verification).

    Args:
        q: ``[batch, seqlen_q, heads_q, head_dim]`` new queries.
        k_cache, v_cache: ``[batch, max_seqlen, heads_kv, head_dim]``, or paged ``[num_pages, page_size,
            heads_kv, head_dim]`` with ``block_table``; ``heads_q`` must be a multiple of ``heads_kv``.
        block_sums: the centroid cache, ``[batch, ceil(capacity / block_size), heads_kv, head_dim]`` per
            sequence in both layouts (capacity = ``max_seqlen`` or ``max_pages * page_size``), float32
            (float64 for float64 caches); see ``kvcache_block_sums`` and the module docstring.
        cache_seqlens: int32 ``[batch]`` keys already cached per sequence (not advanced by this call).
        block_size, topk: as in ``moba_attn`` (the own block counts as one of the topk).
        k, v: optional ``[batch, seqlen_q, heads_kv, head_dim]`` new keys and values, written in place into
            the caches at positions ``cache_seqlens[b] ..`` and added in place to ``block_sums``; sequence b
            is then ``cache_seqlens[b] + seqlen_q`` long. Without them sequence b is its first
            ``cache_seqlens[b]`` cached keys, which must be >= seqlen_q (or 0: an empty sequence, whose
            rows are zeros with lse -inf).
        block_table: int32 ``[batch, max_pages]`` page ids of a paged cache.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: ``"auto"`` (Triton for CUDA tensors but float64, else the reference), ``"reference"`` or
            ``"triton"`` (CUDA, or CPU tensors under TRITON_INTERPRET=1; no float64; reads no value on the
            host, so it checks no length or page id: see the module docstring).
        return_lse: also return the float32 log-sum-exp ``[batch, heads_q, seqlen_q]``.

    Returns:
        o like q: row i of sequence b equals row ``L_b - seqlen_q + i`` of ``moba_attn(q_b, K_b, V_b,
        block_size, topk, causal=True)`` over the whole sequence; and lse if ``return_lse``.

    Raises RuntimeError where an input requires grad under grad mode: decode has no backward.

    Both backends run as ``torch.library`` custom ops (``flashmoba::moba_decode_reference``,
    ``flashmoba::moba_decode``) that declare the in-place writes to the caches, so
    ``torch.compile(fullgraph=True)`` traces a caller whole (the checks above are skipped while tracing).
    """
    checks = _checks_enabled()
    if checks:
        block_size = check_positive_int("block_size", block_size)
        topk = check_positive_int("topk", topk)
        if softmax_scale is not None:
            check_real("softmax_scale", softmax_scale)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_bool("return_lse", return_lse)
        capacity = _check_inputs(
            q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table
        )
    else:
        capacity = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    _check_no_grad(q=q, k_cache=k_cache, v_cache=v_cache, block_sums=block_sums, k=k, v=v)
    block_size = min(block_size, max(1, capacity))  # a block beyond the capacity is one block per sequence
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    batch, seqlen_q, heads_q, _ = q.shape
    if q.is_meta:
        out, lse = _shapes_only(q, (batch, heads_q, seqlen_q))
    elif _resolve_backend(backend, q) == "triton":
        if q.dtype == torch.float64:
            raise ValueError(
                "moba_attn_with_kvcache: backend='triton' supports float16, bfloat16 and float32; "
                "use backend='reference' (or 'auto') for float64"
            )
        # The custom op flashmoba::moba_decode (ops.autograd): opaque to torch.compile, which traces
        # this branch with fullgraph=True (it reads no tensor value on the host).
        with torch.no_grad():
            out, lse = _triton_ops().autograd.moba_decode_with_kvcache_triton(
                q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, scale
            )
    else:
        with torch.no_grad():
            out, lse = _reference_op(
                q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, scale
            )
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------
# The cache object
# ----------------------------------------------------------------------------------------------------


class MoBAKVCache:
    """One layer's KV cache for a batch, contiguous or paged: K, V, the centroid cache and the lengths.

    Args:
        batch, max_seqlen, heads_kv, head_dim: ``batch`` sequences of up to ``max_seqlen`` keys and values
            of ``heads_kv`` heads of ``head_dim``.
        block_size, topk: MoBA's block size and blocks per query (own block included).
        dtype, device: of the keys and values (the block sums are float32, float64 for float64 keys).
        backend: of ``moba_attn_with_kvcache``.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        page_size: None (the default): a contiguous cache, ``k_cache``, ``v_cache`` ``[batch, max_seqlen,
            heads_kv, head_dim]``. An int >= 1: a paged cache (vLLM's layout), a pool ``k_cache``,
            ``v_cache`` ``[num_pages, page_size, heads_kv, head_dim]`` and ``block_table`` int32 ``[batch,
            ceil(max_seqlen / page_size)]``. Every page size works, on both backends: position p of a
            sequence lives at slot ``p % page_size`` of its page ``p // page_size``, so a block may span
            pages and a page may hold several blocks; ``page_size = block_size`` keeps one block a page.
        num_pages: the pool's size (paged only). Default ``batch * ceil(max_seqlen / page_size)``, enough
            for every sequence of the batch to reach ``max_seqlen`` (beam search shares full pages, see
            ``reorder``, but a batch grown by ``reorder`` may need more).

    Attributes ``k_cache``, ``v_cache``, ``block_sums``, ``cache_seqlens`` (int32 ``[batch]``, also
    ``seqlens``) and ``block_table`` (None for a contiguous cache) are exactly the arguments of
    ``moba_attn_with_kvcache``: the object adds their allocation and the bookkeeping of lengths and pages.
    Each call appends ``seqlen_q`` keys to every sequence; the sequences may still differ in length
    when a contiguous cache's ``cache_seqlens`` are set per row (``HybridCache.prefill_ragged`` does).

    A paged cache hands out pages from a free list on the host as the sequences grow: a call taking the
    length from L to L + T takes ``ceil((L + T) / page_size) - ceil(L / page_size)`` pages per sequence, so
    the pool holds only pages with keys in them. A call that needs more pages than are free is refused
    with a ValueError naming ``num_pages``, before anything is written. The object keeps the length
    (``length``) and the page ids on the host, so planning reads nothing from the device; new page ids go
    to ``block_table`` as one copy (from pinned memory, asynchronous, on CUDA) only in calls that cross
    into new pages, and with the Triton backend ``append_and_attend`` never waits for the device. It is
    not capturable in a CUDA graph (a replay would not take pages): capture the contiguous cache. Do not
    change ``cache_seqlens`` or ``block_table`` by hand: the host's copies are the truth.
    """

    def __init__(
        self,
        batch: int,
        max_seqlen: int,
        heads_kv: int,
        head_dim: int,
        *,
        block_size: int,
        topk: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        backend: str = "auto",
        softmax_scale: float | None = None,
        page_size: int | None = None,
        num_pages: int | None = None,
    ):
        batch = check_int("batch", batch, minimum=0)
        max_seqlen = check_positive_int("max_seqlen", max_seqlen)
        heads_kv = check_positive_int("heads_kv", heads_kv)
        head_dim = check_positive_int("head_dim", head_dim)
        self.block_size = check_positive_int("block_size", block_size)
        self.topk = check_positive_int("topk", topk)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if softmax_scale is not None:
            softmax_scale = check_real("softmax_scale", softmax_scale)
        self.backend, self.softmax_scale = backend, softmax_scale
        self._max_seqlen = max_seqlen
        self.page_size: int | None = None
        self.block_table: torch.Tensor | None = None
        if page_size is None:
            if num_pages is not None:
                raise ValueError(
                    f"num_pages (got {num_pages!r}) sizes a paged cache's pool: give page_size too, or leave "
                    "num_pages None for a contiguous cache"
                )
            shape = (batch, max_seqlen, heads_kv, head_dim)
            capacity = max_seqlen
        else:
            self.page_size = check_positive_int("page_size", page_size)
            max_pages = -(-max_seqlen // self.page_size)
            if num_pages is None:
                num_pages = batch * max_pages
            else:
                num_pages = check_positive_int("num_pages", num_pages)
            shape = (num_pages, self.page_size, heads_kv, head_dim)
            capacity = max_pages * self.page_size  # what moba_attn_with_kvcache sizes block_sums by
            # Entries past the pages a sequence uses are never read; zeros keep them valid page ids.
            self.block_table = torch.zeros(batch, max_pages, dtype=torch.int32, device=device)
            self._reset_pages(batch, num_pages)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        num_blocks = -(-capacity // self.block_size)
        self.block_sums = torch.zeros(
            batch, num_blocks, heads_kv, head_dim, dtype=reference._compute_dtype(dtype), device=device
        )
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def seqlens(self) -> torch.Tensor:
        """int32 ``[batch]``: keys cached per sequence."""
        return self.cache_seqlens

    @property
    def batch_size(self) -> int:
        return self.cache_seqlens.shape[0]

    @property
    def max_seqlen(self) -> int:
        return self._max_seqlen

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def length(self) -> int | None:
        """Paged: the host's copy of the length every sequence has (None for a contiguous cache, whose
        lengths live on the device only, so that a CUDA-graph replay of a step may advance them)."""
        return self._length if self.paged else None

    @property
    def num_pages(self) -> int | None:
        """Paged: the pool's size (None for a contiguous cache)."""
        return self.k_cache.shape[0] if self.paged else None

    @property
    def num_free_pages(self) -> int | None:
        """Paged: pages no sequence holds (None for a contiguous cache)."""
        return len(self._free) if self.paged else None

    @property
    def pages(self) -> list | None:
        """Paged: the host's copy of each sequence's page ids, in position order (a copy; None for a
        contiguous cache). Row b of ``block_table`` starts with ``pages[b]``."""
        return [list(row) for row in self._pages] if self.paged else None

    def __repr__(self) -> str:
        heads_kv, head_dim = self.k_cache.shape[2:]
        paging = f", page_size={self.page_size}, num_pages={self.num_pages}" if self.paged else ""
        return (
            f"MoBAKVCache(batch={self.batch_size}, max_seqlen={self.max_seqlen}, heads_kv={heads_kv}, "
            f"head_dim={head_dim}, block_size={self.block_size}, topk={self.topk}, "
            f"dtype={self.k_cache.dtype}{paging})"
        )

    @classmethod
    def for_layers(cls, num_layers: int, *args, **kwargs) -> list[MoBAKVCache]:
        """``num_layers`` caches, one per layer of a model, each ``MoBAKVCache(*args, **kwargs)``: they
        share nothing (a paged one has its own pool of ``num_pages`` pages and its own free list)."""
        num_layers = check_int("num_layers", num_layers, minimum=0)
        return [cls(*args, **kwargs) for _ in range(num_layers)]

    # Paged bookkeeping. Invariants: the free list and the pages the rows hold partition the pool; row b
    # holds exactly ceil(length / page_size) pages; a page a row will write (its partly filled last one)
    # is held by that row alone, while full pages, which nothing writes again, may be shared by rows
    # (after reorder); block_table[b, :len(row)] equals the host's row b.

    def _reset_pages(self, batch: int, num_pages: int) -> None:
        self._length = 0
        self._pages: list[list[int]] = [[] for _ in range(batch)]
        # A stack: pages are handed out lowest id first, so a fresh cache fills the pool in order.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    def _exhausted(self, what: str, need: int, batch: int) -> ValueError:
        return ValueError(
            f"the page pool is exhausted: {what} takes {need} more pages of page_size={self.page_size}, but "
            f"only {len(self._free)} of num_pages={self.num_pages} are free; allocate the cache with a "
            f"larger num_pages (batch * ceil(max_seqlen / page_size) = "
            f"{batch * self.block_table.shape[1]} hold {batch} sequences at full length)"
        )

    def _to_table(self, rows: list) -> torch.Tensor:
        """Host page ids as an int32 tensor on the cache's device, without waiting for the device: on
        CUDA the copy leaves pinned memory asynchronously (the caching host allocator keeps the buffer
        alive until the copy is done)."""
        host = torch.tensor(rows, dtype=torch.int32)
        device = self.block_table.device
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)

    def _grow(self, new_length: int) -> int:
        """Give every row the pages positions < new_length need, from the free list, and write their ids
        into block_table. Refused (nothing changed) when the pool is short. Returns the pages each row
        held before, for ``_shrink``."""
        have = -(-self._length // self.page_size)
        want = -(-new_length // self.page_size)
        need = (want - have) * self.batch_size
        if need > len(self._free):
            raise self._exhausted(
                f"growing {self.batch_size} sequences from {self._length} to {new_length} keys",
                need,
                self.batch_size,
            )
        if need:
            new = [[self._free.pop() for _ in range(want - have)] for _ in range(self.batch_size)]
            for row, pages in zip(self._pages, new):
                row.extend(pages)
            self.block_table[:, have:want].copy_(self._to_table(new))
        return have

    def _shrink(self, have: int) -> None:
        """Undo ``_grow``: the pages past the first ``have`` of every row go back on the free list in the
        order they were taken (block_table's entries past them are not read)."""
        for row in reversed(self._pages):
            self._free.extend(reversed(row[have:]))
            del row[have:]

    def append_and_attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False
    ):
        """Append ``k``, ``v`` ``[batch, seqlen_q, heads_kv, head_dim]`` and attend the new queries ``q``
        ``[batch, seqlen_q, heads_q, head_dim]`` (``moba_attn_with_kvcache`` with ``k=k, v=v``), then
        advance the lengths by ``seqlen_q``. Returns o like q (and the lse if ``return_lse``).

        Paged: the pages the new keys need are taken first (planned on the host; a ValueError naming
        ``num_pages`` when the pool is short, ``max_seqlen`` past the capacity), and given back if the
        call is then refused, so a refused call changes nothing."""
        if k is None or v is None:  # without them the function appends nothing, yet the lengths advance
            raise TypeError("append_and_attend needs k and v, the new keys and values [batch, seqlen_q, ...]")
        have = None
        if self.paged:
            _check_tensor("q", q, 4, "[batch, seqlen_q, heads_q, head_dim]")
            new_length = self._length + q.shape[1]
            if new_length > self.max_seqlen:
                raise ValueError(
                    f"cache length {self._length} plus {q.shape[1]} new keys exceeds the cache's capacity of "
                    f"max_seqlen={self.max_seqlen} positions per sequence"
                )
            have = self._grow(new_length)
        try:
            result = moba_attn_with_kvcache(
                q,
                self.k_cache,
                self.v_cache,
                self.block_sums,
                self.cache_seqlens,
                self.block_size,
                self.topk,
                k=k,
                v=v,
                block_table=self.block_table,
                softmax_scale=self.softmax_scale,
                backend=self.backend,
                return_lse=return_lse,
            )
        except BaseException:
            if have is not None:  # the function writes nothing before its checks pass
                self._shrink(have)
            raise
        self.cache_seqlens += q.shape[1]  # only reached once every check has passed and the keys are in
        if self.paged:
            self._length = new_length
        return result

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend prompts on an empty cache and store them: ``moba_attn(q, k, v)`` (causal, the training
        kernels, which at a long prompt are far faster than routing each row as a decode step), then
        ``k``, ``v`` written at the start of every sequence, their block sums into ``block_sums`` and the
        lengths set to ``seqlen_q``. q, k, v as for ``append_and_attend``; the result is the same function
        (``moba_attn_with_kvcache`` on an empty cache is ``moba_attn``). Checking that a contiguous cache
        is empty reads the lengths on the host once; a paged one knows its length on the host, takes the
        prompt's pages (a ValueError naming ``num_pages`` when the pool is short) and reads nothing back."""
        if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]:
            raise ValueError(
                "q must be [batch, seqlen, heads_q, head_dim] and k, v [batch, seqlen, heads_kv, head_dim], "
                f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        batch, seqlen = k.shape[:2]
        if batch != self.batch_size or k.shape[2:] != self.k_cache.shape[2:] or seqlen > self.max_seqlen:
            raise ValueError(
                f"k must be [{self.batch_size}, <= {self.max_seqlen}, {self.k_cache.shape[2]}, "
                f"{self.k_cache.shape[3]}] for this cache, got {tuple(k.shape)}"
            )
        if self._length != 0 if self.paged else bool((self.cache_seqlens != 0).any()):
            raise ValueError("prefill needs an empty cache (reset() it, or append_and_attend to continue)")
        if self.paged:
            return self._prefill_pages(q, k, v)
        out = moba_attn(
            q, k, v, self.block_size, self.topk, softmax_scale=self.softmax_scale, backend=self.backend
        )
        with torch.no_grad():
            self.k_cache[:, :seqlen] = k
            self.v_cache[:, :seqlen] = v
            self.cache_seqlens.fill_(seqlen)
            self.block_sums.copy_(kvcache_block_sums(self.k_cache, self.cache_seqlens, self.block_size))
        return out

    def _prefill_pages(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """prefill of a paged cache (checked by prefill): pages taken before any work, so a short pool
        costs nothing; given back if moba_attn refuses the inputs."""
        batch, seqlen = k.shape[:2]
        have = self._grow(seqlen)
        try:
            out = moba_attn(
                q, k, v, self.block_size, self.topk, softmax_scale=self.softmax_scale, backend=self.backend
            )
        except BaseException:
            self._shrink(have)
            raise
        with torch.no_grad():
            positions = torch.arange(seqlen, device=self.block_table.device)
            # [batch, seqlen] page of every prompt position, gathered on the device from block_table.
            pages = self.block_table[:, torch.div(positions, self.page_size, rounding_mode="floor")].long()
            slots = positions % self.page_size
            self.k_cache[pages, slots] = k
            self.v_cache[pages, slots] = v
            # The sums kvcache_block_sums takes of the filled cache (the same keys and the same function,
            # with its block size clamped to the capacity likewise), taken from k without reading back.
            capacity = self.block_table.shape[1] * self.page_size
            block = min(self.block_size, capacity)
            for b in range(batch):
                sums, _ = reference._block_sums(k[b].to(self.k_cache.dtype), block)
                self.block_sums[b, : sums.shape[0]] = sums
            self.cache_seqlens.fill_(seqlen)
        self._length = seqlen
        return out

    def reset(self) -> None:
        """Empty every sequence (the tensors stay allocated). A paged cache gives every page back to the
        free list without zeroing the pool: a slot is read only after a call has written it."""
        if self.paged:
            self._reset_pages(self.batch_size, self.num_pages)
            self.block_table.zero_()
        else:
            self.k_cache.zero_()
            self.v_cache.zero_()
        self.block_sums.zero_()
        self.cache_seqlens.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        """Gather the sequences along the batch: sequence i becomes old sequence ``index[i]`` (beam search;
        ``index`` int64 ``[new_batch]`` may repeat or drop sequences, so the batch may change size).

        Paged: the rows keeping a sequence share its full pages (nothing writes a full page again), and
        its partly filled last page, the one the next call appends to, stays with the first row taking the
        sequence and is copied to a fresh page for every other, so no two rows ever write one page. Pages
        no row keeps go back to the free list. The plan reads ``index`` on the host (one synchronisation
        where it lives on a device); a plan short of pages is refused (naming ``num_pages``) before any
        change."""
        if (
            not isinstance(index, torch.Tensor)
            or index.ndim != 1
            or index.dtype.is_floating_point
            or index.dtype.is_complex
            or index.dtype == torch.bool
        ):
            raise TypeError("index must be a 1-D integer torch.Tensor [new_batch]")
        if self.paged:
            rows = index.tolist()
            if any(not 0 <= row < self.batch_size for row in rows):
                raise ValueError(f"index must hold sequence ids in [0, {self.batch_size}), got {rows}")
            self._reorder_pages(rows)
        index = index.to(device=self.block_sums.device, dtype=torch.long)
        if not self.paged:
            if index.numel() and not bool(((index >= 0) & (index < self.batch_size)).all()):
                raise ValueError(
                    f"index must hold sequence ids in [0, {self.batch_size}), got {index.tolist()}"
                )
            self.k_cache = self.k_cache.index_select(0, index)
            self.v_cache = self.v_cache.index_select(0, index)
        self.block_sums = self.block_sums.index_select(0, index)
        self.cache_seqlens = self.cache_seqlens.index_select(0, index)

    def _reorder_pages(self, rows: list) -> None:
        """The page plan of ``reorder`` (rows checked): new host rows, copies of shared last pages, the
        free list, and a new block_table."""
        full, partial = divmod(self._length, self.page_size)
        new_rows, copies, kept = [], [], set()
        for old in rows:
            pages = self._pages[old][:full]
            if partial and old in kept:
                copies.append((self._pages[old][full], len(new_rows)))  # its fresh page comes below
            elif partial:
                kept.add(old)
                pages.append(self._pages[old][full])
            new_rows.append(pages)
        held = {page for row in new_rows for page in row}
        # Copy sources are last pages some new row keeps, so none of them is freed here.
        freed = {page for row in self._pages for page in row} - held
        if len(copies) > len(self._free) + len(freed):
            raise self._exhausted(
                f"reordering to {len(rows)} sequences of {self._length} keys (copying {len(copies)} partly "
                f"filled last pages, freeing {len(freed)})",
                len(copies),
                len(rows),
            )
        self._free.extend(sorted(freed, reverse=True))
        sources, targets = [], []
        for source, row in copies:
            target = self._free.pop()
            new_rows[row].append(target)
            sources.append(source)
            targets.append(target)
        if copies:
            device = self.k_cache.device
            sources = torch.tensor(sources, dtype=torch.long, device=device)
            targets = torch.tensor(targets, dtype=torch.long, device=device)
            self.k_cache.index_copy_(0, targets, self.k_cache.index_select(0, sources))
            self.v_cache.index_copy_(0, targets, self.v_cache.index_select(0, sources))
        width = self.block_table.shape[1]
        table = self.block_table.new_zeros(len(rows), width)
        if rows and width:
            table.copy_(self._to_table([row + [0] * (width - len(row)) for row in new_rows]))
        self.block_table = table
        self._pages = new_rows
