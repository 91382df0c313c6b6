"""The one reader and writer of the checkpoint format of ``flashmoba train``.

A checkpoint is ``<run>/checkpoints/step_XXXXXXX.pt``, a ``torch.save`` of a dict with

- ``step``: the optimizer steps taken;
- ``config``: the run's settings as a plain dict (``dataclasses.asdict`` of its ``TrainConfig``: the model
  shape under ``config["model"]``, the data under ``config["data"]``, ``seq_len`` and the rest at the top);
- ``model`` and ``optimizer``: full (unsharded) state dicts, so that a DDP or FSDP2 run's checkpoint
  loads on one process.

It holds only tensors and plain Python values, so it loads with ``weights_only=True``. Training, the eval
command and the SNR command read checkpoints through this module only.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from flashmoba.models.hybrid import HybridLM, ModelConfig

__all__ = [
    "checkpoint_config",
    "checkpoint_step",
    "find_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(path: Path, model, optimizer, step: int, config, rank: int) -> None:
    """Gather the full (unsharded) model and optimizer state and write it from rank 0.

    ``config`` is the run's ``TrainConfig`` (any dataclass with ``keep_checkpoints``): it is stored as a
    dict, and only the newest ``config.keep_checkpoints`` checkpoints of the directory are kept.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=_state_dict_options(cpu_offload=True)
    )
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        torch.save(
            {"step": step, "config": asdict(config), "model": model_state, "optimizer": optimizer_state},
            temporary,
        )
        os.replace(temporary, path)  # never leave a half-written checkpoint behind
        checkpoints = sorted(path.parent.glob("step_*.pt"))
        for old in checkpoints[: max(0, len(checkpoints) - config.keep_checkpoints)]:
            old.unlink()
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer) -> int:
    """Load a checkpoint written by ``save_checkpoint`` into (possibly wrapped) model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    checkpoint = _read(path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=checkpoint["model"],
        optim_state_dict=checkpoint["optimizer"],
        options=_state_dict_options(),
    )
    return int(checkpoint["step"])


def checkpoint_config(path: Path) -> dict:
    """The run's settings stored in a checkpoint, as the plain dict it was written as."""
    return _read(path)["config"]


def checkpoint_step(path: Path) -> int:
    """The optimizer steps a checkpoint was taken after."""
    return int(_read(path)["step"])


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``checkpoints/step_*.pt`` of the run directory ``out``, or None."""
    checkpoints = sorted((out / "checkpoints").glob("step_*.pt"))
    return checkpoints[-1] if checkpoints else None


def find_checkpoint(path: str) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    candidate = Path(path)
    if candidate.is_dir():
        found = latest_checkpoint(candidate)
        if found is None:
            raise ValueError(f"no checkpoints/step_*.pt under {candidate}")
        return found
    if not candidate.is_file():
        raise ValueError(f"checkpoint {candidate} does not exist")
    return candidate


def load_model(
    checkpoint_path: Path, device: torch.device, backend: str | None = None, topk: int | None = None
):
    """(model in eval mode, the run's config dict) from a ``flashmoba train`` checkpoint.

    ``backend`` and ``topk``, when given, replace the trained MoBA backend and top-k. The dict reads back
    into a typed ``TrainConfig`` with ``flashmoba.training.config.train_config_from_dict``.
    """
    checkpoint = _read(checkpoint_path)
    config = checkpoint["config"]
    model_values = dict(config["model"])
    if backend is not None:
        model_values["backend"] = backend
    if topk is not None:
        model_values["moba_topk"] = topk
    model = HybridLM(ModelConfig(**model_values))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config
