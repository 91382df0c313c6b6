"""The Triton path as ``torch.library`` custom ops, and the functions ``flashmoba.api`` calls.

Ops (namespace ``flashmoba``), each with a fake kernel so ``torch.compile(fullgraph=True)`` traces
through them and ``torch.library.opcheck`` passes:

- ``flashmoba::select_varlen``: the router (no gradient; int32 output).
- ``flashmoba::sparse_attn_fwd``: attention over a given selection -> (o, lse, entries, offsets); its
  autograd formula (``register_autograd``, which torch turns into one ``autograd.Function``) saves the
  inputs, o, lse and the index, and calls
- ``flashmoba::sparse_attn_bwd``: -> (dq, dk, dv).

Everything is packed (varlen); a padded ``[B, T, H, D]`` batch is viewed as B sequences of length T with
``cu_seqlens = arange(B + 1) * T`` built on the device.
"""

from __future__ import annotations

import torch

from flashmoba.ops import router
from flashmoba.ops.backward import sparse_attention_backward
from flashmoba.ops.forward import check_supported, chunking, sparse_attention_forward
from flashmoba.ops.index import num_block_slots

# ----------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("flashmoba::select_varlen", mutates_args=())
def select_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    topk: int,
    causal: bool,
) -> torch.Tensor:
    return router.route_varlen(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, causal
    )


@select_varlen.register_fake
def _(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, causal):
    return q.new_empty((q.shape[0], q.shape[1], topk), dtype=torch.int32)


@torch.library.custom_op("flashmoba::sparse_attn_fwd", mutates_args=())
def sparse_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int,
    causal: bool,
    softmax_scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # deterministic only matters to the backward; the forward is deterministic always.
    return sparse_attention_forward(
        q, k, v, selected, cu_seqlens_q, cu_seqlens_k, block_size, causal, softmax_scale
    )


@sparse_attn_fwd.register_fake
def _(q, k, v, selected, cu_seqlens_q, cu_seqlens_k, block_size, causal, softmax_scale, deterministic):
    total_q, heads_q, head_dim = q.shape
    topk = selected.shape[-1]
    batch = cu_seqlens_q.shape[0] - 1
    block_slots = num_block_slots(k.shape[0], batch, block_size)
    row_chunks = chunking(total_q, heads_q, topk, head_dim, q.dtype).row_chunks
    out = q.new_empty(q.shape)
    lse = q.new_empty((heads_q, total_q), dtype=torch.float32)
    entries = q.new_empty((total_q * heads_q * topk,), dtype=torch.int32)
    offsets = q.new_empty((heads_q * block_slots * row_chunks + 1,), dtype=torch.int32)
    return out, lse, entries, offsets


@torch.library.custom_op("flashmoba::sparse_attn_bwd", mutates_args=())
def sparse_attn_bwd(
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
    return sparse_attention_backward(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        entries,
        offsets,
        cu_seqlens_q,
        cu_seqlens_k,
        block_size,
        causal,
        softmax_scale,
        deterministic,
    )


@sparse_attn_bwd.register_fake
def _(
    grad_out,
    grad_lse,
    q,
    k,
    v,
    out,
    lse,
    entries,
    offsets,
    cu_seqlens_q,
    cu_seqlens_k,
    block_size,
    causal,
    softmax_scale,
    deterministic,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _selected, cu_seqlens_q, cu_seqlens_k, block_size, causal, softmax_scale, deterministic = inputs
    out, lse, entries, offsets = output
    ctx.save_for_backward(q, k, v, out, lse, entries, offsets, cu_seqlens_q, cu_seqlens_k)
    ctx.block_size, ctx.causal, ctx.softmax_scale, ctx.deterministic = (
        block_size,
        causal,
        softmax_scale,
        deterministic,
    )
    ctx.mark_non_differentiable(entries, offsets)


def _backward(ctx, grad_out, grad_lse, _grad_entries, _grad_offsets):
    q, k, v, out, lse, entries, offsets, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = sparse_attn_bwd(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        entries,
        offsets,
        cu_seqlens_q,
        cu_seqlens_k,
        ctx.block_size,
        ctx.causal,
        ctx.softmax_scale,
        ctx.deterministic,
    )
    return grad_q, grad_k, grad_v, None, None, None, None, None, None, None


sparse_attn_fwd.register_autograd(_backward, setup_context=_setup_context)

# ----------------------------------------------------------------------------------------------------
# Functions called by flashmoba.api
# ----------------------------------------------------------------------------------------------------


def _padded_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


def sparse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int,
    causal: bool,
    softmax_scale: float,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a given selection (differentiable in q, k, v).

    q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, selected int32 ``[total_q, Hq, topk]`` (block ids local
    to each sequence, -1 unused). Returns o ``[total_q, Hq, D]`` and lse ``[Hq, total_q]`` float32.
    """
    check_supported(q, k, selected.shape[-1])
    out, lse, _, _ = sparse_attn_fwd(
        q, k, v, selected, cu_seqlens_q, cu_seqlens_k, block_size, causal, softmax_scale, deterministic
    )
    return out, lse


def moba_select_varlen_triton(
    q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, causal
):
    """Selected blocks of packed q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]`` -> int32 ``[total_q, Hq, topk]``."""
    return select_varlen(
        q.detach(),
        k.detach(),
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        block_size,
        topk,
        causal,
    )


def moba_select_triton(q, k, block_size, topk, causal):
    """Selected blocks of padded q ``[B, T, Hq, D]``, k ``[B, S, Hkv, D]`` -> int32 ``[B, T, Hq, topk]``."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k = k.shape[1]
    selected = moba_select_varlen_triton(
        q.reshape(batch * seqlen_q, heads_q, head_dim),
        k.reshape(batch * seqlen_k, k.shape[2], head_dim),
        _padded_cu_seqlens(batch, seqlen_q, q.device),
        _padded_cu_seqlens(batch, seqlen_k, q.device),
        seqlen_q,
        seqlen_k,
        block_size,
        topk,
        causal,
    )
    return selected.view(batch, seqlen_q, heads_q, topk)


def moba_attn_varlen_triton(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    block_size,
    topk,
    causal,
    softmax_scale,
    deterministic=False,
):
    """MoBA on packed sequences: q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``.

    Returns o ``[total_q, Hq, D]`` (q's dtype) and lse ``[Hq, total_q]`` float32.
    """
    # Slots past the longest sequence's block count are always empty: route and attend with no more
    # (topk >= number of blocks, "dense MoBA", then costs what the blocks cost, whatever topk says).
    topk = max(1, min(topk, -(-max_seqlen_k // block_size)))
    check_supported(q, k, topk)
    selected = moba_select_varlen_triton(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, causal
    )
    return sparse_attention_varlen(
        q, k, v, selected, cu_seqlens_q, cu_seqlens_k, block_size, causal, softmax_scale, deterministic
    )


def moba_attn_triton(q, k, v, block_size, topk, causal, softmax_scale, deterministic=False):
    """MoBA on a padded batch: q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]``.

    Returns o ``[B, T, Hq, D]`` (q's dtype) and lse ``[B, Hq, T]`` float32.
    """
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    out, lse = moba_attn_varlen_triton(
        q.reshape(batch * seqlen_q, heads_q, head_dim),
        k.reshape(batch * seqlen_k, heads_kv, head_dim),
        v.reshape(batch * seqlen_k, heads_kv, head_dim),
        _padded_cu_seqlens(batch, seqlen_q, q.device),
        _padded_cu_seqlens(batch, seqlen_k, q.device),
        seqlen_q,
        seqlen_k,
        block_size,
        topk,
        causal,
        softmax_scale,
        deterministic,
    )
    out = out.view(batch, seqlen_q, heads_q, head_dim)
    lse = lse.view(heads_q, batch, seqlen_q).transpose(0, 1)
    return out, lse
