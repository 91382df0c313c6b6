"""Attention functions without parameters: rotary position embedding, and causal dense, flash-varlen and
sliding-window attention on top of PyTorch's SDPA (flash-attn layout: ``[batch, seqlen, heads, head_dim]``,
or packed ``[total, heads, head_dim]``; k and v may have fewer heads than q, GQA).

``flashmoba.nn.attention.MoBAAttention`` chooses among them (and MoBA) per layer.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from flashmoba.nn.attention import PackedSequences

__all__ = [
    "dense_causal_attention",
    "flash_varlen_attention",
    "flash_varlen_supported",
    "rotary_embedding",
    "sliding_window_attention",
]

# ----------------------------------------------------------------------------------------------------
# Rotary position embedding (rotate-half layout of GPT-NeoX / Llama)
# ----------------------------------------------------------------------------------------------------


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate ``x [..., T, H, D]`` by the angles of ``positions [..., T]`` (D even); float32 math."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=x.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., T, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).unsqueeze(-2)  # [..., T, 1, D]
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).unsqueeze(-2)
    x_float = x.float()
    first, second = x_float.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x_float * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Dense and sliding-window attention on top of SDPA
# ----------------------------------------------------------------------------------------------------


def _repeat_kv(x: torch.Tensor, groups: int, head_dim_axis: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=head_dim_axis)


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sequence_bounds: list[int] | None = None
) -> torch.Tensor:
    """Causal softmax attention. q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]``; or packed q ``[total, Hq, D]``
    with ``sequence_bounds`` (the values of cu_seqlens as a Python list): one SDPA call per sequence."""
    groups = q.shape[-2] // k.shape[-2]
    if sequence_bounds is None:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            _repeat_kv(k, groups, 2).transpose(1, 2),
            _repeat_kv(v, groups, 2).transpose(1, 2),
            is_causal=True,
            scale=scale,
        )
        return out.transpose(1, 2)
    outputs = []
    for start, end in zip(sequence_bounds[:-1], sequence_bounds[1:]):
        if end > start:
            outputs.append(
                dense_causal_attention(q[None, start:end], k[None, start:end], v[None, start:end], scale)[0]
            )
    return torch.cat(outputs, dim=0) if outputs else q.new_zeros(q.shape)


# On CUDA, packed dense and sliding-window attention can use PyTorch's own flash varlen kernel when this
# PyTorch has it (torch.nn.attention.varlen): one call for the whole packed batch instead of one SDPA call
# per sequence (dense) or chunked SDPA with a mask (sliding). tests/gpu/test_model_gpu.py checks it
# against the SDPA path (outputs and gradients, dense and sliding).


def _find_flash_varlen():
    """(varlen_attn, names of its keyword arguments), or None when this PyTorch has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_NOT_LOOKED_UP = object()
_flash_varlen = _NOT_LOOKED_UP


def _flash_varlen_function():
    """(varlen_attn, its keyword names) or None, looked up on the first call (the import loads Triton,
    which ``import flashmoba`` must not). ``MoBAAttention`` calls it when built, so that under
    ``torch.compile`` the lookup is already a constant."""
    global _flash_varlen
    if _flash_varlen is _NOT_LOOKED_UP:
        _flash_varlen = _find_flash_varlen()
    return _flash_varlen


def flash_varlen_supported(q: torch.Tensor, window_size: int | None = None) -> bool:
    """Whether ``flash_varlen_attention`` can run on q: this PyTorch has varlen attention (with a window
    when one is asked), q is a CUDA tensor in float16 or bfloat16."""
    found = _flash_varlen_function()
    if not (found and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    return window_size is None or "window_size" in found[1]


def flash_varlen_attention(q, k, v, packed: PackedSequences, scale: float, window_size: int | None = None):
    """Causal (optionally sliding-window) attention of packed ``[total, H, D]`` tensors in one flash call."""
    varlen_attn, parameters = _flash_varlen_function()
    groups = q.shape[-2] // k.shape[-2]
    k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
    if "window_size" in parameters:  # (left, right): a query sees window_size - 1 earlier keys and itself
        options = {"window_size": (-1 if window_size is None else window_size - 1, 0)}
    else:
        options = {"is_causal": True}
    return varlen_attn(
        q,
        k,
        v,
        packed.cu_seqlens,
        packed.cu_seqlens,
        packed.max_seqlen,
        packed.max_seqlen,
        scale=scale,
        **options,
    )


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    scale: float,
    sequence_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query i sees keys j with ``i - window_size < j <= i`` (and of its own sequence).

    q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]``; ``sequence_ids [B, T]`` marks packed sequences (pass a
    packed batch as B = 1). Cost O(T * window): queries are cut into chunks of ``window_size``, each
    chunk attends to itself and the previous chunk through SDPA with a small boolean mask.
    """
    batch, seqlen, heads_q, head_dim = q.shape
    groups = heads_q // k.shape[2]
    chunk = window_size
    num_chunks = -(-seqlen // chunk)
    pad = num_chunks * chunk - seqlen
    if sequence_ids is None:
        sequence_ids = torch.zeros(batch, seqlen, dtype=torch.int64, device=q.device)
    # Padding tokens get sequence id -1, so real queries never see them.
    sequence_ids = F.pad(sequence_ids.to(torch.int64), (0, pad), value=-1).view(batch, num_chunks, chunk)
    q, k, v = (
        F.pad(t, (0, 0, 0, 0, 0, pad)).view(batch, num_chunks, chunk, t.shape[2], head_dim) for t in (q, k, v)
    )

    def with_previous_chunk(t: torch.Tensor, fill) -> torch.Tensor:
        previous = torch.cat([torch.full_like(t[:, :1], fill), t[:, :-1]], dim=1)
        return torch.cat([previous, t], dim=2)  # [batch, num_chunks, 2 * chunk, ...]

    keys, values = with_previous_chunk(k, 0.0), with_previous_chunk(v, 0.0)
    key_sequence_ids = with_previous_chunk(sequence_ids, -1)
    # Query at offset i of a chunk and key at offset j of [previous chunk, chunk] are i + chunk - j apart.
    distance = (
        torch.arange(chunk, device=q.device)[:, None] + chunk - torch.arange(2 * chunk, device=q.device)
    )
    in_window = (distance >= 0) & (distance < window_size)
    mask = in_window & (
        sequence_ids.unsqueeze(-1) == key_sequence_ids.unsqueeze(-2)
    )  # [batch, chunks, C, 2C]

    def heads_first(t: torch.Tensor) -> torch.Tensor:  # [batch, chunks, L, H, D] -> [batch * chunks, H, L, D]
        return t.reshape(batch * num_chunks, t.shape[2], t.shape[3], head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        heads_first(q),
        heads_first(_repeat_kv(keys, groups, 3)),
        heads_first(_repeat_kv(values, groups, 3)),
        attn_mask=mask.reshape(batch * num_chunks, 1, chunk, 2 * chunk),
        scale=scale,
    )
    out = out.transpose(1, 2).reshape(batch, num_chunks * chunk, heads_q, head_dim)
    return out[:, :seqlen]
