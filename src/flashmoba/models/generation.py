"""Cached generation for ``HybridLM``: one cache per layer, prefill of the prompt, then a token per step.

Per layer (see ``HybridCache``):

- sliding-window layers: ``SlidingWindowCache``, a rolling window of the last ``window_size - 1`` keys
  and values (all a later query can see besides its own key), rotated by RoPE at their absolute positions;
- MoBA global layers: ``MoBALayerCache``, a ``flashmoba.MoBAKVCache`` (keys, values, centroid sums) that
  ``flashmoba.moba_attn_with_kvcache`` routes and attends with;
- dense global layers: ``DenseCache``, the plain keys and values;
- every layer with a key convolution also keeps its decode state, the last ``kernel_size - 1`` raw keys
  (``KeyConv.step``), so a kconv model decodes exactly as its forward computes.

Prefill goes through the cached path in one chunk: the prompt's T tokens are one ``forward_with_cache``
call (MoBA: ``moba_attn_with_kvcache`` with ``seqlen_q = T``; sliding and dense: the model's own
attention functions on an empty cache), then each new token is one call of one token. The numbers are
those of the model's ``forward`` over the whole sequence (tests/models/test_generation.py checks logits
and greedy tokens against full recomputation).

The prompt of a MoBA layer goes through ``MoBAKVCache.prefill`` (``moba_attn``, the training kernels),
each new token through ``moba_attn_with_kvcache`` (the Triton decode kernels on CUDA).

Prompts of unequal lengths (``generate(..., prompt_lengths=...)``, right-padded ``input_ids``): the
rows of each distinct length are prefilled together (the path above, one call per length), and their
caches are merged into one *ragged* cache whose layers keep per-row lengths (``HybridCache.lengths``,
int64 ``[batch]`` on the device): RoPE positions, the sliding window and dense masks and the MoBA blocks
(``MoBAKVCache.cache_seqlens``) are then each row's own, so every row decodes as it would alone.

Limits: the model's own dtype, no autocast.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flashmoba._checks import check_int, check_real
from flashmoba.kvcache import MoBAKVCache
from flashmoba.nn.functional import dense_causal_attention, sliding_window_attention

__all__ = [
    "DECODE_MODES",
    "DEFAULT_COMPILE_OPTIONS",
    "GRAPH_MODES",
    "WARM_DECODE_STEPS",
    "DenseCache",
    "HybridCache",
    "MoBALayerCache",
    "SlidingWindowCache",
    "StaticDecoder",
    "generate",
    "sample_next",
]

# How ``generate`` runs its one-token steps: "eager" (the growing caches), "static" (``StaticDecoder``:
# fixed buffers, positions on the device), "cuda_graph" (static, each step one CUDA-graph replay),
# "compiled" (static, the step's forward ``torch.compile``d: Inductor fuses the small elementwise
# kernels), "compiled_graph" (compiled, then each step one CUDA-graph replay of the compiled kernels), or
# "auto" ("cuda_graph" on CUDA, "eager" elsewhere).
DECODE_MODES = ("auto", "eager", "static", "cuda_graph", "compiled", "compiled_graph")
# The modes that need CUDA (a CUDA graph).
GRAPH_MODES = ("cuda_graph", "compiled_graph")
# torch.compile's options for a compiled static step. "default" (not "reduce-overhead" or "max-autotune",
# which add Inductor's own CUDA graphs: StaticDecoder captures its own, around the compiled kernels).
# dynamic=False: a decode step has one set of shapes.
DEFAULT_COMPILE_OPTIONS = dict(mode="default", dynamic=False)
# Decode steps before ``generate``'s steady-state timing starts: "cuda_graph"'s eager first step and its
# capture, "compiled"'s compilation (the other modes time from the same step, so that the numbers
# compare).
WARM_DECODE_STEPS = 2


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _attention_under_mask(q, k, v, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """q ``[B, T, Hq, D]`` against k/v ``[B, S, Hkv, D]`` through SDPA where ``mask`` (bool, broadcast to
    ``[B, Hq, T, S]``; None: every key) is true."""
    groups = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        _repeat_kv(k, groups).transpose(1, 2),
        _repeat_kv(v, groups).transpose(1, 2),
        attn_mask=mask,
        scale=scale,
    )
    return out.transpose(1, 2)


def _ragged_attention(q, k, v, scale: float, query_pos, key_pos, window: int | None = None):
    """q ``[B, T, Hq, D]`` at per-row positions ``query_pos [B, T]``, k/v ``[B, S, Hkv, D]`` at ``key_pos
    [B, S]`` (negative: an empty slot, never seen): causal (and within ``window``) attention per row."""
    distance = query_pos[:, :, None] - key_pos[:, None, :]
    mask = (distance >= 0) & (key_pos[:, None, :] >= 0)
    if window is not None:
        mask &= distance < window
    return _attention_under_mask(q, k, v, scale, mask[:, None])


def _masked_attention(q, k, v, scale: float, start: int, key_start: int, window: int | None = None):
    """q ``[B, T, Hq, D]`` at positions ``start ..``, k/v ``[B, S, Hkv, D]`` at positions ``key_start ..``:
    causal (and within ``window`` keys, the query's own included) softmax attention through SDPA."""
    if q.shape[1] == 1 and window is None and start >= key_start + k.shape[1] - 1:
        mask = None  # one query after every key sees them all: no mask, so SDPA may take its flash kernel
    else:
        query_pos = torch.arange(start, start + q.shape[1], device=q.device)
        key_pos = torch.arange(key_start, key_start + k.shape[1], device=q.device)
        distance = query_pos[:, None] - key_pos[None, :]
        mask = distance >= 0
        if window is not None:
            mask &= distance < window
    return _attention_under_mask(q, k, v, scale, mask)


class _LayerCache:
    """What ``MoBAAttention.forward_with_cache`` needs: ``length``, ``keyconv_state`` and ``attend``.

    ``lengths`` is None while every row holds ``length`` tokens; a ragged cache (rows of unequal lengths,
    see ``HybridCache.lengths``) holds int64 ``[batch]`` per-row lengths on the device there, and
    ``length`` is then their maximum (the host's bound for the capacity)."""

    def __init__(self):
        self.length = 0
        self.lengths: torch.Tensor | None = None
        self._keyconv_state: torch.Tensor | None = None

    @property
    def keyconv_state(self) -> torch.Tensor | None:
        return self._keyconv_state

    @keyconv_state.setter
    def keyconv_state(self, state: torch.Tensor | None) -> None:
        # A copy: ``KeyConv.step`` returns the state as a slice of the chunk's raw keys, which would keep
        # [batch, T, channels] alive (after a prefill, the whole prompt's) for kernel_size - 1 of them.
        self._keyconv_state = None if state is None else state.clone()

    def positions(self, batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
        """int64 ``[batch, seqlen]``: the absolute positions of the next ``seqlen`` tokens."""
        if self.lengths is not None:
            return self.lengths[:, None] + torch.arange(seqlen, device=device)
        return torch.arange(self.length, self.length + seqlen, device=device).expand(batch, -1)

    def _advance(self, seqlen: int) -> None:
        self.length += seqlen
        if self.lengths is not None:
            self.lengths = self.lengths + seqlen  # a new tensor: never one another layer holds

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        self.length = 0
        self.lengths = None
        self.keyconv_state = None

    def reorder(self, index: torch.Tensor) -> None:
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, index.to(self.lengths.device))
            self.length = int(self.lengths.max()) if self.lengths.numel() else 0
        if self.keyconv_state is not None:
            self.keyconv_state = self.keyconv_state.index_select(0, index)


class _KeyValueCache(_LayerCache):
    """A layer cache that keeps keys and values ``[batch, cached, heads_kv, head_dim]`` (None: empty)."""

    def __init__(self):
        super().__init__()
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.k = self.v = None

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class SlidingWindowCache(_KeyValueCache):
    """The last ``window_size - 1`` keys and values of a sliding-window layer (keys already rotated)."""

    def __init__(self, window_size: int):
        super().__init__()
        self.window_size = window_size

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        if self.lengths is not None:  # ragged: self.k right-aligned, slot j at lengths - keep + j
            keys, values = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
            slots = torch.arange(keys.shape[1], device=k.device)
            key_pos = self.lengths[:, None] - self.k.shape[1] + slots
            query_pos = self.lengths[:, None] + torch.arange(q.shape[1], device=q.device)
            out = _ragged_attention(q, keys, values, scale, query_pos, key_pos, self.window_size)
        elif self.k is None:  # empty: the model's own function over the chunk
            out = sliding_window_attention(q, k, v, self.window_size, scale)
            keys, values = k, v
        else:
            keys, values = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
            out = _masked_attention(
                q, keys, values, scale, self.length, self.length - self.k.shape[1], self.window_size
            )
        # At most window - 1 (fewer while the sequence is shorter: a start of max(0, ..), never a negative
        # one, which would count from the end and drop keys).
        start = max(0, keys.shape[1] - (self.window_size - 1))
        # Copies, not slices: a slice would keep the whole chunk's keys and values alive (after a prefill,
        # [batch, prompt_len, heads_kv, head_dim] each, per sliding layer) for window - 1 of them.
        self.k = keys[:, start:].clone()
        self.v = values[:, start:].clone()
        self._advance(q.shape[1])
        return out


class DenseCache(_LayerCache):
    """All keys and values of a dense causal layer, in buffers of ``max_seqlen`` tokens allocated at the
    prompt: a decode step writes its key in place instead of copying the cache."""

    def __init__(self, max_seqlen: int):
        super().__init__()
        self.max_seqlen = max_seqlen
        self.k_buffer: torch.Tensor | None = None
        self.v_buffer: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.k_buffer = self.v_buffer = None

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        if self.k_buffer is not None:
            self.k_buffer = self.k_buffer.index_select(0, index)
            self.v_buffer = self.v_buffer.index_select(0, index)

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        start, end = self.length, self.length + q.shape[1]
        if end > self.max_seqlen:
            raise ValueError(f"the dense cache holds {self.max_seqlen} tokens, got {end}")
        if self.lengths is not None:  # ragged: row b writes at lengths[b] .., attends up to its own
            query_pos = self.lengths[:, None] + torch.arange(q.shape[1], device=q.device)
            rows = torch.arange(q.shape[0], device=q.device)[:, None]
            self.k_buffer[rows, query_pos], self.v_buffer[rows, query_pos] = k, v
            key_pos = torch.arange(end, device=q.device).expand(q.shape[0], -1)
            out = _ragged_attention(
                q, self.k_buffer[:, :end], self.v_buffer[:, :end], scale, query_pos, key_pos
            )
            self._advance(q.shape[1])
            return out
        if self.k_buffer is None:
            shape = (k.shape[0], self.max_seqlen, *k.shape[2:])
            # Zeros, not empty: a static step reads the whole buffer, and a masked key's value still
            # multiplies its zero weight (NaN garbage would make the row NaN).
            self.k_buffer, self.v_buffer = k.new_zeros(shape), v.new_zeros(shape)
        self.k_buffer[:, start:end], self.v_buffer[:, start:end] = k, v
        keys, values = self.k_buffer[:, :end], self.v_buffer[:, :end]
        if start == 0:
            out = dense_causal_attention(q, k, v, scale)
        else:
            out = _masked_attention(q, keys, values, scale, start, 0)
        self.length = end
        return out


class MoBALayerCache(_LayerCache):
    """A MoBA layer's ``MoBAKVCache`` (allocated for ``max_seqlen`` tokens)."""

    def __init__(self, cache: MoBAKVCache):
        super().__init__()
        self.cache = cache

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        self.cache.softmax_scale = scale
        # The prompt through moba_attn (MoBAKVCache.prefill): a long prefill on the training kernels.
        attend = self.cache.prefill if self.length == 0 else self.cache.append_and_attend
        out = attend(q, k, v)  # a ragged cache is never empty: its lengths are in cache_seqlens
        self._advance(q.shape[1])
        return out

    def reset(self) -> None:
        super().reset()
        self.cache.reset()

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.cache.reorder(index)


class HybridCache(list):
    """One layer cache per block of a ``HybridLM``, for ``batch`` sequences of up to ``max_seqlen`` tokens
    (the MoBA caches are allocated for it; the others grow). ``reorder(index)`` gathers every layer
    along the batch (beam search), ``reset()`` empties them, ``length`` is the tokens cached (of a ragged
    cache, ``prefill_ragged``'s, the longest row's) and ``lengths`` None, or a ragged cache's per-row
    lengths (int64 ``[batch]`` on the device)."""

    def __init__(self, model, batch: int, max_seqlen: int):
        super().__init__()
        self.batch, self.max_seqlen = batch, max_seqlen
        parameter = model.embed.weight
        for block in model.blocks:
            attn = block.attn
            if attn.attention == "sliding":
                self.append(SlidingWindowCache(attn.window_size))
            elif attn.attention == "dense":
                self.append(DenseCache(max_seqlen))
            else:
                cache = MoBAKVCache(
                    batch,
                    max_seqlen,
                    attn.num_kv_heads,
                    attn.head_dim,
                    block_size=attn.block_size,
                    topk=attn.topk,
                    dtype=parameter.dtype,
                    device=parameter.device,
                    backend="reference" if attn.backend == "reference" else "auto",
                )
                self.append(MoBALayerCache(cache))

    @property
    def length(self) -> int:
        return self[0].length if self else 0

    @property
    def lengths(self) -> torch.Tensor | None:
        return self[0].lengths if self else None

    @classmethod
    def prefill_ragged(
        cls, model, input_ids: torch.Tensor, prompt_lengths: list[int], max_seqlen: int
    ) -> tuple[HybridCache, torch.Tensor]:
        """A ragged cache holding row b's prompt ``input_ids[b, :prompt_lengths[b]]`` (lengths >= 1), and
        the logits ``[batch, vocab]`` after each row's last prompt token. The rows of each length are
        prefilled together, in one ``forward_with_cache`` call on a cache of their own (exactly the
        equal-length prefill), which is then copied into the rows it prefilled and dropped (at most one
        such cache lives beside the batch's): the sliding windows right-aligned (zeros, masked, before a
        short row's start), the dense buffers, the MoBA caches (keys, values, block sums and lengths,
        ``cache_seqlens``, per row already) and the key convolution states (zeros before a row's start)
        row by row."""
        batch = input_ids.shape[0]
        device = input_ids.device
        groups: dict[int, list[int]] = {}
        for row, length in enumerate(prompt_lengths):
            groups.setdefault(length, []).append(row)
        cache = cls(model, batch, max_seqlen)
        logits = None
        for length, rows in groups.items():
            index = torch.tensor(rows, dtype=torch.long, device=device)
            part = cls(model, len(rows), max_seqlen)
            chunk = input_ids.index_select(0, index)[:, :length]
            part_logits = model.forward_with_cache(chunk, part, last_position_only=True)[:, -1]
            if logits is None:
                logits = part_logits.new_empty(batch, part_logits.shape[-1])
            logits.index_copy_(0, index, part_logits)
            for merged, layer in zip(cache, part):
                pairs = []
                if isinstance(merged, SlidingWindowCache):
                    if merged.k is None:
                        shape = (batch, merged.window_size - 1, *layer.k.shape[2:])
                        merged.k, merged.v = layer.k.new_zeros(shape), layer.v.new_zeros(shape)
                    held = layer.k.shape[1]  # right-aligned: the last held slots
                    pairs = [(merged.k[:, merged.k.shape[1] - held :], layer.k)]
                    pairs.append((merged.v[:, merged.v.shape[1] - held :], layer.v))
                elif isinstance(merged, DenseCache):
                    if merged.k_buffer is None:
                        shape = (batch, *layer.k_buffer.shape[1:])
                        merged.k_buffer = layer.k_buffer.new_zeros(shape)
                        merged.v_buffer = layer.v_buffer.new_zeros(shape)
                    pairs = [(merged.k_buffer, layer.k_buffer), (merged.v_buffer, layer.v_buffer)]
                else:
                    names = ("k_cache", "v_cache", "block_sums", "cache_seqlens")
                    pairs = [(getattr(merged.cache, name), getattr(layer.cache, name)) for name in names]
                if layer.keyconv_state is not None:
                    if merged.keyconv_state is None:
                        merged.keyconv_state = layer.keyconv_state.new_zeros(
                            batch, *layer.keyconv_state.shape[1:]
                        )
                    pairs.append((merged.keyconv_state, layer.keyconv_state))
                for target, source in pairs:
                    target.index_copy_(0, index, source)
            del part
        lengths = torch.tensor(prompt_lengths, dtype=torch.int64, device=device)
        for layer in cache:
            layer.lengths, layer.length = lengths, max(prompt_lengths)
        return cache, logits

    def reset(self) -> None:
        for layer in self:
            layer.reset()

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self:
            layer.reorder(index)
        self.batch = index.shape[0]


# ----------------------------------------------------------------------------------------------------
# Static decode: fixed buffers, the position on the device, one step capturable in a CUDA graph
# ----------------------------------------------------------------------------------------------------


class _StaticLayer:
    """A layer cache for one-token decode steps in which every tensor keeps its shape and address: the
    step's position is read from ``position`` (int64 ``[1]`` on the device, or ``[batch]`` per row for a
    ragged cache; shared by every layer of the model and advanced by ``StaticDecoder``) and the key
    convolution's state is overwritten in place: a replayed CUDA graph runs no Python, so no host-side
    count may be advanced here (``StaticDecoder`` keeps the one host length).
    """

    def __init__(self, layer: _LayerCache, position: torch.Tensor):
        self.position = position
        self._keyconv_state = layer.keyconv_state

    @property
    def keyconv_state(self) -> torch.Tensor | None:
        return self._keyconv_state

    @keyconv_state.setter
    def keyconv_state(self, state: torch.Tensor) -> None:
        # In place: a replayed step reads the state where the captured one wrote it.
        self._keyconv_state.copy_(state)

    def positions(self, batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
        if seqlen != 1:
            raise ValueError(f"a static decode cache takes one token per step, got {seqlen}")
        return self.position.view(-1, 1).expand(batch, 1)

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        raise NotImplementedError


def _sdpa(q, k, v, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """q ``[B, 1, Hq, D]`` against k/v ``[B, S, Hkv, D]`` where ``visible`` (bool ``[S]``, or ``[B, S]``
    per row) is true."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=visible[None, :] if visible.ndim == 1 else visible[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


class StaticSlidingWindowCache(_StaticLayer):
    """The last ``window_size`` keys and values in a shift register ``[batch, window_size, heads_kv,
    head_dim]``: after a step at position p, slot j holds position ``p - (window_size - 1) + j`` (slots
    before position 0 are zeros and masked)."""

    def __init__(self, layer: SlidingWindowCache, position: torch.Tensor):
        super().__init__(layer, position)
        window, held = layer.window_size, layer.k.shape[1]
        self.window_size = window
        self.k_window = layer.k.new_zeros(layer.k.shape[0], window, *layer.k.shape[2:])
        self.v_window = layer.v.new_zeros(layer.v.shape[0], window, *layer.v.shape[2:])
        # Before a step at position p, slot window - 1 - i holds position p - 1 - i.
        self.k_window[:, window - held :] = layer.k
        self.v_window[:, window - held :] = layer.v
        self.slots = torch.arange(window, device=layer.k.device)

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        self.k_window.copy_(torch.cat([self.k_window[:, 1:], k], dim=1))
        self.v_window.copy_(torch.cat([self.v_window[:, 1:], v], dim=1))
        if self.position.shape[0] == 1:
            visible = self.slots >= (self.window_size - 1) - self.position
        else:  # per row
            visible = self.slots[None, :] >= (self.window_size - 1) - self.position[:, None]
        return _sdpa(q, self.k_window, self.v_window, visible, scale)


class StaticDenseCache(_StaticLayer):
    """A dense layer's preallocated buffers; a step writes its key at the position and attends to every
    slot up to it (the whole buffer is read, masked)."""

    def __init__(self, layer: DenseCache, position: torch.Tensor):
        super().__init__(layer, position)
        self.k_buffer, self.v_buffer = layer.k_buffer, layer.v_buffer
        self.slots = torch.arange(layer.max_seqlen, device=layer.k_buffer.device)
        self.rows = torch.arange(layer.k_buffer.shape[0], device=layer.k_buffer.device)

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        if self.position.shape[0] == 1:
            self.k_buffer.index_copy_(1, self.position, k)
            self.v_buffer.index_copy_(1, self.position, v)
            return _sdpa(q, self.k_buffer, self.v_buffer, self.slots <= self.position, scale)
        # Per row: row b writes its key at position[b] and sees the slots up to it.
        self.k_buffer.index_put_((self.rows, self.position), k[:, 0])
        self.v_buffer.index_put_((self.rows, self.position), v[:, 0])
        visible = self.slots[None, :] <= self.position[:, None]
        return _sdpa(q, self.k_buffer, self.v_buffer, visible, scale)


class StaticMoBALayerCache(_StaticLayer):
    """A MoBA layer's ``MoBAKVCache``: ``moba_attn_with_kvcache`` already reads its lengths on the device
    (``cache_seqlens``, advanced in place)."""

    def __init__(self, layer: MoBALayerCache, position: torch.Tensor):
        super().__init__(layer, position)
        self.cache = layer.cache

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        self.cache.softmax_scale = scale
        return self.cache.append_and_attend(q, k, v)


_STATIC_LAYERS = (
    (SlidingWindowCache, StaticSlidingWindowCache),
    (DenseCache, StaticDenseCache),
    (MoBALayerCache, StaticMoBALayerCache),
)


def _static_step(model, token: torch.Tensor, layers: list, position: torch.Tensor) -> torch.Tensor:
    """One static decode step: the logits ``[batch, vocab]`` after ``token`` ``[batch, 1]``, then the
    position advanced on the device (what ``StaticDecoder`` compiles and captures)."""
    logits = model.forward_with_cache(token, layers)[:, -1]
    position += 1
    return logits


class StaticDecoder:
    """One-token decode steps of ``model`` on a prefilled ``HybridCache``, every layer turned static
    (``StaticSlidingWindowCache``, ``StaticDenseCache``, ``StaticMoBALayerCache``): a step has fixed
    shapes, reads its position and lengths on the device and never waits for the host.

    With ``compile`` the step's forward is ``torch.compile``d (``compile_options`` on top of
    ``DEFAULT_COMPILE_OPTIONS``). Both backends of ``moba_attn_with_kvcache`` are custom ops
    (``flashmoba::moba_decode``, ``flashmoba::moba_decode_reference``) opaque to the compiler, so the
    step traces as one graph (tests pass ``fullgraph=True``; the default does not insist, so a layer
    that breaks the graph still runs). Inductor fuses the norms, rotary, SwiGLU and residual adds
    around them, so a step launches far fewer kernels; the first step compiles. The compiled step
    computes the same function (its fused kernels may round and order float sums differently from eager
    PyTorch, so 16-bit logits differ by rounding noise).

    With ``cuda_graph`` (CUDA only) the first step runs eagerly on a side stream (it compiles the Triton
    kernels and sets up cuBLAS), the second is captured in a ``torch.cuda.CUDAGraph``, and every step
    from then on is one replay: the host launches one graph per token instead of hundreds of kernels. The
    logits a replayed step returns live in the graph's buffer and are overwritten by the next step.
    The eager cache's tensors are taken over, not copied: use the decoder, not ``cache``, from then on.

    A ragged cache (``HybridCache.prefill_ragged``) gives a per-row ``position`` (int64 ``[batch]``, its
    ``lengths``); ``length`` is then the longest row's, the bound the capacity is checked against.
    """

    def __init__(
        self,
        model,
        cache: HybridCache,
        *,
        cuda_graph: bool,
        compile: bool = False,
        compile_options: dict | None = None,
    ):
        device = model.embed.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs the model on a CUDA device, got {device}")
        if compile_options is not None and not compile:
            raise ValueError("compile_options are torch.compile's: pass compile=True with them")
        options = {**DEFAULT_COMPILE_OPTIONS, **(compile_options or {})}
        if cuda_graph and options.get("mode") in ("reduce-overhead", "max-autotune"):
            raise ValueError(
                f"compile mode {options['mode']!r} adds Inductor's own CUDA graphs, which cannot be captured "
                "in the decoder's; use 'default' or 'max-autotune-no-cudagraphs' with cuda_graph"
            )
        if cache.length == 0:
            raise ValueError("StaticDecoder needs a prefilled cache (at least one token)")
        self.model, self.cuda_graph = model, cuda_graph
        self.length, self.capacity = cache.length, cache.max_seqlen
        if cache.lengths is not None:
            self.position = cache.lengths.to(device=device, dtype=torch.int64, copy=True)
        else:
            self.position = torch.tensor([cache.length], dtype=torch.int64, device=device)
        self.layers = [_static_layer(layer, self.position) for layer in cache]
        self.token = torch.zeros(cache.batch, 1, dtype=torch.int64, device=device)
        self.compiled = compile
        self._step_function = torch.compile(_static_step, **options) if compile else _static_step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self.steps = 0

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append ``token`` (int ``[batch]``) and return the logits ``[batch, vocab_size]`` after it."""
        if self.length >= self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens and is full")
        self.token.copy_(token[:, None])
        if not self.cuda_graph:
            logits = self._forward()
        elif self.steps == 0:
            logits = self._warm_up()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.graph_logits
        self.length += 1
        self.steps += 1
        return logits

    def _forward(self) -> torch.Tensor:
        return self._step_function(self.model, self.token, self.layers, self.position)

    def _warm_up(self) -> torch.Tensor:
        side = torch.cuda.Stream(device=self.token.device)
        side.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(side):
            logits = self._forward()
        torch.cuda.current_stream(self.token.device).wait_stream(side)
        return logits

    def _capture(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self._forward()


def _static_layer(layer: _LayerCache, position: torch.Tensor) -> _StaticLayer:
    for eager, static in _STATIC_LAYERS:
        if isinstance(layer, eager):
            return static(layer, position)
    raise TypeError(f"no static form of {type(layer).__name__}")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids ``[batch]`` from logits ``[batch, vocab]``: argmax at temperature 0, else a sample of
    ``softmax(logits / temperature)`` restricted to the smallest set of top tokens whose probability
    reaches ``top_p`` (nucleus sampling; the most likely token is always kept)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_prompt_lengths(prompt_lengths, input_ids: torch.Tensor) -> list[int]:
    """``prompt_lengths`` as a list of ints, checked: an integer tensor or a list/tuple of ints, shape
    ``[batch]``, each in ``[1, prompt_len]``."""
    batch, prompt_len = input_ids.shape
    if isinstance(prompt_lengths, torch.Tensor):
        dtype = prompt_lengths.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(f"prompt_lengths must be an integer tensor, got dtype {prompt_lengths.dtype}")
        if tuple(prompt_lengths.shape) != (batch,):
            raise ValueError(
                f"prompt_lengths must have shape [batch] = ({batch},), got {tuple(prompt_lengths.shape)}"
            )
        lengths = [int(length) for length in prompt_lengths.tolist()]
    elif isinstance(prompt_lengths, (list, tuple)):
        if any(isinstance(length, bool) or not isinstance(length, int) for length in prompt_lengths):
            raise TypeError(f"prompt_lengths must hold ints, got {list(prompt_lengths)!r}")
        if len(prompt_lengths) != batch:
            raise ValueError(
                f"prompt_lengths must have shape [batch] = ({batch},), got {len(prompt_lengths)} lengths"
            )
        lengths = list(prompt_lengths)
    else:
        raise TypeError(
            "prompt_lengths must be an integer torch.Tensor [batch] or a list of ints, got "
            f"{type(prompt_lengths).__name__}"
        )
    for row, length in enumerate(lengths):
        if not 1 <= length <= prompt_len:
            raise ValueError(
                f"prompt_lengths must be in [1, input_ids.shape[1] = {prompt_len}], got {length} for "
                f"row {row}"
            )
    return lengths


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    stats: dict | None = None,
    decode_mode: str = "auto",
    after_decode: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], None] | None = None,
    after_decode_steps: int = 0,
    prompt_lengths: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """Generate ``max_new_tokens`` after the prompts ``input_ids [batch, prompt_len]`` (prompt_len >= 1)
    with a ``HybridCache``: one prefill call over the prompts, then one token per step.

    ``prompt_lengths`` (an integer tensor ``[batch]`` on any device, or a list of ints; None: every row
    is ``prompt_len`` long) gives prompts of unequal lengths: ``input_ids`` is right-padded, row b's
    prompt is ``input_ids[b, :prompt_lengths[b]]`` (1 <= length <= prompt_len; the padding is never
    read) and row b is generated exactly as it would be alone from it (the same greedy tokens, the same
    sampling distribution): its own RoPE positions, MoBA blocks and caches (see
    ``HybridCache.prefill_ragged``: one prefill call per distinct length). Lengths that are all equal
    take the equal-length path.

    Returns the new ids ``[batch, n]`` (int64, the prompt not included). With ``eos_token_id``, a row that
    produced it continues with it, and generation stops once every row has (n may then be smaller than
    ``max_new_tokens``). ``generator`` drives the sampling (temperature > 0). ``stats``, when given a
    dict, receives ``prefill_tokens``, ``prefill_seconds``, ``decode_tokens`` and ``decode_seconds``
    (tokens summed over the batch; the first new token comes with the prefill; with "cuda_graph" the
    decode time includes the eager first step and the capture, with "compiled" and "compiled_graph" the
    compilation too), and ``steady_decode_tokens`` and
    ``steady_decode_seconds``, the decode steps after the first ``WARM_DECODE_STEPS`` (one extra host
    synchronisation marks their start); ``prefill_tokens`` counts each row's own prompt length.
    ``decode_mode`` is one of
    ``DECODE_MODES``: every mode gives the same function (tests/models/test_generation.py).

    ``after_decode(step, token)``, when given, is called once after the timed decode loop (outside every
    timing) with the decode step function the loop used (``token [batch]`` -> logits ``[batch, vocab]``,
    e.g. ``StaticDecoder.step``: a CUDA-graph replay in "cuda_graph" mode) and the last token it sampled;
    the cache has room for ``after_decode_steps`` more steps for it (``flashmoba bench generate
    --profile`` profiles steady steps so). The returned ids do not include what it decodes.

    The prefill computes the logits of the last prompt position only (the norm and head over T positions
    would be ``[batch, T, ...]`` float32 buffers for one row of logits).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an int64 or int32 torch.Tensor")
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(
            f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got {tuple(input_ids.shape)}"
        )
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=0)
    after_decode_steps = check_int("after_decode_steps", after_decode_steps, minimum=0)
    temperature = check_real("temperature", temperature, minimum=0.0)
    top_p = check_real("top_p", top_p, exclusive_minimum=0.0, maximum=1.0)
    if eos_token_id is not None:
        eos_token_id = check_int("eos_token_id", eos_token_id, minimum=0)
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
    lengths = None if prompt_lengths is None else _check_prompt_lengths(prompt_lengths, input_ids)
    if lengths is not None and len(set(lengths)) <= 1:  # equal lengths (or no rows): the plain path
        input_ids, lengths = input_ids[:, : lengths[0]] if lengths else input_ids, None
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if decode_mode == "auto":
        decode_mode = "cuda_graph" if device.type == "cuda" else "eager"
    if decode_mode in GRAPH_MODES and device.type != "cuda":
        raise ValueError(f'decode_mode="{decode_mode}" needs input_ids on a CUDA device, got {device}')
    new_ids = torch.empty(batch, 0, dtype=torch.int64, device=device)
    timings = dict.fromkeys(("prefill_tokens", "decode_tokens", "steady_decode_tokens"), 0)
    timings.update(dict.fromkeys(("prefill_seconds", "decode_seconds", "steady_decode_seconds"), 0.0))
    if max_new_tokens > 0 and batch > 0:
        longest = prompt_len if lengths is None else max(lengths)
        max_seqlen = longest + max_new_tokens + after_decode_steps
        _synchronize(device)
        started = time.perf_counter()
        if lengths is None:
            cache = HybridCache(model, batch, max_seqlen)
            logits = model.forward_with_cache(input_ids, cache, last_position_only=True)[:, -1]
        else:
            cache, logits = HybridCache.prefill_ragged(model, input_ids, lengths, max_seqlen)
        _synchronize(device)
        timings["prefill_seconds"] = time.perf_counter() - started
        timings["prefill_tokens"] = batch * prompt_len if lengths is None else sum(lengths)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens = []
        started, steady_started = time.perf_counter(), None
        if decode_mode == "eager":

            def decode_step(token):
                return model.forward_with_cache(token[:, None], cache)[:, -1]
        else:
            decode_step = StaticDecoder(
                model,
                cache,
                cuda_graph=decode_mode in GRAPH_MODES,
                compile=decode_mode in ("compiled", "compiled_graph"),
            ).step
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            tokens.append(token)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            logits = decode_step(token)
            timings["decode_tokens"] += batch
            if step + 1 == WARM_DECODE_STEPS:
                _synchronize(device)
                steady_started = time.perf_counter()
            elif step + 1 > WARM_DECODE_STEPS:
                timings["steady_decode_tokens"] += batch
        _synchronize(device)
        ended = time.perf_counter()
        timings["decode_seconds"] = ended - started
        if steady_started is not None:
            timings["steady_decode_seconds"] = ended - steady_started
        new_ids = torch.stack(tokens, dim=1)
        if after_decode is not None:
            after_decode(decode_step, tokens[-1])
    if stats is not None:
        stats.update(timings)
    return new_ids
