"""One command per run of the protocol: train, then evaluate, then record the cost.

    python experiments/run.py --list                       # the runs, in the order to make them
    python experiments/run.py moba-64-seed0 --device cuda --max-minutes 9 --export $OUT
    python experiments/run.py dense-seed0 --device cpu --pilot   # the CPU pipeline check

A run writes under ``experiments/runs/NAME/`` (``experiments/pilot/runs/NAME/`` with ``--pilot``):

- ``train_config.json``: the ``flashmoba train --config`` file made from ``protocol.py``;
- what ``flashmoba train`` writes: ``config.json``, ``metrics.jsonl``, ``checkpoints/`` (not committed);
- what ``flashmoba eval`` writes: ``eval/results.json``, ``eval/niah.md``, ``eval/niah.png``;
- ``train.log``, ``eval.log``: the two commands' output;
- ``cost.json``: one entry per call of this script (card, minutes of training and evaluation, steps),
  and the totals (minutes, trained tokens).

Calling it again resumes: training continues from the latest checkpoint (``--resume auto``) and is
skipped once the last step's checkpoint exists; evaluation is skipped once ``eval/results.json`` belongs
to that checkpoint. ``--max-minutes`` stops training (at its last checkpoint) so that the call ends in
time, and starts the evaluation only when ``--eval-reserve`` minutes are left. ``--export DIR`` packs the
run's outputs without checkpoints into ``DIR/NAME.tar.gz`` (unpack with
``tar -xzf NAME.tar.gz -C experiments/runs``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS_DIR.parent
sys.path.insert(0, str(EXPERIMENTS_DIR))

from protocol import Protocol, Run, protocol_for

EVAL_RESERVE_MINUTES = (
    1.0  # default of --eval-reserve: evaluation starts only with this much of --max-minutes left
)


def run_directory(protocol: Protocol, run: Run) -> Path:
    return REPO_ROOT / protocol.runs_dir / run.name


def checkpoint_path(directory: Path, step: int) -> Path:
    """The file ``flashmoba train`` writes at ``step``."""
    return directory / "checkpoints" / f"step_{step:07d}.pt"


def last_logged_step(directory: Path) -> int:
    """The step of the last row of ``metrics.jsonl`` (0 when there is none)."""
    metrics_path = directory / "metrics.jsonl"
    if not metrics_path.exists():
        return 0
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return int(rows[-1]["step"]) if rows else 0


def trained_tokens(directory: Path) -> int:
    metrics_path = directory / "metrics.jsonl"
    if not metrics_path.exists():
        return 0
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return int(rows[-1]["tokens"]) if rows else 0


def evaluation_is_done(directory: Path, final_checkpoint: Path) -> bool:
    results_path = directory / "eval" / "results.json"
    if not results_path.exists():
        return False
    return Path(json.loads(results_path.read_text())["checkpoint"]).name == final_checkpoint.name


def run_logged(command: list[str], log_path: Path, timeout_s: float | None) -> str:
    """Run ``command`` with its output appended to ``log_path``; 'finished', or 'stopped' at the timeout."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT / "src")] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else [])
    )
    environment["PYTHONUNBUFFERED"] = "1"
    print("$ " + " ".join(command), flush=True)
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=environment
        )
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.terminate()  # our own child; it loses at most the steps since its last checkpoint
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return "stopped"
    if returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"command failed with exit status {returncode}: {' '.join(command)}\n{tail}")
    return "finished"


def describe_card(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def record_cost(directory: Path, entry: dict) -> dict:
    """Append this call's ``entry`` to ``cost.json`` and refresh the totals."""
    cost_path = directory / "cost.json"
    cost = json.loads(cost_path.read_text()) if cost_path.exists() else {"run": directory.name, "calls": []}
    cost["calls"].append(entry)
    cost["cards"] = sorted({call["card"] for call in cost["calls"]})
    cost["train_minutes"] = round(sum(call["train_minutes"] for call in cost["calls"]), 3)
    cost["eval_minutes"] = round(sum(call["eval_minutes"] for call in cost["calls"]), 3)
    cost["total_minutes"] = round(cost["train_minutes"] + cost["eval_minutes"], 3)
    cost["trained_tokens"] = trained_tokens(directory)
    cost["trained_steps"] = last_logged_step(directory)
    cost_path.write_text(json.dumps(cost, indent=2) + "\n")
    return cost


def export_outputs(directory: Path, export_dir: Path) -> Path:
    """``export_dir/NAME.tar.gz`` with the run's outputs, checkpoints left out."""
    export_dir.mkdir(parents=True, exist_ok=True)
    archive = export_dir / f"{directory.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(
            directory,
            arcname=directory.name,
            filter=lambda info: None if "/checkpoints" in info.name else info,
        )
    return archive


def make_run(
    protocol: Protocol,
    run: Run,
    device: str,
    max_minutes: float | None,
    eval_reserve_minutes: float = EVAL_RESERVE_MINUTES,
) -> dict:
    """Train and evaluate ``run`` as far as ``max_minutes`` allows; returns the run's cost record."""
    directory = run_directory(protocol, run)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "train_config.json"
    config_path.write_text(json.dumps(protocol.train_config(run), indent=2) + "\n")
    final_checkpoint = checkpoint_path(directory, protocol.training.max_steps)
    started = time.perf_counter()
    entry = {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "python": platform.python_version(),
        "train_minutes": 0.0,
        "eval_minutes": 0.0,
        "steps_before": last_logged_step(directory),
    }

    def minutes_left() -> float | None:
        return None if max_minutes is None else max_minutes - (time.perf_counter() - started) / 60

    training = "skipped (already trained)"
    if not final_checkpoint.exists():
        train_command = [
            sys.executable,
            "-m",
            "flashmoba",
            "train",
            "--config",
            str(config_path),
            "--out",
            str(directory),
            "--resume",
            "auto",
            "--device",
            device,
            "--no-progress",
        ]
        left = minutes_left()
        train_start = time.perf_counter()
        training = run_logged(
            train_command, directory / "train.log", None if left is None else max(0.0, left) * 60
        )
        entry["train_minutes"] = round((time.perf_counter() - train_start) / 60, 3)

    evaluation = "skipped (training not finished)"
    if final_checkpoint.exists():
        left = minutes_left()
        if evaluation_is_done(directory, final_checkpoint):
            evaluation = "skipped (already evaluated)"
        elif left is not None and left < eval_reserve_minutes:
            evaluation = f"skipped (only {left:.1f} of --max-minutes left)"
        else:
            eval_command = [
                sys.executable,
                "-m",
                "flashmoba",
                "eval",
                "--checkpoint",
                str(final_checkpoint),
                "--device",
                device,
                "--out",
                str(directory / "eval"),
                "--no-progress",
            ]
            eval_start = time.perf_counter()
            evaluation = run_logged(eval_command + protocol.eval_arguments(run), directory / "eval.log", None)
            entry["eval_minutes"] = round((time.perf_counter() - eval_start) / 60, 3)

    import torch

    entry.update(
        card=describe_card(device),
        torch=torch.__version__,
        steps_after=last_logged_step(directory),
        training=training,
        evaluation=evaluation,
    )
    cost = record_cost(directory, entry)
    done = final_checkpoint.exists() and evaluation_is_done(directory, final_checkpoint)
    print(
        f"{run.name}: training {training}, evaluation {evaluation}; step {cost['trained_steps']} of "
        f"{protocol.training.max_steps}, {cost['total_minutes']:.1f} minutes in all"
        + ("" if done else "; not complete: run the same command again"),
        flush=True,
    )
    return cost


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Protocol: experiments/protocol.py. Report: experiments/report.py.",
    )
    parser.add_argument("name", nargs="?", help="the run to make (see --list)")
    parser.add_argument("--list", action="store_true", help="list the runs in the order to make them")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--pilot",
        action="store_true",
        help="the shrunk CPU pipeline check (tiny model, a few steps), under experiments/pilot/",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="stop training in time to end the call within this many minutes (resume later)",
    )
    parser.add_argument(
        "--eval-reserve",
        type=float,
        default=EVAL_RESERVE_MINUTES,
        help="start the evaluation only when this many of --max-minutes are left (default: %(default)s)",
    )
    parser.add_argument("--export", help="also write the outputs, without checkpoints, to EXPORT/NAME.tar.gz")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    protocol = protocol_for(args.pilot)
    if args.list:
        settings = protocol.training
        print(
            f"{protocol.title}: {len(protocol.runs)} runs, each {settings.max_steps} steps x "
            f"{settings.tokens_per_step:,} tokens = {settings.token_budget:,} tokens"
        )
        for run in protocol.runs:
            configuration = run.configuration
            shape = (
                f"B={configuration.block_size} k={configuration.topk}"
                if configuration.attention == "moba"
                else "dense"
            ) + (f" kconv{configuration.kconv}" if configuration.kconv else "")
            print(f"{run.name:<22} {shape:<22} -> {protocol.runs_dir}/{run.name}")
        return 0
    if not args.name:
        build_parser().error("give a run name or --list")
    run = protocol.run(args.name)
    make_run(protocol, run, args.device, args.max_minutes, args.eval_reserve)
    if args.export:
        print(f"exported {export_outputs(run_directory(protocol, run), Path(args.export))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
