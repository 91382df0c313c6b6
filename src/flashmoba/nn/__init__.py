"""Model-side building blocks: the key convolution, attention functions without parameters, and an
attention layer with MoBA, dense or sliding-window attention.

- ``flashmoba.nn.functional``: rotary embedding; dense, flash-varlen and sliding-window attention;
- ``flashmoba.nn.attention``: ``PackedSequences`` and the ``MoBAAttention`` layer;
- ``flashmoba.nn.keyconv``: ``KeyConv``.
"""

from flashmoba.nn.attention import MoBAAttention, PackedSequences
from flashmoba.nn.functional import dense_causal_attention, rotary_embedding, sliding_window_attention
from flashmoba.nn.keyconv import KeyConv, causal_depthwise_conv, positions_in_sequence

__all__ = [
    "KeyConv",
    "MoBAAttention",
    "PackedSequences",
    "causal_depthwise_conv",
    "dense_causal_attention",
    "positions_in_sequence",
    "rotary_embedding",
    "sliding_window_attention",
]
