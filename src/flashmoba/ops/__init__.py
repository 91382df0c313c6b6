"""Triton kernels of flashmoba (imported on first use of ``backend="triton"``, never by ``import flashmoba``).

- ``router``: block centroids and the fused top-k (the selection of each query row and head);
- ``index``: the key-block-major list of routed (query row, slot) pairs built from the selection;
- ``work_items``: the index's columns cut into work items, one program each (hot blocks spread out);
- ``decode``: decode with a KV cache (append, router against the centroid cache, split-K attention);
- ``forward`` / ``backward``: the sparse attention kernels and their launchers; ``partials``: the
  per-pair scratch they share;
- ``autograd``: the ``torch.library`` custom ops (fake kernels, autograd) and the functions below, which
  ``flashmoba.api`` calls;
- ``config``: ``KernelConfig``, the launch settings a caller may choose; ``utils``: shared helpers.

Glossary:

- block: ``block_size`` consecutive keys of one sequence (the last one may be shorter);
- block slot: a block's place in the packed batch, ``cu_seqlens_k[b] // block_size + b + j`` for block j
  of sequence b (centroid rows, the index's columns and the block table share it);
- top-k slot: one of the ``topk`` places of a query row's selection (``selected[row, head, slot]``);
- entry: one routed (row, head, top-k slot) pair, ``(row * Hq + head) * topk + slot``;
- segment: the index's run of entries of one (query head, block slot) column and one chunk;
- chunk: the query heads (or rows of one head) whose partials the scratch holds at once;
- work item: at most ``KernelConfig.rows_per_item`` consecutive entries of one column, one program's work.
"""

from __future__ import annotations

from flashmoba.ops import _interpreter  # noqa: F401  (patches Triton's interpreter when TRITON_INTERPRET=1)
from flashmoba.ops.autograd import (
    moba_attn_triton,
    moba_attn_varlen_triton,
    moba_select_triton,
    moba_select_varlen_triton,
)
from flashmoba.ops.config import KernelConfig
from flashmoba.ops.decode import DecodeConfig, moba_decode_triton

__all__ = [
    "DecodeConfig",
    "KernelConfig",
    "moba_decode_triton",
    "moba_attn_triton",
    "moba_attn_varlen_triton",
    "moba_select_triton",
    "moba_select_varlen_triton",
]
