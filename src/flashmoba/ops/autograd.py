"""The Triton path as ``torch.library`` custom ops, and the functions ``flashmoba.api`` calls.

Ops (namespace ``flashmoba``), each with a fake kernel so ``torch.compile(fullgraph=True)`` traces
through them and ``torch.library.opcheck`` passes:

- ``flashmoba::select_varlen``: the router (no gradient; int32 output).
- ``flashmoba::sparse_attn_fwd``: attention over a given selection -> (o, lse, entries, offsets); its
  autograd formula (``register_autograd``, which torch turns into one ``autograd.Function``) saves the
  inputs, o, lse and the index, and calls
- ``flashmoba::sparse_attn_bwd``: -> (dq, dk, dv).
- ``flashmoba::moba_decode``: decode with a KV cache (``flashmoba.ops.decode``) -> (o, lse). With new
  k, v it writes them into ``k_cache``, ``v_cache`` and adds them to ``block_sums`` in place, so the
  schema declares those three as mutated (``Tensor(a!)``); torch.compile functionalizes the call and
  Inductor re-inplaces it. No autograd formula: decode is inference only.

Each op takes a ``KernelConfig`` as one trailing optional ``int[]`` (``KernelConfig.encode``): a
dataclass cannot cross the dispatcher, a list of ints can, and left out it is the defaults.

Everything is packed (varlen); a padded ``[B, T, H, D]`` batch is viewed as B sequences of length T with
``cu_seqlens = arange(B + 1) * T`` built on the device.
"""

from __future__ import annotations

import torch

from flashmoba.ops import router
from flashmoba.ops.backward import sparse_attention_backward
from flashmoba.ops.config import DEFAULT_CONFIG, KernelConfig
from flashmoba.ops.decode import check_decode_supported, moba_decode_triton
from flashmoba.ops.forward import check_supported, sparse_attention_forward
from flashmoba.ops.index import num_block_slots
from flashmoba.ops.partials import chunking

# ----------------------------------------------------------------------------------------------------
# KernelConfig through the ops: one optional int[] argument (KernelConfig.encode), None for the defaults
# ----------------------------------------------------------------------------------------------------

_CONFIG_SCHEMA = "int[]? kernel_config=None"


def _config_arguments(config: KernelConfig | None) -> tuple:
    """The op argument that carries ``config`` (none for the defaults)."""
    return () if config is None else (config.encode(),)


def _config_of(arguments: tuple) -> KernelConfig:
    """The config carried by an op's trailing argument (absent or None: the defaults)."""
    return DEFAULT_CONFIG if not arguments or arguments[0] is None else KernelConfig.decode(arguments[0])


# ----------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "flashmoba::select_varlen",
    mutates_args=(),
    schema=(
        "(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
        f"SymInt max_seqlen_k, SymInt block_size, SymInt topk, bool causal, {_CONFIG_SCHEMA}) -> Tensor"
    ),
)
def select_varlen(
    q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, causal, *config
):
    return router.route_varlen(
        q,
        k,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        block_size,
        topk,
        causal,
        config=_config_of(config),
    )


@select_varlen.register_fake
def _(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, causal, *config):
    return q.new_empty((q.shape[0], q.shape[1], topk), dtype=torch.int32)


@torch.library.custom_op(
    "flashmoba::sparse_attn_fwd",
    mutates_args=(),
    schema=(
        "(Tensor q, Tensor k, Tensor v, Tensor selected, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        f"SymInt block_size, bool causal, float softmax_scale, bool deterministic, {_CONFIG_SCHEMA}) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    ),
)
def sparse_attn_fwd(
    q, k, v, selected, cu_seqlens_q, cu_seqlens_k, block_size, causal, softmax_scale, deterministic, *config
):
    # deterministic only matters to the backward; the forward is deterministic always.
    return sparse_attention_forward(
        q, k, v, selected, cu_seqlens_q, cu_seqlens_k, block_size, causal, softmax_scale, _config_of(config)
    )


@sparse_attn_fwd.register_fake
def _(
    q, k, v, selected, cu_seqlens_q, cu_seqlens_k, block_size, causal, softmax_scale, deterministic, *config
):
    total_q, heads_q, head_dim = q.shape
    topk = selected.shape[-1]
    batch = cu_seqlens_q.shape[0] - 1
    block_slots = num_block_slots(k.shape[0], batch, block_size)
    row_chunks = chunking(total_q, heads_q, topk, head_dim, q.dtype, config=_config_of(config)).row_chunks
    out = q.new_empty(q.shape)
    lse = q.new_empty((heads_q, total_q), dtype=torch.float32)
    entries = q.new_empty((total_q * heads_q * topk,), dtype=torch.int32)
    offsets = q.new_empty((heads_q * block_slots * row_chunks + 1,), dtype=torch.int32)
    return out, lse, entries, offsets


_BACKWARD_INPUTS = (
    "Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor entries, Tensor offsets, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt block_size, "
    "bool causal, float softmax_scale, bool deterministic"
)


@torch.library.custom_op(
    "flashmoba::sparse_attn_bwd",
    mutates_args=(),
    schema=f"({_BACKWARD_INPUTS}, {_CONFIG_SCHEMA}) -> (Tensor, Tensor, Tensor)",
)
def sparse_attn_bwd(
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
    *config,
):
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
        _config_of(config),
    )


@sparse_attn_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, *_):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _selected, cu_seqlens_q, cu_seqlens_k, block_size, causal, softmax_scale, deterministic = inputs[
        :10
    ]
    out, lse, entries, offsets = output
    ctx.save_for_backward(q, k, v, out, lse, entries, offsets, cu_seqlens_q, cu_seqlens_k)
    ctx.block_size, ctx.causal, ctx.softmax_scale, ctx.deterministic = (
        block_size,
        causal,
        softmax_scale,
        deterministic,
    )
    ctx.config = tuple(inputs[10:])
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
        *ctx.config,
    )
    # No gradient for the selection, the offsets, the scalars and the config.
    return grad_q, grad_k, grad_v, *(None,) * (7 + len(ctx.config))


sparse_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op(
    "flashmoba::moba_decode",
    mutates_args=("k_cache", "v_cache", "block_sums"),  # as the schema's (a!), (b!), (c!)
    schema=(
        "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) block_sums, Tensor cache_seqlens, "
        "SymInt block_size, SymInt topk, Tensor? k, Tensor? v, Tensor? block_table, float softmax_scale) "
        "-> (Tensor, Tensor)"
    ),
)
def moba_decode(q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, scale):
    # Fresh outputs (a custom op may not return a view of its inputs); the caches change only with k, v.
    return moba_decode_triton(
        q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, scale
    )


@moba_decode.register_fake
def _(q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, scale):
    # The launcher's own shape checks, so that what the kernels do not run fails while tracing too.
    check_decode_supported(q, block_size, topk, block_sums.shape[1], q.shape[0])
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------
# Functions called by flashmoba.api
# ----------------------------------------------------------------------------------------------------


def moba_decode_with_kvcache_triton(
    q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, softmax_scale
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moba_attn_with_kvcache``'s Triton backend through ``flashmoba::moba_decode`` (arguments checked
    by the caller): o like q and the float32 lse ``[batch, Hq, T]``; k, v (if given) appended in place."""
    return moba_decode(
        q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, k, v, block_table, softmax_scale
    )


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
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a given selection (differentiable in q, k, v).

    q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, selected int32 ``[total_q, Hq, topk]`` (block ids
    local to each sequence, -1 unused). Returns o ``[total_q, Hq, D]`` and lse ``[Hq, total_q]`` float32.
    ``config``: the kernels' launch settings (None: the defaults).
    """
    check_supported(q, k, selected.shape[-1])
    out, lse, _, _ = sparse_attn_fwd(
        q,
        k,
        v,
        selected,
        cu_seqlens_q,
        cu_seqlens_k,
        block_size,
        causal,
        softmax_scale,
        deterministic,
        *_config_arguments(config),
    )
    return out, lse


def moba_select_varlen_triton(
    q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, causal, config=None
):
    """Selected blocks of packed q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``: int32
    ``[total_q, Hq, topk]``. ``config``: the top-k kernel's launch settings (None: the defaults)."""
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
        *_config_arguments(config),
    )


def moba_select_triton(q, k, block_size, topk, causal, config=None):
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
        config,
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
    config=None,
):
    """MoBA on packed sequences: q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``.

    Returns o ``[total_q, Hq, D]`` (q's dtype) and lse ``[Hq, total_q]`` float32.
    """
    # Slots past the longest sequence's block count are always empty: route and attend with no more
    # (topk >= number of blocks, "dense MoBA", then costs what the blocks cost, whatever topk says).
    topk = max(1, min(topk, -(-max_seqlen_k // block_size)))
    check_supported(q, k, topk)
    selected = moba_select_varlen_triton(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_size, topk, causal, config
    )
    return sparse_attention_varlen(
        q,
        k,
        v,
        selected,
        cu_seqlens_q,
        cu_seqlens_k,
        block_size,
        causal,
        softmax_scale,
        deterministic,
        config,
    )


def moba_attn_triton(q, k, v, block_size, topk, causal, softmax_scale, deterministic=False, config=None):
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
        config,
    )
    out = out.view(batch, seqlen_q, heads_q, head_dim)
    lse = lse.view(heads_q, batch, seqlen_q).transpose(0, 1)
    return out, lse
