"""MoBA as a transformers attention implementation: ``attn_implementation="moba"``.

``import flashmoba.integrations.transformers`` registers, in transformers' own interfaces,

- the attention function ``moba_attention_forward`` under the name ``"moba"``
  (``transformers.AttentionInterface``), which every model whose attention goes through the interface
  calls (Llama, Qwen2/Qwen3, Mistral and others), and
- SDPA's mask function under the same name (``transformers.masking_utils.AttentionMaskInterface``):
  without a mask function of its own name the attention function would be given ``attention_mask=None``
  and padding would be lost. The mask is SDPA's 4D boolean one, or None where SDPA would use
  ``is_causal`` (no padding).

The name holds no "flash": transformers treats such names as flash-attention kernels to load.

A model built with ``attn_implementation="moba"`` reads from its config:

- ``moba_block_size`` and ``moba_topk`` (required): MoBA's block size and blocks per query (own block
  included);
- ``moba_backend`` (optional, ``"auto"``): the flashmoba backend;
- ``moba_layers`` (optional): the indices of the layers that run MoBA; the others run SDPA, so a Llama
  can be made the paper's hybrid (some layers dense, some MoBA).

What a MoBA layer computes is ``flashmoba.moba_attn`` on each sequence: causal and bottom-right aligned,
so that with a KV cache the new queries see the whole cache, as transformers passes it. Padded batches
(an attention mask with padding, as batched ``generate`` makes them) are cut into their sequences of
real tokens and run through ``moba_attn_varlen``, which reads the mask on the host; packed inputs with
``cu_seq_lens_q`` / ``cu_seq_lens_k`` in the keyword arguments run through ``moba_attn_varlen`` directly.
With a plain ``DynamicCache`` (what ``generate`` makes by default) a decode step recomputes the routing
over the whole cache transformers passes: exact, but O(cache length) work per step.

The centroid cache: ``MoBACache(config)`` is a ``DynamicCache`` whose MoBA layers are ``MoBACacheLayer``s
(built per layer, as transformers builds sliding-window layers; ``config.layer_types`` is left alone,
since models such as Qwen2 index their masks by it). Passed to ``generate`` (``past_key_values=`` or, on
transformers versions that renamed it, ``cache=``), each MoBA decode step reads the block sums and the
selected blocks only, through ``flashmoba.moba_attn_with_kvcache``. How the state reaches the attention
function, which transformers never gives the cache: the attention module calls ``cache.update(key,
value, layer_idx, ...)`` and passes what it returns straight to the attention function (in 5.17 as in
5.24). The layer returns its keys as a view of its own that carries a reference to the layer (an
attribute on that tensor object); the attention function looks for it on the ``key`` it is given. The
update itself cannot see the attention mask (padding), so the attention function folds the new positions
into the block sums (``MoBACacheLayer.sync``) before it attends. Where the tag is missing (a plain cache,
or a model that transforms the keys after the update) or the state cannot follow the cache (padding that
is not on the left), the call recomputes the routing over the keys it was given: the same function, only
slower. The prompt itself runs through the training kernels (``moba_attn``), as ``MoBAKVCache.prefill``
does. Left-padded rows are read through the cache as pages of one position with a block table that skips
each row's padding, so every row routes over its own blocks, as it would alone.

Why a tag on the returned keys rather than the keyword arguments: what ``update`` is given besides the
tensors differs between versions (``cache_kwargs`` in 5.17, the module's ``kwargs`` in 5.24) and reaches
the attention function in neither; the keys it returns reach it in both. The decode path has no backward:
under grad mode with inputs that require grad the call recomputes instead. A step whose batch carries a
padding mask reads one bool back to the host (that the new positions are real tokens).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from flashmoba._checks import check_positive_int
from flashmoba.api import BACKENDS, moba_attn, moba_attn_varlen
from flashmoba.kvcache import moba_attn_with_kvcache

ATTENTION_NAME = "moba"

__all__ = ["ATTENTION_NAME", "MoBACache", "MoBACacheLayer", "moba_attention_forward", "moba_settings"]


def moba_settings(config) -> tuple[int, int, str, set[int] | None]:
    """(block_size, topk, backend, MoBA layer indices or None for all) from a model config, each checked
    with its config field named."""
    missing = [name for name in ("moba_block_size", "moba_topk") if getattr(config, name, None) is None]
    if missing:
        raise ValueError(
            f'attn_implementation="{ATTENTION_NAME}" needs config fields {missing} (MoBA\'s block size and '
            "blocks per query, own block included)"
        )
    block_size = check_positive_int("config.moba_block_size", config.moba_block_size)
    topk = check_positive_int("config.moba_topk", config.moba_topk)
    backend = getattr(config, "moba_backend", None) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"config.moba_backend must be one of {BACKENDS}, got {backend!r}")
    layers = getattr(config, "moba_layers", None)
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
            raise TypeError(f"config.moba_layers must be a list of layer indices, got {layers!r}")
        layers = set(layers)
    return block_size, topk, backend, layers


def _key_validity(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per batch row, which keys are real tokens (``[batch, kv_len]`` bool), from SDPA's 4D mask: the last
    query row sees every real key (causal). None: no mask, no padding."""
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, -1, :]
    return last_row if last_row.dtype == torch.bool else last_row == 0


def _padded_moba(q, k, v, valid_keys, block_size, topk, scale, backend) -> torch.Tensor:
    """MoBA of a padded batch ``[batch, len, heads, dim]``: each row's real tokens as one sequence of a
    varlen call. A row's real keys must be one run (left or right padding); its real queries are then the
    last of them, as bottom-right alignment wants. Padded query rows give zeros."""
    q_len, kv_len = q.shape[1], k.shape[1]
    valid_queries = valid_keys[:, kv_len - q_len :]
    positions = torch.arange(kv_len, device=k.device)
    first = torch.where(valid_keys, positions, kv_len).amin(dim=1)
    last = torch.where(valid_keys, positions, -1).amax(dim=1)
    counts = torch.stack([valid_keys.sum(dim=1), valid_queries.sum(dim=1), first, last])
    lengths_k, lengths_q, firsts, lasts = counts.tolist()  # one host read per call, for the padding
    for row, (length_k, first_key, last_key) in enumerate(zip(lengths_k, firsts, lasts)):
        if length_k and last_key - first_key + 1 != length_k:
            raise ValueError(
                f"attention_mask row {row}: its real tokens must be one run (left or right padding), got "
                f"{length_k} tokens between positions {first_key} and {last_key}"
            )
    cu_q = torch.tensor([0, *lengths_q], device=q.device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lengths_k], device=q.device).cumsum(0).to(torch.int32)
    out_packed = moba_attn_varlen(
        q[valid_queries],
        k[valid_keys],
        v[valid_keys],
        cu_q,
        cu_k,
        max(lengths_q),
        max(lengths_k),
        block_size,
        topk,
        softmax_scale=scale,
        backend=backend,
    )
    out = q.new_zeros(q.shape)
    out[valid_queries] = out_packed
    return out


# ----------------------------------------------------------------------------------------------------
# The centroid cache layer
# ----------------------------------------------------------------------------------------------------

# The attribute by which the key view a MoBACacheLayer returns names the layer it came from.
_LAYER_TAG = "_flashmoba_moba_cache_layer"
_CAPACITY_STEP = 256  # storage grows to a multiple of this (and at least doubles), so appends are O(1)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The centroid cache's dtype for keys of ``dtype`` (what moba_attn_with_kvcache checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class MoBACacheLayer(DynamicLayer):
    """A MoBA layer's cache: keys and values as ``DynamicLayer`` presents them, plus the centroid state.

    Storage is flashmoba's layout ``[batch, capacity, heads_kv, head_dim]`` (capacity grown geometrically,
    so an append copies only the new tokens); ``keys`` / ``values`` are the ``[batch, heads_kv, length,
    head_dim]`` views transformers expects. The centroid state is what ``moba_attn_with_kvcache`` reads:
    ``block_sums`` ``[batch, ceil(capacity / block_size), heads_kv, head_dim]`` (float32, float64 for
    float64 keys), ``seqlens`` (int32, real tokens per row) and ``offsets`` (the left padding of each row:
    row b's real tokens are stored at ``offsets[b] ..``).

    ``update`` cannot see the attention mask, so it only stores; the attention function folds the new
    positions into the centroid state (``sync``) with the mask in hand. A cache the state cannot follow
    (padding that is not one run on the left, a changed block size) turns ``routable`` off, and that
    layer's attention then recomputes the routing over the whole cache: slower, still exact.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._k = self._v = None
        self.length = 0  # positions stored, padding included: what transformers sees
        self.block_size = None
        self.block_sums = None
        self.seqlens = None
        self.offsets = None
        self.padded = False
        self.folded = 0  # stored positions already in the centroid state
        self.routable = True

    # -- storage ---------------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads_kv, _, head_dim = key_states.shape
        self.device = key_states.device
        shape = (batch, 0, heads_kv, head_dim)
        self._k = key_states.new_zeros(shape)
        self._v = value_states.new_zeros((batch, 0, heads_kv, value_states.shape[-1]))
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[1]

    def _reserve(self, needed: int) -> None:
        """Grow the storage (and the block sums) to hold ``needed`` positions."""
        if needed <= self.capacity:
            return
        capacity = -(-max(needed, 2 * self.capacity) // _CAPACITY_STEP) * _CAPACITY_STEP
        grow = capacity - self.capacity
        self._k = torch.cat([self._k, self._k.new_zeros(self._k.shape[0], grow, *self._k.shape[2:])], dim=1)
        self._v = torch.cat([self._v, self._v.new_zeros(self._v.shape[0], grow, *self._v.shape[2:])], dim=1)
        if self.block_sums is not None:
            self._size_block_sums()
        self._refresh_views()

    def _size_block_sums(self) -> None:
        batch, _, heads_kv, head_dim = self._k.shape
        blocks = -(-self.capacity // self.block_size)
        if self.block_sums is None:
            self.block_sums = self._k.new_zeros(
                batch, blocks, heads_kv, head_dim, dtype=_sum_dtype(self._k.dtype)
            )
        elif self.block_sums.shape[1] < blocks:
            extra = self.block_sums.new_zeros(batch, blocks - self.block_sums.shape[1], heads_kv, head_dim)
            self.block_sums = torch.cat([self.block_sums, extra], dim=1)

    def _refresh_views(self) -> None:
        self.keys = self._k[:, : self.length].transpose(1, 2)
        self.values = self._v[:, : self.length].transpose(1, 2)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[batch, heads_kv, T, head_dim]`` keys and values; return every stored key and value
        (``[batch, heads_kv, length, head_dim]`` views). The key view carries a reference to this layer,
        which is how the attention function finds the centroid state (see the module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        self._reserve(self.length + new)
        self._k[:, self.length : self.length + new] = key_states.transpose(1, 2)
        self._v[:, self.length : self.length + new] = value_states.transpose(1, 2)
        self.length += new
        self._refresh_views()
        keys = self._k[:, : self.length].transpose(1, 2)  # a view of its own, carrying the tag
        setattr(keys, _LAYER_TAG, self)
        return keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length

    # -- the centroid state ----------------------------------------------------------------------------

    def sync(self, valid_keys: torch.Tensor | None, block_size: int) -> bool:
        """Fold the stored positions not yet in the centroid state into it. ``valid_keys`` ``[batch,
        length]`` bool marks the real tokens (None: all). Returns whether the state now holds every stored
        position (False: this layer is not routable, see the class docstring)."""
        if not self.routable:
            return False
        if self.block_size is None:
            self._reserve(block_size)  # a capacity below the block size would shrink kvcache's blocks
            self.block_size = block_size
            self._size_block_sums()
        elif self.block_size != block_size:
            self.routable = False
            return False
        start, stop = self.folded, self.length
        if start == stop:
            return True
        batch = self._k.shape[0]
        positions = torch.arange(start, stop, device=self._k.device)
        if self.offsets is None:  # the first fold learns each row's left padding
            if valid_keys is None:
                self.offsets = torch.zeros(batch, dtype=torch.long, device=self._k.device)
            else:
                self.offsets = stop - valid_keys[:, start:stop].sum(dim=1)
            self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self._k.device)
            self.padded = bool(self.offsets.any())
        real = positions[None, :] >= self.offsets[:, None]  # [batch, new]
        if valid_keys is None:
            consistent = not self.padded
        else:
            consistent = valid_keys.shape[1] == stop and bool((valid_keys[:, start:stop] == real).all())
        if not consistent:
            self.routable = False
            return False
        self._fold(start, stop, real)
        return True

    def _fold(self, start: int, stop: int, real: torch.Tensor) -> None:
        """Add the real keys of positions [start, stop) to their blocks' sums (block j of row b: real
        tokens ``j * block_size ..`` counted from ``offsets[b]``)."""
        batch, _, heads_kv, head_dim = self._k.shape
        blocks = self.block_sums.shape[1]
        relative = torch.arange(start, stop, device=self._k.device)[None, :] - self.offsets[:, None]
        block = torch.where(real, torch.div(relative, self.block_size, rounding_mode="floor"), 0)
        index = (torch.arange(batch, device=self._k.device)[:, None] * blocks + block).flatten()
        keys = self._k[:, start:stop].to(self.block_sums.dtype) * real[:, :, None, None]
        with torch.no_grad():
            self.block_sums.view(batch * blocks, heads_kv, head_dim).index_add_(0, index, keys.flatten(0, 1))
            self.seqlens += real.sum(dim=1, dtype=torch.int32)
        self.folded = stop

    def kv_arguments(self) -> dict:
        """The cache arguments of ``moba_attn_with_kvcache`` for the stored sequences: the contiguous
        storage, or (for left-padded rows) the same storage as pages of one position with a block table
        that skips each row's padding."""
        if not self.padded:
            return {"k_cache": self._k, "v_cache": self._v, "block_table": None}
        batch, capacity = self._k.shape[:2]
        pages = batch * capacity
        starts = torch.arange(batch, device=self._k.device) * capacity + self.offsets
        table = starts[:, None] + torch.arange(capacity, device=self._k.device)[None, :]
        return {
            "k_cache": self._k.view(pages, 1, *self._k.shape[2:]),
            "v_cache": self._v.view(pages, 1, *self._v.shape[2:]),
            "block_table": table.clamp(max=pages - 1).to(torch.int32),
        }

    # -- what transformers asks of a cache layer -------------------------------------------------------

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (transformers' convention: a negative count);
        the centroid state is rebuilt from the remaining keys."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"tokens_to_remove must be <= 0 (a count of tokens to drop), got {tokens_to_remove}"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self._refresh_views()
        if self.block_sums is not None:
            self.block_sums.zero_()
            self.seqlens.zero_()
            self.folded = 0

    def _select(self, select) -> None:
        """Apply a batch operation to every per-row tensor."""
        if not self.is_initialized:
            return
        for name in ("_k", "_v", "block_sums", "seqlens", "offsets"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, select(tensor))
        self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    def offload(self) -> None:
        self._select(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self._k.device != self.device:
            self._select(lambda t: t.to(self.device, non_blocking=True))


class MoBACache(DynamicCache):
    """A ``DynamicCache`` whose MoBA layers (``config.moba_layers``, or every full-attention layer) are
    ``MoBACacheLayer``s: pass it to ``generate`` and each decode step routes with the block sums and reads
    only the selected blocks, ``model.generate(ids, past_key_values=MoBACache(model.config))``. The other
    layers are what ``DynamicCache(config=config)`` makes them (sliding-window layers stay sliding)."""

    def __init__(self, config, **kwargs):
        super().__init__(config=config, **kwargs)
        text_config = config.get_text_config(decoder=True)
        *_, moba_layers = moba_settings(text_config)
        if not self.layers:  # a transformers that replicates layers lazily: make them now
            self.layers = [DynamicLayer() for _ in range(text_config.num_hidden_layers)]
            self.layer_class_to_replicate = None
        for index, layer in enumerate(self.layers):
            if (moba_layers is None or index in moba_layers) and type(layer) is DynamicLayer:
                self.layers[index] = MoBACacheLayer()


def moba_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query ``[batch, heads_q, q_len, head_dim]``, key and value
    ``[batch, heads_kv, kv_len, head_dim]`` (the cache included), the output ``[batch, q_len, heads_q,
    head_dim]`` and no attention weights. Layers outside ``config.moba_layers`` run SDPA."""
    block_size, topk, backend, layers = moba_settings(module.config)
    layer_index = getattr(module, "layer_idx", None)
    if layers is not None and layer_index not in layers:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout and module.training:
        raise ValueError(f"MoBA has no attention dropout; set config.attention_dropout to 0, got {dropout}")
    if softcap is not None:
        raise ValueError(f"MoBA has no logit soft-capping, got softcap={softcap}")
    if sliding_window is not None:
        raise ValueError(
            f"layer {layer_index} is a sliding-window layer (sliding_window={sliding_window}): leave it out "
            "of config.moba_layers"
        )
    if not getattr(module, "is_causal", True):
        raise ValueError("MoBA attention is causal; this module is not")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [batch, len, heads, head_dim]
    if kwargs.get("cu_seq_lens_q") is not None:  # packed: [1, total, heads, head_dim]
        out = moba_attn_varlen(
            q[0],
            k[0],
            v[0],
            kwargs["cu_seq_lens_q"].to(torch.int32),
            kwargs["cu_seq_lens_k"].to(torch.int32),
            int(kwargs["max_length_q"]),
            int(kwargs["max_length_k"]),
            block_size,
            topk,
            softmax_scale=scale,
            backend=backend,
        )[None]
        return out, None
    valid_keys = _key_validity(attention_mask)
    layer = getattr(key, _LAYER_TAG, None)
    if layer is not None and layer.sync(valid_keys, block_size) and q.shape[1] < layer.length:
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
            out = moba_attn_with_kvcache(
                q.contiguous(),
                block_sums=layer.block_sums,
                cache_seqlens=layer.seqlens,
                block_size=block_size,
                topk=topk,
                softmax_scale=scale,
                backend=backend,
                **layer.kv_arguments(),
            )
            return out, None
    if valid_keys is None or bool(valid_keys.all()):
        out = moba_attn(q, k, v, block_size, topk, softmax_scale=scale, backend=backend)
    else:
        out = _padded_moba(q, k, v, valid_keys, block_size, topk, scale, backend)
    return out, None


AttentionInterface.register(ATTENTION_NAME, moba_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
