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
A decode step recomputes the routing over the cache transformers passes (exact, but O(cache length)
work per step); a cache layer keeping the block sums is not written yet.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from flashmoba._checks import check_positive_int
from flashmoba.api import BACKENDS, moba_attn, moba_attn_varlen

ATTENTION_NAME = "moba"

__all__ = ["ATTENTION_NAME", "moba_attention_forward", "moba_settings"]


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
    if valid_keys is None or bool(valid_keys.all()):
        out = moba_attn(q, k, v, block_size, topk, softmax_scale=scale, backend=backend)
    else:
        out = _padded_moba(q, k, v, valid_keys, block_size, topk, scale, backend)
    return out, None


AttentionInterface.register(ATTENTION_NAME, moba_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
