"""The run directory (``--out``) of ``flashmoba train``: which run a command may write there, what resuming
takes from a checkpoint, and the run's record of changed settings.

Planning (``plan_run``) only reads, on every process, and raises before anything is written; rank 0 then
carries the plan out (``apply_plan``). The rules are ``RUN_DIRECTORY_HELP``, the train command's help.
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flashmoba.models.checkpoint import (
    CheckpointError,
    checkpoint_number,
    checksum_path,
    list_checkpoints,
    read_checkpoint,
)
from flashmoba.training.config import TrainConfig, train_config_from_dict

# Settings a resume may change freely: they decide where and how the same computation runs, how often
# it is logged, evaluated and saved, or how the command behaves, not the trajectory of the weights or the
# meaning of the logged metrics. ``max_steps`` must also exceed the checkpoint's step.
RESUMABLE_SETTINGS = (
    "max_steps",
    "model.backend",
    "model.use_flash_varlen",
    "device",
    "distributed",
    "context_parallel",
    "context_parallel_scheme",
    "activation_checkpointing",
    "compile_blocks",
    "compile_mode",
    "log_every",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "out",
    "resume",
    "progress",
    "overwrite",
    "allow_config_change",
)

RUN_FILES = ("config.json", "metrics.jsonl")

_RESUMABLE_LINES = textwrap.fill(
    ", ".join(RESUMABLE_SETTINGS) + ".", width=102, initial_indent="    ", subsequent_indent="    "
)

RUN_DIRECTORY_HELP = f"""\
the run directory (--out):
  --out holds a run when it has a config.json, a metrics.jsonl or a checkpoints/step_*.pt; other files
  (eval/, logs) are never touched. A fresh run, or a resume from a checkpoint of another directory, is
  refused there unless --overwrite is given, which deletes that run's config.json, metrics.jsonl and
  checkpoints/step_* first and lists them.
  --resume auto continues the run in --out from its newest intact checkpoint; a corrupt or unreadable
  newer one is renamed to *.corrupt and named. Without any checkpoint it starts the run over, if
  config.json holds the same settings. --resume FILE inside --out/checkpoints continues that run;
  checkpoints after FILE's step are refused unless --overwrite. A resume keeps the rows of
  metrics.jsonl up to the resumed step (and drops a partial last line, saying so).
  Resuming with settings other than the checkpoint's is refused with the fields listed, unless
  --allow-config-change is given: the changes are then recorded in config.json's "history". The model
  shape never changes (the MoBA backend may); --max-steps must exceed the checkpoint's step. Free to
  change on resume:
{_RESUMABLE_LINES}
"""


@dataclass
class RunPlan:
    """What ``train`` does with ``out``: the step it starts after, the checkpoint it loads (verified, in
    memory), the files it deletes or sets aside, and what it tells the user."""

    start_step: int = 0
    checkpoint_path: Path | None = None
    checkpoint: dict | None = None
    history: list = field(default_factory=list)
    keep_metrics: bool = False  # keep the rows up to start_step (a resume of the run in out)
    replaced: list[Path] = field(default_factory=list)  # deleted, with --overwrite
    set_aside: list[Path] = field(default_factory=list)  # unusable checkpoints, renamed *.corrupt
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# What a directory holds
# ----------------------------------------------------------------------------------------------------


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run: a config.json, a metrics.jsonl or a checkpoints/step_*.pt."""
    return any((out / name).is_file() for name in RUN_FILES) or bool(list_checkpoints(out))


def run_files(out: Path) -> list[Path]:
    """The files of the run in ``out`` that ``--overwrite`` deletes: config.json, metrics.jsonl and
    everything named checkpoints/step_* (checkpoints, checksums, set-aside and temporary files)."""
    files = [out / name for name in RUN_FILES if (out / name).is_file()]
    return files + sorted(p for p in (out / "checkpoints").glob("step_*") if p.is_file())


def _describe(paths: list[Path], out: Path, limit: int = 6) -> str:
    names = [str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _checkpoint_and_checksum(paths: list[Path]) -> list[Path]:
    return [q for p in paths for q in (p, checksum_path(p)) if q.is_file()]


# ----------------------------------------------------------------------------------------------------
# Settings: differences and the run's config.json
# ----------------------------------------------------------------------------------------------------


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def changed_settings(stored: TrainConfig, current: TrainConfig) -> dict[str, tuple]:
    """Dotted field -> (stored, current) for every setting that differs, but the resumable ones."""
    old, new = _flat(asdict(stored)), _flat(asdict(current))
    return {
        name: (old.get(name), new[name])
        for name in new
        if name not in RESUMABLE_SETTINGS and old.get(name) != new[name]
    }


def _listed(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())


def write_run_config(out: Path, config: TrainConfig, history: list) -> None:
    """``config.json``: the settings, and ``history``, the resumes that changed settings (atomically)."""
    _write_text_atomically(out / "config.json", json.dumps({**asdict(config), "history": history}, indent=2))


def read_run_config(out: Path) -> tuple[dict, list]:
    """(the settings dict, the history list) of ``out/config.json``."""
    values = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise ValueError(f"{out / 'config.json'} must hold a JSON object")
    history = values.pop("history", [])
    return values, history if isinstance(history, list) else []


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text if text.endswith("\n") or not text else text + "\n", encoding="utf-8")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------


def _read_source(path: Path) -> tuple[dict, TrainConfig]:
    """A checkpoint's verified contents and its settings as a TrainConfig (a checkpoint whose settings do
    not read as one is foreign)."""
    checkpoint = read_checkpoint(path)
    try:
        stored = train_config_from_dict(checkpoint["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} holds settings of another program or version: {error}"
        ) from error
    return checkpoint, stored


def _newest_intact(out: Path, notes: list[str]) -> tuple[Path | None, dict | None, TrainConfig | None, list]:
    """``--resume auto``: the newest checkpoint of ``out`` that verifies, its contents and settings, and
    the newer ones that do not (to be set aside). None when there are no checkpoints; an error naming
    each when none verifies."""
    unusable: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(out)):
        try:
            checkpoint, stored = _read_source(path)
        except CheckpointError as error:
            unusable.append((path, str(error)))
            continue
        for bad, reason in unusable:
            notes.append(f"--resume auto: {reason}; it is set aside as {bad.name}.corrupt")
        if unusable:
            notes.append(f"--resume auto: resuming from the newest intact checkpoint, {path.name}")
        return path, checkpoint, stored, [bad for bad, _ in unusable]
    if unusable:
        reasons = "; ".join(reason for _, reason in unusable)
        raise CheckpointError(f"--resume auto: no intact checkpoint in {out / 'checkpoints'}: {reasons}")
    return None, None, None, []


def _refuse_another_run(out: Path, why: str) -> None:
    raise ValueError(
        f"--out {out} holds another run ({_describe(run_files(out), out)}); {why}. Pass --overwrite to "
        "replace it, --resume auto to continue it, or choose another --out"
    )


def _plan_fresh(config: TrainConfig, out: Path, why: str) -> RunPlan:
    """A run from step 0 into ``out``: refused where another run is, unless ``overwrite``."""
    plan = RunPlan()
    if holds_run(out):
        if not config.overwrite:
            _refuse_another_run(out, why)
        plan.replaced = run_files(out)
        plan.notes.append(f"--overwrite: deleting the run in {out}: {_describe(plan.replaced, out)}")
    return plan


def _plan_restart(config: TrainConfig, out: Path) -> RunPlan:
    """``--resume auto`` without any checkpoint: the run in ``out`` starts over from step 0 when its
    config.json holds the same settings (a run stopped before its first checkpoint); otherwise ``out``
    holds another run."""
    if not (out / "config.json").is_file():
        return _plan_fresh(config, out, "it has no config.json and no checkpoint to resume from")
    try:
        values, history = read_run_config(out)
        changes = changed_settings(train_config_from_dict(values), config)
    except (TypeError, ValueError) as error:
        return _plan_fresh(config, out, f"its config.json does not read as a run's settings ({error})")
    if changes:
        return _plan_fresh(config, out, f"it has no checkpoint and other settings: {_listed(changes)}")
    plan = RunPlan(history=history, keep_metrics=True)
    plan.notes.append(f"--resume auto: no checkpoint in {out} yet; the run starts over from step 0")
    return plan


def _plan_resume(
    config: TrainConfig, out: Path, path: Path, checkpoint: dict, stored: TrainConfig, set_aside=()
) -> RunPlan:
    """Continue from ``checkpoint``: its step below max_steps, the same model, other settings the same
    unless ``allow_config_change`` (then recorded), and nothing of another run in ``out`` replaced."""
    step = int(checkpoint["step"])
    if config.max_steps <= step:
        raise ValueError(
            f"--max-steps {config.max_steps} is at or below step {step} of checkpoint {path}: there is "
            "nothing to train; pass a larger --max-steps"
        )
    changes = changed_settings(stored, config)
    model_changes = {name: change for name, change in changes.items() if name.startswith("model.")}
    if model_changes:
        raise ValueError(
            f"checkpoint {path} holds a different model config: {_listed(model_changes)} (a run resumes "
            "only into the model it was trained as; the MoBA backend may change)"
        )
    history = list(checkpoint.get("history", []))
    if changes:
        if not config.allow_config_change:
            raise ValueError(
                f"resuming from {path} with settings that differ from the checkpoint's: {_listed(changes)}. "
                "Pass --allow-config-change to resume with them (recorded in config.json's history), or "
                "give the checkpoint's values"
            )
        entry = {
            "step": step,
            "checkpoint": str(path),
            "changes": {n: [o, v] for n, (o, v) in changes.items()},
        }
        history.append(entry)
    plan = RunPlan(start_step=step, checkpoint_path=path, checkpoint=checkpoint, history=history)
    if changes:
        plan.notes.append(
            f"resuming with changed settings (recorded in config.json's history): {_listed(changes)}"
        )
    same_run = path.resolve().parent == (out / "checkpoints").resolve()
    if same_run:
        plan.keep_metrics = True
        newer = [p for p in list_checkpoints(out) if checkpoint_number(p) > step and p not in set_aside]
        if newer:
            if not config.overwrite:
                raise ValueError(
                    f"--out {out} holds checkpoints after step {step} ({_describe(newer, out)}) that "
                    f"resuming from {path.name} would replace; resume from the newest, or pass --overwrite "
                    "to replace them"
                )
            plan.replaced = _checkpoint_and_checksum(newer)
            plan.notes.append(
                f"--overwrite: deleting the checkpoints after step {step}: {_describe(newer, out)}"
            )
    else:
        fresh = _plan_fresh(config, out, f"resuming {path} (of another directory) would replace it")
        plan.replaced, plan.notes = fresh.replaced, fresh.notes + plan.notes
    return plan


def plan_run(config: TrainConfig, out: Path) -> RunPlan:
    """Decide, reading only, what ``train`` does with ``out``; raises (naming the file, field or step)
    for everything the rules refuse."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if config.resume == "auto":
        notes: list[str] = []
        path, checkpoint, stored, unusable = _newest_intact(out, notes)
        if path is None:
            return _plan_restart(config, out)
        plan = _plan_resume(config, out, path, checkpoint, stored, set_aside=unusable)
        plan.set_aside, plan.notes = unusable, notes + plan.notes
        return plan
    if config.resume:
        path = Path(config.resume)
        checkpoint, stored = _read_source(path)
        return _plan_resume(config, out, path, checkpoint, stored)
    return _plan_fresh(config, out, "a new run would replace it")


# ----------------------------------------------------------------------------------------------------
# Carrying the plan out (rank 0)
# ----------------------------------------------------------------------------------------------------


def trim_metrics(path: Path, last_step: int) -> list[str]:
    """Keep the rows of ``metrics.jsonl`` up to ``last_step`` (what a run logged after its checkpoint is
    trained again) and drop a partial last line (a process killed while writing it); returns what it
    says about them. Any other unreadable line is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    kept, dropped, notes = [], 0, []
    for index, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, KeyError, TypeError) as error:
            if index == len(numbered) - 1:
                notes.append(
                    f"{path}: dropped a partial last line (line {number}; a run killed while writing it)"
                )
                break
            raise ValueError(f"{path}:{number}: not a metrics row ({error}): {line[:80]!r}") from error
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        notes.append(
            f"{path}: dropped {dropped} row(s) logged after step {last_step} (those steps run again)"
        )
    _write_text_atomically(path, "".join(line + "\n" for line in kept))
    return notes


def apply_plan(plan: RunPlan, out: Path, config: TrainConfig) -> list[str]:
    """Set aside unusable checkpoints, delete what ``--overwrite`` replaces, trim or start metrics.jsonl
    and write config.json; returns what to tell the user."""
    for path in plan.set_aside:
        for part in (path, checksum_path(path)):
            if part.is_file():
                os.replace(part, part.with_name(part.name + ".corrupt"))
    for path in plan.replaced:
        path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(plan.notes)
    metrics_path = out / "metrics.jsonl"
    if plan.keep_metrics:
        notes += trim_metrics(metrics_path, plan.start_step)
    else:
        _write_text_atomically(metrics_path, "")
    write_run_config(out, config, plan.history)
    return notes
