"""Deprecated import path, kept for one release. The code now lives in ``flashmoba.training.config``
(TrainConfig, DataConfig, presets), ``flashmoba.training.runtime`` (device, autocast),
``flashmoba.training.loop`` (the loop), ``flashmoba.models.checkpoint`` (checkpoints) and
``flashmoba.cli.train`` (the command). ``python -m flashmoba.train`` and ``torchrun -m flashmoba.train``
still run the train command."""

import sys

from flashmoba.cli.train import build_parser, main, parse_config
from flashmoba.models.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flashmoba.training.config import (
    TRAIN_PRESETS,
    DataConfig,
    TrainConfig,
    config_from_preset,
    validate_config,
)
from flashmoba.training.loop import (
    learning_rate,
    make_optimizer,
    train,
    validation_loss,
    wrap_distributed,
)
from flashmoba.training.runtime import autocast_context, resolve_device

__all__ = [
    "TRAIN_PRESETS",
    "DataConfig",
    "TrainConfig",
    "autocast_context",
    "build_parser",
    "config_from_preset",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "main",
    "make_optimizer",
    "parse_config",
    "resolve_device",
    "save_checkpoint",
    "train",
    "validate_config",
    "validation_loss",
    "wrap_distributed",
]

if __name__ == "__main__":
    sys.exit(main())
