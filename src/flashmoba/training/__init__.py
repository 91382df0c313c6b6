"""Training the hybrid LM: ``config`` (TrainConfig, DataConfig, presets, precedence, validation),
``runtime`` (device and the autocast policy), ``run_directory`` (which run ``--out`` may hold, what a
resume may change, the config history) and ``loop`` (schedule, optimizer, distributed wrap, validation
loss, ``train``). The ``flashmoba train`` command is ``flashmoba.cli.train``."""

from flashmoba.training.config import (
    TRAIN_PRESETS,
    DataConfig,
    TrainConfig,
    config_from_preset,
    resolve_config,
    train_config_from_dict,
    validate_config,
)
from flashmoba.training.loop import learning_rate, make_optimizer, train, validation_loss, wrap_distributed
from flashmoba.training.runtime import autocast, resolve_device

__all__ = [
    "TRAIN_PRESETS",
    "DataConfig",
    "TrainConfig",
    "autocast",
    "config_from_preset",
    "learning_rate",
    "make_optimizer",
    "resolve_config",
    "resolve_device",
    "train",
    "train_config_from_dict",
    "validate_config",
    "validation_loss",
    "wrap_distributed",
]
