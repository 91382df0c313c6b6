"""The hybrid language model and its checkpoint format.

- ``flashmoba.models.hybrid``: ``ModelConfig``, the presets, ``RMSNorm``, ``SwiGLU``, ``Block``,
  ``HybridLM``;
- ``flashmoba.models.checkpoint``: the one reader and writer of ``flashmoba train`` checkpoints
  (``save_checkpoint``, ``load_checkpoint``, ``latest_checkpoint``, ``find_checkpoint``, ``load_model``);
- ``flashmoba.models.generation``: cached generation (``HybridCache``, ``generate``; ``HybridLM.generate``).
"""

from flashmoba.models.checkpoint import (
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from flashmoba.models.generation import HybridCache, generate
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
    "HybridCache",
    "HybridLM",
    "ModelConfig",
    "RMSNorm",
    "SwiGLU",
    "find_checkpoint",
    "generate",
    "is_global_layer",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "model_config_from_preset",
    "save_checkpoint",
]
