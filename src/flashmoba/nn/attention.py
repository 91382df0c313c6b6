"""An attention layer with a choice of MoBA, dense causal or sliding-window attention.

``MoBAAttention`` holds the projections (GQA: fewer kv heads than query heads), an optional key
convolution and optional rotary position embeddings, and calls one of three attention functions:

- ``"moba"``: ``flashmoba.moba_attn`` / ``moba_attn_varlen`` (any backend: reference or Triton);
- ``"dense"``: causal softmax attention through PyTorch's ``scaled_dot_product_attention``;
- ``"sliding"``: causal attention to the last ``window_size`` keys (the query's own key included).

Inputs are either padded ``[batch, seqlen, hidden]`` (one sequence per row) or packed
``[total, hidden]`` with ``cu_seqlens`` (int32 ``[num_sequences + 1]``): then no attention, key
convolution or rotary position crosses a sequence boundary.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from flashmoba.api import moba_attn, moba_attn_varlen, moba_select
from flashmoba.nn.keyconv import KeyConv, positions_in_sequence

ATTENTION_KINDS = ("moba", "dense", "sliding")


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
# per sequence (dense) or chunked SDPA with a mask (sliding). Checked against the SDPA path (outputs and
# gradients, dense and sliding) by tests/gpu/test_model_gpu.py on an H100 with PyTorch 2.11 (RESULTS.md).
USE_FLASH_VARLEN = True


@functools.lru_cache(maxsize=1)
def _flash_varlen_function():
    """(varlen_attn, names of its keyword arguments), or None when this PyTorch has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def flash_varlen_supported(q: torch.Tensor, window_size: int | None = None) -> bool:
    found = _flash_varlen_function()
    if not (USE_FLASH_VARLEN and found and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
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


# ----------------------------------------------------------------------------------------------------
# Packed-batch bookkeeping
# ----------------------------------------------------------------------------------------------------


class PackedSequences:
    """How a packed token stream splits into sequences, computed once and shared by all layers.

    Attributes: ``cu_seqlens`` (int32 ``[n + 1]``), ``max_seqlen`` (int), ``bounds`` (cu_seqlens as a
    Python list), ``positions`` (``[total]`` position inside the sequence), ``sequence_ids`` (``[total]``).
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int | None = None):
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor [num_sequences + 1] with at least 2 entries")
        self.cu_seqlens = cu_seqlens.to(torch.int32)
        self.bounds = [int(b) for b in cu_seqlens.tolist()]
        lengths = [end - start for start, end in zip(self.bounds[:-1], self.bounds[1:])]
        if self.bounds[0] != 0 or min(lengths) < 0:
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {self.bounds}")
        longest = max(lengths)
        self.max_seqlen = longest if max_seqlen is None else int(max_seqlen)
        if self.max_seqlen < longest:
            raise ValueError(f"max_seqlen must be >= the longest sequence ({longest}), got {max_seqlen}")
        self.total = self.bounds[-1]
        self.positions = positions_in_sequence(self.cu_seqlens, self.total)
        token_index = torch.arange(self.total, device=cu_seqlens.device)
        self.sequence_ids = torch.searchsorted(self.cu_seqlens[1:].to(torch.int64), token_index, right=True)


# ----------------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------------


class MoBAAttention(nn.Module):
    """Multi-head attention with GQA, optional key convolution and RoPE, and MoBA / dense / sliding attention.

    Args:
        hidden_size: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA); ``num_heads`` must be a multiple. Default ``num_heads``.
        head_dim: default ``hidden_size // num_heads``.
        attention: ``"moba"``, ``"dense"`` or ``"sliding"``.
        block_size, topk: MoBA's block size and number of selected blocks (own block included).
        window_size: keys seen by each query in sliding-window attention (its own key included).
        kconv_size: key convolution width (0 = none).
        rope: rotate q and k by their position inside the sequence (RoPE).
        rope_base: RoPE's base.
        backend: flashmoba backend for MoBA: ``"auto"``, ``"reference"`` or ``"triton"``.

    ``forward(x, cu_seqlens=None, max_seqlen=None)`` with x ``[batch, seqlen, hidden]`` or packed
    ``[total, hidden]`` + ``cu_seqlens`` (or a ``PackedSequences`` passed as ``packed``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        attention: str = "moba",
        block_size: int = 128,
        topk: int = 8,
        window_size: int = 256,
        kconv_size: int = 0,
        rope: bool = False,
        rope_base: float = 10000.0,
        backend: str = "auto",
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        for name, value in [
            ("hidden_size", hidden_size),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("block_size", block_size),
            ("topk", topk),
            ("window_size", window_size),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if isinstance(kconv_size, bool) or not isinstance(kconv_size, int) or kconv_size < 0:
            raise ValueError(f"kconv_size must be an int >= 0, got {kconv_size!r}")
        if rope and head_dim % 2 != 0:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = (
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.attention, self.block_size, self.topk, self.window_size = (
            attention,
            block_size,
            topk,
            window_size,
        )
        self.rope, self.rope_base, self.backend = rope, float(rope_base), backend
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.key_conv = KeyConv(num_kv_heads * head_dim, kconv_size) if kconv_size > 0 else None

    def extra_repr(self) -> str:
        extra = f"attention={self.attention!r}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
        if self.attention == "moba":
            extra += f", block_size={self.block_size}, topk={self.topk}, backend={self.backend!r}"
        if self.attention == "sliding":
            extra += f", window_size={self.window_size}"
        return extra + f", rope={self.rope}"

    @staticmethod
    def _packing(x, cu_seqlens, max_seqlen, packed) -> PackedSequences | None:
        if packed is None and cu_seqlens is not None:
            packed = PackedSequences(cu_seqlens, max_seqlen)
        if packed is not None:
            # The attention kernels trust the checked packing (no host read per layer): it must fit x.
            if x.ndim != 2 or x.shape[0] != packed.total:
                raise ValueError(
                    f"with cu_seqlens, x must be packed [total = {packed.total}, hidden], got shape "
                    f"{tuple(x.shape)}"
                )
            return packed
        if x.ndim != 3:
            raise ValueError(
                f"x must be [batch, seqlen, hidden], or [total, hidden] with cu_seqlens, got {tuple(x.shape)}"
            )
        return None

    def project(self, x: torch.Tensor, packed: PackedSequences | None = None):
        """q ``[..., Hq, D]``, k and v ``[..., Hkv, D]`` as attention sees them (after key conv and RoPE)."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.key_conv is not None:
            k = self.key_conv(k, positions=packed.positions if packed is not None else None)
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.rope:
            if packed is not None:
                positions = packed.positions
            else:
                positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            q, k = (
                rotary_embedding(q, positions, self.rope_base),
                rotary_embedding(k, positions, self.rope_base),
            )
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        *,
        packed: PackedSequences | None = None,
    ) -> torch.Tensor:
        packed = self._packing(x, cu_seqlens, max_seqlen, packed)
        q, k, v = self.project(x, packed)
        scale = self.head_dim**-0.5
        if self.attention == "moba":
            if packed is None:
                out = moba_attn(
                    q, k, v, self.block_size, self.topk, softmax_scale=scale, backend=self.backend
                )
            else:
                out = moba_attn_varlen(
                    q,
                    k,
                    v,
                    packed.cu_seqlens,
                    packed.cu_seqlens,
                    packed.max_seqlen,
                    packed.max_seqlen,
                    self.block_size,
                    self.topk,
                    softmax_scale=scale,
                    backend=self.backend,
                    check_cu_seqlens=False,  # PackedSequences checked them once for every layer
                )
        elif self.attention == "dense":
            if packed is not None and flash_varlen_supported(q):
                out = flash_varlen_attention(q, k, v, packed, scale)
            else:
                out = dense_causal_attention(q, k, v, scale, packed.bounds if packed is not None else None)
        else:
            if packed is not None and flash_varlen_supported(q, self.window_size):
                out = flash_varlen_attention(q, k, v, packed, scale, self.window_size)
            elif packed is None:
                out = sliding_window_attention(q, k, v, self.window_size, scale)
            else:
                out = sliding_window_attention(
                    q[None], k[None], v[None], self.window_size, scale, packed.sequence_ids[None]
                )[0]
        return self.o_proj(out.flatten(-2))

    @torch.no_grad()
    def select_blocks(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        *,
        packed: PackedSequences | None = None,
    ) -> torch.Tensor:
        """The MoBA router's choice for this layer input: int32 ``[batch, seqlen, Hq, topk]`` block ids
        (packed: ``[total, Hq, topk]``), ascending, -1 in unused slots. See ``flashmoba.moba_select``."""
        packed = self._packing(x, cu_seqlens, max_seqlen, packed)
        q, k, _ = self.project(x, packed)
        if packed is None:
            return moba_select(q, k, self.block_size, self.topk, backend=self.backend)
        return moba_select(
            q,
            k,
            self.block_size,
            self.topk,
            cu_seqlens_q=packed.cu_seqlens,
            cu_seqlens_k=packed.cu_seqlens,
            max_seqlen_q=packed.max_seqlen,
            max_seqlen_k=packed.max_seqlen,
            backend=self.backend,
        )
