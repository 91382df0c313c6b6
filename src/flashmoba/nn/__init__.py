"""Model-side building blocks: the key convolution and an attention layer with MoBA, dense or sliding window."""

from flashmoba.nn.attention import (
    MoBAAttention,
    PackedSequences,
    dense_causal_attention,
    rotary_embedding,
    sliding_window_attention,
)
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
