"""Context parallelism: MoBA over sequences split across the ranks of a process group.

- ``moba_attn_context_parallel(q, k, v, block_size, topk, *, group=None, ...)``: this rank's slice of
  ``flashmoba.moba_attn`` on the whole sequences, with autograd (see ``flashmoba.parallel.attention``).
"""

from flashmoba.parallel.attention import moba_attn_context_parallel

__all__ = ["moba_attn_context_parallel"]
