"""Deprecated import path, kept for one release: the hybrid LM now lives in ``flashmoba.models.hybrid``
(re-exported by ``flashmoba.models``)."""

from flashmoba.models.hybrid import (
    GLOBAL_ATTENTION_KINDS,
    MODEL_PRESETS,
    Block,
    HybridLM,
    ModelConfig,
    RMSNorm,
    SwiGLU,
    is_global_layer,
    model_config_from_preset,
)

__all__ = [
    "GLOBAL_ATTENTION_KINDS",
    "MODEL_PRESETS",
    "Block",
    "HybridLM",
    "ModelConfig",
    "RMSNorm",
    "SwiGLU",
    "is_global_layer",
    "model_config_from_preset",
]
