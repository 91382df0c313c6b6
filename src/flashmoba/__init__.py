"""flashmoba: Mixture of Block Attention (MoBA) with small key blocks.

Public functions (flash-attn layout, see ``flashmoba.api`` for the full contract):

- ``moba_attn(q, k, v, block_size, topk, ...)``        q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]``
- ``moba_attn_varlen(q, k, v, cu_seqlens_q, ...)``     packed q ``[total_q, Hq, D]``
- ``moba_select(q, k, block_size, topk, ...)``         the router alone: selected block ids

Importing flashmoba does not import Triton; the Triton kernels load on first use.
"""

from flashmoba.api import moba_attn, moba_attn_varlen, moba_select

__all__ = ["moba_attn", "moba_attn_varlen", "moba_select"]
__version__ = "0.1.0"
