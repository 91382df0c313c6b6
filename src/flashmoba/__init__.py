"""flashmoba: Mixture of Block Attention (MoBA) with small key blocks.

Public functions (flash-attn layout, see ``flashmoba.api`` for the full contract):

- ``moba_attn(q, k, v, block_size, topk, ...)``        q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]``
- ``moba_attn_varlen(q, k, v, cu_seqlens_q, ...)``     packed q ``[total_q, Hq, D]``
- ``moba_select(q, k, block_size, topk, ...)``         the router alone: selected block ids
- ``moba_attn_with_kvcache(q, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk, ...)``
  decode with a KV cache (see ``flashmoba.kvcache``); ``kvcache_block_sums`` builds its centroid cache
- ``MoBAKVCache(batch, max_seqlen, heads_kv, head_dim, block_size=, topk=)``: one layer's cache object

Importing flashmoba does not import Triton; the Triton kernels load on first use.
"""

from flashmoba.api import moba_attn, moba_attn_varlen, moba_select
from flashmoba.kvcache import MoBAKVCache, kvcache_block_sums, moba_attn_with_kvcache

__all__ = [
    "MoBAKVCache",
    "kvcache_block_sums",
    "moba_attn",
    "moba_attn_varlen",
    "moba_attn_with_kvcache",
    "moba_select",
]
__version__ = "0.1.0"
