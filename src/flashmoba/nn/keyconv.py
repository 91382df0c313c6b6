"""Key convolution: a short depthwise causal convolution on the keys, with SiLU and a residual.

    k'_t = k_t + SiLU( sum_{l=0}^{W-1} w_l * k_{t-l} )        (paper section 2 / appendix C)

It is applied to the projected keys before MoBA routes and attends, so the block centroids and the
attention both see the convolved keys. Keys before the start of a sequence are zero (causal left
padding), and in a packed batch the convolution never reads a key of another sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flashmoba._checks import check_choice, check_cu_seqlens_values, check_positive_int


def positions_in_sequence(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of each packed token inside its own sequence, ``[total]`` int64 (no host sync)."""
    token_index = torch.arange(total, device=cu_seqlens.device)
    boundaries = cu_seqlens.to(torch.int64)
    sequence_index = torch.searchsorted(boundaries[1:], token_index, right=True)
    return token_index - boundaries[sequence_index]


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """``y_t = sum_l weight[:, W-1-l] * x_{t-l}`` along dimension -2, zero before each sequence start.

    Args:
        x: ``[..., T, C]`` (one sequence per leading index) or packed ``[total, C]``.
        weight: ``[C, W]``; the last column multiplies the current token (nn.Conv1d's layout).
        positions: packed only: ``[total]`` position of each token inside its sequence; a lag l
            contributes only where ``positions >= l``, so sequences never read each other.

    One shifted multiply-add per lag (W of them), so the cost is W elementwise passes, no token loop.
    """
    kernel_size = weight.shape[1]
    seqlen = x.shape[-2]
    out = x * weight[:, kernel_size - 1]
    for lag in range(1, min(kernel_size, seqlen + 1)):
        shifted = F.pad(x, (0, 0, lag, 0))[..., :seqlen, :]  # shifted[t] = x[t - lag], zero for t < lag
        if positions is not None:
            shifted = shifted * (positions >= lag).unsqueeze(-1).to(shifted.dtype)
        out = out + shifted * weight[:, kernel_size - 1 - lag]
    return out


class KeyConv(nn.Module):
    """``k' = k + SiLU(depthwise_causal_conv(k))`` over ``channels`` key channels (all kv heads x head_dim).

    Args:
        channels: number of key channels (``num_kv_heads * head_dim``).
        kernel_size: the window W (the paper uses 3 and 5); any odd or even size >= 1 works.

    Input ``[batch, seqlen, channels]``, or packed ``[total, channels]`` with ``cu_seqlens`` (int32
    ``[num_sequences + 1]``). The output has the input's shape and dtype.

    Parameters: ``weight [channels, kernel_size]``, no bias (the paper's formula has none). With the
    weight at zero the module is exactly the identity (SiLU(0) = 0).

    Initialisation (the paper does not state one): that of a depthwise ``nn.Conv1d`` (uniform in
    ``+-1/sqrt(kernel_size)``), as in fla's ShortConvolution used by DeltaNet, which the paper follows.
    ``KeyConv(..., init="zeros")`` starts at the identity instead; its gradient is not zero there
    (SiLU'(0) = 1/2), so it still learns.
    """

    def __init__(self, channels: int, kernel_size: int, *, init: str = "conv"):
        super().__init__()
        channels = check_positive_int("channels", channels)
        kernel_size = check_positive_int("kernel_size", kernel_size)
        check_choice("init", init, ("conv", "zeros"))
        self.channels = channels
        self.kernel_size = kernel_size
        self.init = init
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "zeros":
            nn.init.zeros_(self.weight)
        else:
            bound = 1.0 / math.sqrt(self.kernel_size)  # nn.Conv1d's default for fan_in = kernel_size
            nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}, init={self.init!r}"

    def forward(
        self,
        k: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        *,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``k`` ``[batch, seqlen, channels]``, or packed ``[total, channels]`` (or ``[1, total, channels]``)
        with ``cu_seqlens``. ``max_seqlen`` is accepted for symmetry with the attention functions (unused).
        ``positions`` (``[total]``, each token's position in its sequence) may replace ``cu_seqlens`` when
        the caller has it already (the attention layer does): no check and no host sync then."""
        if not isinstance(k, torch.Tensor):
            raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
        if k.shape[-1] != self.channels:
            raise ValueError(
                f"k must have {self.channels} channels in its last dimension, got shape {tuple(k.shape)}"
            )
        if cu_seqlens is not None and k.ndim == 3 and k.shape[0] == 1:  # flash-attn style batch of one
            return self.forward(k[0], cu_seqlens).unsqueeze(0)
        if cu_seqlens is not None:
            if k.ndim != 2:
                raise ValueError(
                    f"packed k must be [total, channels] with cu_seqlens, got shape {tuple(k.shape)}"
                )
            if (
                not isinstance(cu_seqlens, torch.Tensor)
                or cu_seqlens.ndim != 1
                or cu_seqlens.is_floating_point()
            ):
                raise TypeError("cu_seqlens must be a 1-D integer torch.Tensor [num_sequences + 1]")
            check_cu_seqlens_values("cu_seqlens", cu_seqlens.tolist(), k.shape[0])
            positions = positions_in_sequence(cu_seqlens, k.shape[0])
        elif positions is not None:
            if k.ndim != 2 or positions.shape != k.shape[:1]:
                raise ValueError(
                    f"positions must be [total] for packed k [total, channels], got {tuple(positions.shape)}"
                )
        elif k.ndim != 3:
            raise ValueError(
                "k must be [batch, seqlen, channels], or [total, channels] with cu_seqlens, "
                f"got shape {tuple(k.shape)}"
            )
        conv = causal_depthwise_conv(k, self.weight, positions)
        return (k + F.silu(conv)).to(k.dtype)

    def step(self, k: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode: the convolution of ``k`` ``[batch, T, channels]``, the T keys that follow the raw keys in
        ``state`` ``[batch, kernel_size - 1, channels]`` (the last raw keys of the sequence so far, zeros
        before its start; None: an empty sequence). Returns ``(k', new_state)``: row t of k' equals what
        ``forward`` gives for that key over the whole sequence (the same arithmetic, so the same bits)."""
        history = self.kernel_size - 1
        if k.ndim != 3 or k.shape[-1] != self.channels:
            raise ValueError(f"k must be [batch, T, {self.channels}], got shape {tuple(k.shape)}")
        if state is None:
            state = k.new_zeros(k.shape[0], history, self.channels)
        elif state.shape != (k.shape[0], history, self.channels):
            raise ValueError(
                f"state must be [batch, kernel_size - 1, channels] = {(k.shape[0], history, self.channels)}, "
                f"got {tuple(state.shape)}"
            )
        extended = torch.cat([state.to(k.dtype), k], dim=1)
        conv = causal_depthwise_conv(extended, self.weight)[:, history:]
        return (k + F.silu(conv)).to(k.dtype), extended[:, extended.shape[1] - history :]
