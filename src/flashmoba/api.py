"""Public functions of flashmoba: input checks and backend dispatch.

The contract (every backend computes exactly this; ``flashmoba.reference`` is its definition):

- Keys of each sequence are cut into blocks ``[j*B, (j+1)*B)`` (B = ``block_size``); the last block may be
  partial; blocks restart at every sequence of a packed batch.
- A block's centroid is the mean of its real keys (accumulated in float32). Query head h scores block j
  by ``q . centroid_j`` against kv head ``h // (heads_q // heads_kv)`` (no softmax scale).
- ``causal=True``: query i of a sequence with T queries and S keys sits at key position ``p = i + S - T``
  (bottom-right alignment, as flash-attn). Its own block is always selected and counts as one of the
  ``topk``; the best ``topk - 1`` blocks that end before the own block starts are added. Inside the own
  block only keys at positions <= p are visible. A query with p < 0 sees nothing: output 0, lse -inf.
- ``causal=False``: the best ``topk`` of all blocks; all their keys are visible.
- Ties go to the later block. Attention is the softmax of ``q . k * softmax_scale`` over the visible keys
  of the selected blocks, times v. No gradient flows through the selection.

Backends: ``"reference"`` (PyTorch, any device), ``"triton"`` (fused kernels; CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``), ``"auto"`` (triton on CUDA, reference otherwise and for float64).
An explicit backend never falls back silently.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import torch

from flashmoba import reference
from flashmoba._checks import (
    check_bool,
    check_cu_seqlens_tensor,
    check_cu_seqlens_values,
    check_int,
    check_positive_int,
    check_real,
)

if TYPE_CHECKING:  # for annotations only: importing flashmoba.ops imports Triton
    from flashmoba.ops.config import KernelConfig

BACKENDS = ("auto", "reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------


def _checks_enabled() -> bool:
    """Checks read tensor values; skip them while torch.compile traces or a CUDA graph captures."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_tensor(name: str, tensor, ndim: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")


def _check_like_q(name: str, tensor: torch.Tensor, q: torch.Tensor) -> None:
    """q's dtype, device and head_dim (last dimension)."""
    if tensor.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}, got {tensor.dtype}")
    if tensor.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {tensor.device}")
    if tensor.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{name} must have q's head_dim {q.shape[-1]} (last dimension), got shape {tuple(tensor.shape)}"
        )


def _check_heads(q: torch.Tensor, k: torch.Tensor, k_name: str) -> None:
    """At least one head each (dimension -2), and heads_q a multiple of heads_kv (GQA/MQA)."""
    heads_q, heads_kv = q.shape[-2], k.shape[-2]
    if heads_q < 1 or heads_kv < 1:
        raise ValueError(
            f"q and {k_name} must have at least one head (dimension -2), "
            f"got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if heads_q % heads_kv != 0:
        raise ValueError(
            f"heads_q must be a multiple of heads_kv: q has {heads_q} heads, {k_name} has {heads_kv} "
            f"(shapes {tuple(q.shape)} and {tuple(k.shape)})"
        )


def _check_qkv(q, k, v, ndim: int, q_layout: str, kv_layout: str) -> None:
    _check_tensor("q", q, ndim, q_layout)
    _check_tensor("k", k, ndim, kv_layout)
    if v is not None:
        _check_tensor("v", v, ndim, kv_layout)
    for name, tensor in [("k", k)] + ([("v", v)] if v is not None else []):
        _check_like_q(name, tensor, q)
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    _check_heads(q, k, "k")
    if q.shape[-1] < 1:
        raise ValueError(f"head_dim must be >= 1, got q of shape {tuple(q.shape)}")


def _check_options(block_size, topk, softmax_scale, backend, **flags) -> tuple[int, int]:
    """Check the scalar options and the bool ``flags`` (by name); returns block_size and topk as Python
    ints (NumPy integers pass)."""
    block_size = check_positive_int("block_size", block_size)
    topk = check_positive_int("topk", topk)
    if softmax_scale is not None:
        check_real("softmax_scale", softmax_scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value in flags.items():
        check_bool(name, value)
    return block_size, topk


def _check_kernel_config(kernel_config) -> None:
    """None or a ``flashmoba.ops.KernelConfig``. The class is looked up among the loaded modules, not
    imported: importing ``flashmoba.ops`` imports Triton, and a caller who holds a KernelConfig has loaded
    it already (so anything else, checked without it, cannot be one)."""
    if kernel_config is None:
        return
    config_module = sys.modules.get("flashmoba.ops.config")
    if config_module is None or not isinstance(kernel_config, config_module.KernelConfig):
        raise TypeError(
            "kernel_config must be a flashmoba.ops.KernelConfig or None, got "
            f"{type(kernel_config).__name__} {kernel_config!r}"
        )


def _check_select_width(q: torch.Tensor, topk: int) -> None:
    """moba_select returns topk slots per query head (the contract's width, -1 where unused); refuse a
    topk whose result could not be indexed, instead of failing inside the allocator."""
    slots = q.shape[:-1].numel() * topk
    if slots >= 2**31:
        raise ValueError(
            f"topk={topk} gives moba_select a result of {slots} slots ({tuple(q.shape[:-1])} x topk), "
            "more than 2**31 - 1; pass a topk no larger than the number of key blocks"
        )


def _within_sequence(block_size: int, topk: int, longest_k: int) -> tuple[int, int]:
    """block_size and topk no larger than their meaning needs: a block beyond the longest sequence is one
    block per sequence, a topk beyond its blocks is every block (dense attention). The same function, with
    nothing sized by a huge block_size or topk."""
    block_size = min(block_size, max(1, longest_k))
    return block_size, min(topk, max(1, -(-longest_k // block_size)))


def _check_cu_seqlens(
    name: str,
    cu_seqlens,
    total: int,
    device: torch.device,
    max_seqlen,
    max_name: str,
    read_values: bool = True,
):
    check_cu_seqlens_tensor(name, cu_seqlens, device)
    if not (read_values and _checks_enabled()):
        return
    values = cu_seqlens.tolist()  # one device-to-host copy: a synchronisation on CUDA
    lengths = check_cu_seqlens_values(name, values, total)
    longest = max(lengths, default=0)
    if max_seqlen < longest:
        raise ValueError(f"{max_name} must be >= the longest sequence ({longest}), got {max_seqlen}")


def _check_varlen(
    q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, read_values: bool = True
) -> tuple[int, int]:
    """Check the packing; returns max_seqlen_q and max_seqlen_k as Python ints (NumPy integers pass)."""
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=0)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, minimum=0)
    _check_cu_seqlens(
        "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, max_seqlen_q, "max_seqlen_q", read_values
    )
    _check_cu_seqlens(
        "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, max_seqlen_k, "max_seqlen_k", read_values
    )
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    return max_seqlen_q, max_seqlen_k


# ----------------------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------------------


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    device = q.device
    if backend == "auto":
        # float64 is the reference's alone (the kernels compute in float32 at most).
        return "triton" if device.type == "cuda" and q.dtype != torch.float64 else "reference"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
            f"got device {device}"
        )
    return backend


def _shapes_only(q: torch.Tensor, lse_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of the right shapes and dtypes for meta tensors, which carry no values to compute with."""
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=torch.float32)


def _triton_ops():
    """Import the Triton kernels on first use (importing flashmoba must not import Triton)."""
    try:
        from flashmoba import ops
    except ImportError as error:  # the kernels are not part of this build
        raise NotImplementedError(f"backend='triton' is not available: {error}") from error
    return ops


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def moba_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    topk: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    deterministic: bool = False,
    kernel_config: KernelConfig | None = None,
):
    """Mixture of Block Attention on a padded batch (flash-attn layout).

    Args:
        q: ``[B, T, Hq, D]`` queries.
        k, v: ``[B, S, Hkv, D]`` keys and values; ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA).
        block_size: keys per block (B in the paper).
        topk: blocks each query attends to (in causal mode its own block counts as one).
        causal: bottom-right aligned causal MoBA (see module docstring) or non-causal.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
        return_lse: also return the float32 log-sum-exp ``[B, Hq, T]``.
        deterministic: bitwise reproducible gradients on the Triton backend (the reference always is).
        kernel_config: the Triton kernels' launch settings (a ``flashmoba.ops.KernelConfig``; None: the
            measured defaults); the reference backend ignores it.

    Returns:
        o ``[B, T, Hq, D]`` in q's dtype, and lse ``[B, Hq, T]`` if ``return_lse``.
    """
    if _checks_enabled():
        _check_qkv(
            q, k, v, 4, "[batch, seqlen_q, heads_q, head_dim]", "[batch, seqlen_k, heads_kv, head_dim]"
        )
        block_size, topk = _check_options(
            block_size,
            topk,
            softmax_scale,
            backend,
            causal=causal,
            return_lse=return_lse,
            deterministic=deterministic,
        )
        _check_kernel_config(kernel_config)
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k must have q's batch size {q.shape[0]}, got shape {tuple(k.shape)}")
    block_size, topk = _within_sequence(block_size, topk, k.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    backend = _resolve_backend(backend, q)
    batch, seqlen_q, heads_q, _ = q.shape
    lse_shape = (batch, heads_q, seqlen_q)
    if q.is_meta:
        out, lse = _shapes_only(q, lse_shape)
    elif q.numel() == 0 or k.numel() == 0:  # every query sees nothing: output 0, lse -inf
        out, lse = reference.sees_nothing(q, k, v, q.shape, lse_shape, torch.float32)
    elif backend == "triton":
        out, lse = _triton_ops().moba_attn_triton(
            q, k, v, block_size, topk, causal, scale, deterministic, config=kernel_config
        )
    else:
        out, lse = reference.moba_attn_reference(q, k, v, block_size, topk, causal, scale)
        lse = lse.float()
    return (out, lse) if return_lse else out


def moba_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_size: int,
    topk: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    deterministic: bool = False,
    check_cu_seqlens: bool = True,
    kernel_config: KernelConfig | None = None,
):
    """Mixture of Block Attention on packed sequences (flash-attn varlen layout).

    Args:
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hkv, D]``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]`` sequence starts (0 first, total last).
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (Python ints).
        check_cu_seqlens: read the cu_seqlens values back to check them (0 first, non-decreasing, total
            last, no sequence longer than max_seqlen). On CUDA that read synchronises with the device, once
            per call; a caller that has checked them already (the model checks once per batch for all its
            layers) passes False. Wrong values are then undefined behaviour, as in flash-attn.
        Other arguments as in ``moba_attn``.

    Returns:
        o ``[total_q, Hq, D]`` in q's dtype, and lse ``[Hq, total_q]`` float32 if ``return_lse``.
    """
    if _checks_enabled():
        _check_qkv(q, k, v, 3, "[total_q, heads_q, head_dim]", "[total_k, heads_kv, head_dim]")
        block_size, topk = _check_options(
            block_size,
            topk,
            softmax_scale,
            backend,
            causal=causal,
            return_lse=return_lse,
            deterministic=deterministic,
            check_cu_seqlens=check_cu_seqlens,
        )
        _check_kernel_config(kernel_config)
        read_values = check_cu_seqlens and not q.is_meta  # a meta tensor has no values to read
        max_seqlen_q, max_seqlen_k = _check_varlen(
            q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, read_values
        )
    block_size, topk = _within_sequence(block_size, topk, k.shape[0])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    backend = _resolve_backend(backend, q)
    total_q, heads_q, _ = q.shape
    if q.is_meta:
        out, lse = _shapes_only(q, (heads_q, total_q))
    elif q.numel() == 0 or k.numel() == 0:  # every query sees nothing: output 0, lse -inf
        out, lse = reference.sees_nothing(q, k, v, q.shape, (heads_q, total_q), torch.float32)
    elif backend == "triton":
        out, lse = _triton_ops().moba_attn_varlen_triton(
            q,
            k,
            v,
            cu_seqlens_q.contiguous(),  # the kernels index offsets by position, not by stride
            cu_seqlens_k.contiguous(),
            max_seqlen_q,
            max_seqlen_k,
            block_size,
            topk,
            causal,
            scale,
            deterministic,
            config=kernel_config,
        )
    else:
        out, lse = reference.moba_attn_varlen_reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, block_size, topk, causal, scale
        )
        lse = lse.float()
    return (out, lse) if return_lse else out


def moba_select(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    topk: int,
    *,
    causal: bool = True,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The router alone: which key blocks each query head attends to.

    Args:
        q: ``[B, T, Hq, D]``, or packed ``[total_q, Hq, D]`` with ``cu_seqlens_q``/``cu_seqlens_k``.
        k: ``[B, S, Hkv, D]``, or packed ``[total_k, Hkv, D]``.
        max_seqlen_q, max_seqlen_k: packed only; default to the longest sequence.
        Other arguments as in ``moba_attn``.

    Returns:
        int32 ``[B, T, Hq, topk]`` (packed: ``[total_q, Hq, topk]``): block indices local to each
        sequence in ascending order, -1 in unused slots (at the end).
    """
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if _checks_enabled():
        if packed:
            if cu_seqlens_q is None or cu_seqlens_k is None:
                raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together for packed sequences")
            _check_qkv(q, k, None, 3, "[total_q, heads_q, head_dim]", "[total_k, heads_kv, head_dim]")
        else:
            _check_qkv(
                q, k, None, 4, "[batch, seqlen_q, heads_q, head_dim]", "[batch, seqlen_k, heads_kv, head_dim]"
            )
            if k.shape[0] != q.shape[0]:
                raise ValueError(f"k must have q's batch size {q.shape[0]}, got shape {tuple(k.shape)}")
        block_size, topk = _check_options(block_size, topk, None, backend, causal=causal)
        _check_select_width(q, topk)
    block_size = _within_sequence(block_size, topk, k.shape[0] if packed else k.shape[1])[0]
    backend = _resolve_backend(backend, q)
    if q.is_meta:  # shapes only: a meta tensor has no values to route with
        return q.new_empty((*q.shape[:-1], topk), dtype=torch.int32)
    if packed:
        if max_seqlen_q is None:
            max_seqlen_q = (
                int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
            )
        if max_seqlen_k is None:
            max_seqlen_k = (
                int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.numel() > 1 else 0
            )
        if _checks_enabled():
            max_seqlen_q, max_seqlen_k = _check_varlen(
                q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
            )
    if backend == "triton":
        ops = _triton_ops()
        if packed:
            return ops.moba_select_varlen_triton(
                q,
                k,
                cu_seqlens_q.contiguous(),  # the kernels index offsets by position, not by stride
                cu_seqlens_k.contiguous(),
                max_seqlen_q,
                max_seqlen_k,
                block_size,
                topk,
                causal,
            )
        return ops.moba_select_triton(q, k, block_size, topk, causal)
    with torch.no_grad():
        return reference.moba_select_reference(q, k, block_size, topk, causal, cu_seqlens_q, cu_seqlens_k)
