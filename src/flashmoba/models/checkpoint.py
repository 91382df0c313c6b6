"""The one reader and writer of the checkpoint format of ``flashmoba train``.

A checkpoint is ``<run>/checkpoints/step_XXXXXXX.pt``, a ``torch.save`` of a dict with

- ``step``: the optimizer steps taken;
- ``config``: the run's settings as a plain dict (``dataclasses.asdict`` of its ``TrainConfig``: the model
  shape under ``config["model"]``, the data under ``config["data"]``, ``seq_len`` and the rest at the top);
- ``model`` and ``optimizer``: full (unsharded) state dicts, so that a DDP or FSDP2 run's checkpoint
  loads on one process;
- ``history``: the settings changed when the run resumed (see ``flashmoba.training.run_directory``);
  absent in checkpoints written before it existed.

Beside it, ``step_XXXXXXX.pt.sha256`` holds the SHA-256 of the file in ``sha256sum`` format (so that
``sha256sum -c`` checks it too). Every read verifies it before unpickling anything, so flipped or missing
bytes are found at load; a checkpoint without one (written before checksums, or copied without it) still
loads, with an ``UnverifiedCheckpointWarning``. The checksum is a separate file so that writing and
verifying stream the file instead of holding a second copy of a large checkpoint in memory.

It holds only tensors and plain Python values, so it loads with ``weights_only=True``. Training, the eval
command and the SNR command read checkpoints through this module only; every read raises
``CheckpointError`` (a ``ValueError``) naming the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from flashmoba.models.hybrid import HybridLM, ModelConfig

__all__ = [
    "CheckpointError",
    "UnverifiedCheckpointWarning",
    "apply_checkpoint",
    "checkpoint_config",
    "checkpoint_number",
    "checkpoint_step",
    "checksum_path",
    "find_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "model_from_checkpoint",
    "read_checkpoint",
    "remove_checkpoint",
    "save_checkpoint",
    "write_checksum",
]

REQUIRED_KEYS = ("step", "config", "model", "optimizer")
CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")
_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, corrupt, foreign or non-finite."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint without a checksum file: it loads, but flipped bytes would go unnoticed."""


# ----------------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------------


def checksum_path(path: Path) -> Path:
    """``step_XXXXXXX.pt.sha256``: where the checksum of ``path`` lives."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_checksum(path: Path, data_path: Path | None = None) -> str:
    """Write the checksum file of the checkpoint ``path``, computed over ``data_path`` (default: ``path``;
    the writer hashes its temporary file before moving it into place). Returns the hex digest."""
    path = Path(path)
    digest = _sha256_of(Path(data_path or path))
    _write_atomically(checksum_path(path), f"{digest}  {path.name}\n")
    return digest


def _verify_checksum(path: Path) -> None:
    """Compare the file with its checksum file; warn when there is none."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        warnings.warn(
            f"checkpoint {path} has no checksum file {sidecar.name} (written before checkpoints carried "
            "checksums, or copied without it): it cannot be verified",
            UnverifiedCheckpointWarning,
            stacklevel=3,
        )
        return
    fields = sidecar.read_text(encoding="utf-8", errors="replace").split()
    expected = fields[0].lower() if fields else ""
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise CheckpointError(f"checkpoint {path}: its checksum file {sidecar.name} holds no SHA-256 digest")
    actual = _sha256_of(path)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated: its SHA-256 is {actual}, but {sidecar.name} "
            f"records {expected}"
        )


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _non_finite_tensor(values, where: str) -> str | None:
    """The dotted name of the first floating tensor in ``values`` (nested dicts and lists) holding a NaN
    or an infinity, or None."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            return where
        return None
    if isinstance(values, float):
        return None if math.isfinite(values) else where
    items = (
        values.items() if isinstance(values, dict) else enumerate(values) if isinstance(values, list) else ()
    )
    for key, value in items:
        found = _non_finite_tensor(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _check_structure(path: Path, checkpoint) -> None:
    """A dict with the keys ``save_checkpoint`` writes, of the right kinds."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {path} is not a flashmoba train checkpoint: it holds a {type(checkpoint).__name__}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is not a flashmoba train checkpoint: it lacks {missing} "
            f"(it has {sorted(map(str, checkpoint))[:8]})"
        )
    step = checkpoint["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {path}: 'step' must be a non-negative int, got {step!r}")
    config = checkpoint["config"]
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"checkpoint {path}: 'config' must be a dict with a 'model' dict")
    for key in ("model", "optimizer"):
        if not isinstance(checkpoint[key], dict):
            raise CheckpointError(f"checkpoint {path}: {key!r} must be a state dict")


def read_checkpoint(path: Path, *, check_finite: bool = True) -> dict:
    """The verified contents of a checkpoint: checksum (when there is one), readability, the keys of the
    format, and (``check_finite``) that no weight or optimizer state is NaN or infinite, since resuming or
    evaluating such a checkpoint only spreads them. Raises ``CheckpointError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    _verify_checksum(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a bad file through several types; all mean "unreadable"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"checkpoint {path} is not readable (truncated, corrupt or not a torch.save file): {reason}"
        ) from error
    _check_structure(path, checkpoint)
    if check_finite:
        for key in ("model", "optimizer"):
            found = _non_finite_tensor(checkpoint[key], key)
            if found is not None:
                raise CheckpointError(f"checkpoint {path} holds non-finite values (NaN or inf) in {found}")
    return checkpoint


def checkpoint_config(path: Path) -> dict:
    """The run's settings stored in a checkpoint, as the plain dict it was written as."""
    return read_checkpoint(path, check_finite=False)["config"]


def checkpoint_step(path: Path) -> int:
    """The optimizer steps a checkpoint was taken after."""
    return int(read_checkpoint(path, check_finite=False)["step"])


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def checkpoint_number(path: Path) -> int | None:
    """The step in a checkpoint's file name (``step_0000300.pt`` -> 300), or None for another name."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(out: Path) -> list[Path]:
    """The ``checkpoints/step_*.pt`` of the run directory ``out``, oldest first."""
    found = [p for p in (Path(out) / "checkpoints").glob("step_*.pt") if checkpoint_number(p) is not None]
    return sorted(found, key=checkpoint_number)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint and its checksum file."""
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def save_checkpoint(path: Path, model, optimizer, step: int, config, rank: int, history=()) -> None:
    """Gather the full (unsharded) model and optimizer state and write it from rank 0.

    ``config`` is the run's ``TrainConfig`` (any dataclass with ``keep_checkpoints``): it is stored as a
    dict, and of the directory's checkpoints up to ``step`` only the newest ``config.keep_checkpoints``
    are kept (a newer one is never pruned by an older step). ``history`` is the run's list of resumes with
    changed settings. The file and its checksum each appear atomically (temporary file, then rename); the
    checksum goes first, so a crash between the two leaves no unverifiable checkpoint behind.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=_state_dict_options(cpu_offload=True)
    )
    if rank == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "step": step,
            "config": asdict(config),
            "model": model_state,
            "optimizer": optimizer_state,
            "history": list(history),
        }
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        write_checksum(path, data_path=temporary)
        os.replace(temporary, path)
        _prune(path.parent.parent, step, config.keep_checkpoints)
    if dist.is_initialized():
        dist.barrier()


def _prune(out: Path, step: int, keep: int) -> None:
    older = [p for p in list_checkpoints(out) if checkpoint_number(p) <= step]
    for old in older[: max(0, len(older) - keep)]:
        remove_checkpoint(old)


# ----------------------------------------------------------------------------------------------------
# Loading into a model
# ----------------------------------------------------------------------------------------------------


def apply_checkpoint(checkpoint: dict, model, optimizer) -> int:
    """Load the contents of a checkpoint (from ``read_checkpoint``) into a (possibly wrapped) model and
    its optimizer; returns its step."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=checkpoint["model"],
        optim_state_dict=checkpoint["optimizer"],
        options=_state_dict_options(),
    )
    return int(checkpoint["step"])


def load_checkpoint(path: Path, model, optimizer) -> int:
    """Load a checkpoint written by ``save_checkpoint`` into (possibly wrapped) model and optimizer."""
    return apply_checkpoint(read_checkpoint(path), model, optimizer)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``checkpoints/step_*.pt`` of the run directory ``out``, or None."""
    checkpoints = list_checkpoints(out)
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


def model_from_checkpoint(
    checkpoint: dict, device: torch.device, backend: str | None = None, topk: int | None = None
) -> HybridLM:
    """The model of a checkpoint's contents (from ``read_checkpoint``), in eval mode on ``device``.
    ``backend`` and ``topk``, when given, replace the trained MoBA backend and top-k."""
    model_values = dict(checkpoint["config"]["model"])
    if backend is not None:
        model_values["backend"] = backend
    if topk is not None:
        model_values["moba_topk"] = topk
    model = HybridLM(ModelConfig(**model_values))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()


def load_model(
    checkpoint_path: Path, device: torch.device, backend: str | None = None, topk: int | None = None
):
    """(model in eval mode, the run's config dict) from a verified ``flashmoba train`` checkpoint.

    ``backend`` and ``topk``, when given, replace the trained MoBA backend and top-k. The dict reads back
    into a typed ``TrainConfig`` with ``flashmoba.training.config.train_config_from_dict``.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    return model_from_checkpoint(checkpoint, device, backend, topk), checkpoint["config"]
