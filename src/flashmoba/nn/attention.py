"""An attention layer with a choice of MoBA, dense causal or sliding-window attention.

``MoBAAttention`` holds the projections (GQA: fewer kv heads than query heads), an optional key
convolution and optional rotary position embeddings, and calls one of three attention functions:

- ``"moba"``: ``flashmoba.moba_attn`` / ``moba_attn_varlen`` (any backend: reference or Triton);
- ``"dense"``: causal softmax attention through PyTorch's ``scaled_dot_product_attention``;
- ``"sliding"``: causal attention to the last ``window_size`` keys (the query's own key included).

Inputs are either padded ``[batch, seqlen, hidden]`` (one sequence per row) or packed
``[total, hidden]`` with ``cu_seqlens`` (int32 ``[num_sequences + 1]``): then no attention, key
convolution or rotary position crosses a sequence boundary. The dense and sliding-window functions
themselves are ``flashmoba.nn.functional``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from flashmoba._checks import check_bool, check_choice, check_cu_seqlens_values, check_int, check_positive_int
from flashmoba.api import _check_kernel_config, moba_attn, moba_attn_varlen, moba_select
from flashmoba.nn.functional import _flash_varlen_function as _flash_varlen_function
from flashmoba.nn.functional import (
    dense_causal_attention,
    flash_varlen_attention,
    flash_varlen_supported,
    rotary_embedding,
    sliding_window_attention,
)
from flashmoba.nn.keyconv import KeyConv, positions_in_sequence

if TYPE_CHECKING:  # for annotations only: importing flashmoba.ops imports Triton
    from flashmoba.ops.config import KernelConfig

__all__ = [
    "ATTENTION_KINDS",
    "MoBAAttention",
    "PackedSequences",
    # functional names under their old path (they live in flashmoba.nn.functional)
    "dense_causal_attention",
    "flash_varlen_attention",
    "flash_varlen_supported",
    "rotary_embedding",
    "sliding_window_attention",
]

ATTENTION_KINDS = ("moba", "dense", "sliding")

# ----------------------------------------------------------------------------------------------------
# Packed-batch bookkeeping
# ----------------------------------------------------------------------------------------------------


class PackedSequences:
    """How a packed token stream splits into sequences, computed once and shared by all layers.

    Attributes: ``cu_seqlens`` (int32 ``[n + 1]`` on ``device``), ``max_seqlen`` (int), ``bounds``
    (cu_seqlens as a Python list), ``positions`` (``[total]`` position inside the sequence),
    ``sequence_ids`` (``[total]``).

    The offsets are checked on the host, so they are read there once: give ``cu_seqlens`` on the CPU
    (with ``device`` the tokens' device) and nothing waits for the GPU; offsets already on a GPU cost
    one device-to-host copy, which waits for the work queued before it.
    """

    def __init__(
        self, cu_seqlens: torch.Tensor, max_seqlen: int | None = None, device: torch.device | None = None
    ):
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D tensor [num_sequences + 1] with at least 2 entries")
        device = cu_seqlens.device if device is None else torch.device(device)
        self.bounds = [int(b) for b in cu_seqlens.tolist()]
        # Any integer dtype is taken (and stored as int32); the packed length is the last offset.
        lengths = check_cu_seqlens_values("cu_seqlens", self.bounds, self.bounds[-1])
        self.cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
        longest = max(lengths)
        self.max_seqlen = longest if max_seqlen is None else int(max_seqlen)
        if self.max_seqlen < longest:
            raise ValueError(f"max_seqlen must be >= the longest sequence ({longest}), got {max_seqlen}")
        self.total = self.bounds[-1]
        self.positions = positions_in_sequence(self.cu_seqlens, self.total)
        token_index = torch.arange(self.total, device=device)
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
        kernel_config: the Triton kernels' launch settings for MoBA (a ``flashmoba.ops.KernelConfig``;
            None: the measured defaults). A launch setting, not part of the layer's definition: it is
            no parameter or buffer, so checkpoints do not hold it; set the attribute to change it.

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
        use_flash_varlen: bool = True,
        kernel_config: KernelConfig | None = None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        hidden_size = check_positive_int("hidden_size", hidden_size)
        num_heads = check_positive_int("num_heads", num_heads)
        num_kv_heads = check_positive_int("num_kv_heads", num_kv_heads)
        head_dim = check_positive_int("head_dim", head_dim)
        block_size = check_positive_int("block_size", block_size)
        topk = check_positive_int("topk", topk)
        window_size = check_positive_int("window_size", window_size)
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        check_choice("attention", attention, ATTENTION_KINDS)
        kconv_size = check_int("kconv_size", kconv_size, minimum=0)
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
        _check_kernel_config(kernel_config)
        self.kernel_config = kernel_config
        # Packed dense and sliding-window attention on PyTorch's flash varlen kernel where it runs
        # (flash_varlen_supported); False sends them through SDPA.
        self.use_flash_varlen = check_bool("use_flash_varlen", use_flash_varlen)
        _flash_varlen_function()  # looked up now, not while torch.compile traces forward
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.key_conv = KeyConv(num_kv_heads * head_dim, kconv_size) if kconv_size > 0 else None

    def extra_repr(self) -> str:
        extra = (
            f"attention={self.attention!r}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}"
        )
        if self.attention == "moba":
            extra += f", block_size={self.block_size}, topk={self.topk}, backend={self.backend!r}"
            if self.kernel_config is not None:
                extra += f", kernel_config={self.kernel_config!r}"
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

    def project(
        self, x: torch.Tensor, packed: PackedSequences | None = None, *, cache=None, position_offset: int = 0
    ):
        """q ``[..., Hq, D]``, k and v ``[..., Hkv, D]`` as attention sees them (after key conv and RoPE).

        With a layer ``cache`` (``forward_with_cache``), x ``[batch, T, hidden]`` follows the tokens
        already cached: positions are ``cache.positions(batch, T, device)``, and
        the key convolution continues from ``cache.keyconv_state`` (which this replaces). Padded x
        without a cache starts at position ``position_offset`` (a context-parallel slice's start)."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.key_conv is not None and cache is not None:
            k, cache.keyconv_state = self.key_conv.step(k, cache.keyconv_state)
        elif self.key_conv is not None:
            k = self.key_conv(k, positions=packed.positions if packed is not None else None)
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.rope:
            if packed is not None:
                positions = packed.positions
            elif cache is not None:  # the cache knows where the new tokens start (on the host or device)
                positions = cache.positions(x.shape[0], x.shape[1], x.device)
            else:
                positions = torch.arange(position_offset, position_offset + x.shape[1], device=x.device)
                positions = positions.expand(x.shape[0], -1)
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
        context_parallel=None,
    ) -> torch.Tensor:
        if context_parallel is not None:
            return self._forward_context_parallel(x, context_parallel)
        packed = self._packing(x, cu_seqlens, max_seqlen, packed)
        q, k, v = self.project(x, packed)
        scale = self.head_dim**-0.5
        if self.attention == "moba":
            if packed is None:
                out = moba_attn(
                    q,
                    k,
                    v,
                    self.block_size,
                    self.topk,
                    softmax_scale=scale,
                    backend=self.backend,
                    kernel_config=self.kernel_config,
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
                    kernel_config=self.kernel_config,
                )
        elif self.attention == "dense":
            if packed is not None and self.use_flash_varlen and flash_varlen_supported(q):
                out = flash_varlen_attention(q, k, v, packed, scale)
            else:
                out = dense_causal_attention(q, k, v, scale, packed.bounds if packed is not None else None)
        else:
            if packed is not None and self.use_flash_varlen and flash_varlen_supported(q, self.window_size):
                out = flash_varlen_attention(q, k, v, packed, scale, self.window_size)
            elif packed is None:
                out = sliding_window_attention(q, k, v, self.window_size, scale)
            else:
                out = sliding_window_attention(
                    q[None], k[None], v[None], self.window_size, scale, packed.sequence_ids[None]
                )[0]
        return self.o_proj(out.flatten(-2))

    def _forward_context_parallel(self, x: torch.Tensor, context_parallel) -> torch.Tensor:
        """x ``[batch, L, hidden]``: this rank's slice of rows cut over a context-parallel group
        (``flashmoba.parallel.ContextParallel``): RoPE at the slice's absolute positions, MoBA across the
        group, sliding windows over the previous rank's last ``window_size - 1`` keys (the halo)."""
        if x.ndim != 3:
            raise ValueError(
                f"x must be [batch, seqlen_local, hidden] with context_parallel, got {tuple(x.shape)}"
            )
        if self.key_conv is not None:
            raise NotImplementedError("the key convolution has no context-parallel path (it needs a halo)")
        offset = context_parallel.position_offset(x.shape[1])
        q, k, v = self.project(x, position_offset=offset)
        scale = self.head_dim**-0.5
        if self.attention == "moba":
            out = context_parallel.moba(q, k, v, self.block_size, self.topk, scale, self.backend)
        elif self.attention == "sliding":
            k_halo, v_halo = context_parallel.halo(k, v, self.window_size - 1)  # none on rank 0
            width = k_halo.shape[1]
            # The halo keys get placeholder queries, whose rows are dropped: the local queries sit last.
            q_all = torch.cat((q.new_zeros(q.shape[0], width, *q.shape[2:]), q), dim=1)
            k_all, v_all = torch.cat((k_halo, k), dim=1), torch.cat((v_halo, v), dim=1)
            out = sliding_window_attention(q_all, k_all, v_all, self.window_size, scale)[:, width:]
        else:
            raise NotImplementedError("dense global attention has no context-parallel path")
        return self.o_proj(out.flatten(-2))

    def forward_with_cache(self, x: torch.Tensor, cache) -> torch.Tensor:
        """Decode or prefill: x ``[batch, T, hidden]`` are the T tokens that follow the tokens already in
        ``cache`` (T new tokens in every row; the rows' cached lengths may differ, see ``positions``).

        ``cache`` is a layer cache (see ``flashmoba.models.generation``): it has
        ``positions(batch, T, device)`` (the new tokens' absolute positions, for RoPE), ``keyconv_state``
        (the key convolution's last raw keys, or None; this method replaces it) and
        ``attend(q, k, v, scale)``, which appends k, v and attends the new queries q causally. The
        projections, key convolution and rotation are ``project``'s.
        """
        if x.ndim != 3:
            raise ValueError(f"x must be [batch, seqlen, hidden] with a cache, got {tuple(x.shape)}")
        q, k, v = self.project(x, cache=cache)
        out = cache.attend(q, k, v, self.head_dim**-0.5)
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
