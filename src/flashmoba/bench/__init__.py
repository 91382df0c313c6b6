"""The benchmark library: CUDA timing and the baselines flashmoba is measured against.

- ``flashmoba.bench.timing``: ``card_name``, ``time_cuda_ms`` (CUDA events), ``peak_memory_gib``;
- ``flashmoba.bench.baselines``: dense SDPA and FlexAttention with a MoBA ``BlockMask``
  (``flex_moba_block_mask``);
- ``flashmoba.bench.attention``: ``measure`` (one implementation on one configuration, a results row)
  and ``router_tflops``.

The command ``flashmoba bench`` (its flags, table and plot) is ``flashmoba.cli.bench``; the library does
not import it (layers import only downward).
"""

from flashmoba.bench.attention import DEFAULT_SEQLENS, IMPLEMENTATIONS, measure, router_tflops
from flashmoba.bench.baselines import flex_moba_attention, flex_moba_block_mask, sdpa_attention
from flashmoba.bench.timing import _file_stem as _file_stem
from flashmoba.bench.timing import card_name, peak_memory_gib, time_cuda_ms

__all__ = [
    "DEFAULT_SEQLENS",
    "IMPLEMENTATIONS",
    "card_name",
    "flex_moba_attention",
    "flex_moba_block_mask",
    "measure",
    "peak_memory_gib",
    "router_tflops",
    "sdpa_attention",
    "time_cuda_ms",
]
