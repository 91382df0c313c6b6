"""One command per run of the protocol: train, then evaluate, then record the cost.

    python -m experiments.run --list                       # the runs, in the order to make them
    python -m experiments.run moba-64-seed0 --device cuda --max-minutes 9 --export $OUT
    python -m experiments.run dense-seed0 --device cpu --pilot   # the CPU pipeline check

Run from the repository root; ``python experiments/run.py`` does the same. A run writes under
``experiments/runs/NAME/`` (``experiments/pilot/runs/NAME/`` with ``--pilot``):

- ``train_config.json``: the ``flashmoba train --config`` file made from ``experiments.protocol``;
- what ``flashmoba train`` writes: ``config.json``, ``metrics.jsonl``, ``checkpoints/`` (not committed);
- what ``flashmoba eval`` writes: ``eval/results.json``, ``eval/niah.md``, ``eval/niah.png``;
- ``train.log``, ``eval.log``: the two commands' output;
- ``cost.json``: one entry per call of this command (card, minutes of training and evaluation, steps),
  and the totals (minutes, trained tokens);
- ``earlier_training/<UTC>/``: the outputs of a training that had to start again from step 0 (its
  checkpoints lost with the machine that made them), set aside so that the new training's evaluation is
  made on the new weights.

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

REPO_ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__" and not __package__:
    # Started as a file (``python experiments/run.py``, the command REPORT.md names): the import below
    # needs the ``experiments`` package, which ``python -m`` finds from the repository root.
    if Path.cwd().resolve() != REPO_ROOT:
        sys.exit(f"run this from the repository root ({REPO_ROOT}): python -m experiments.run")
    os.execv(sys.executable, [sys.executable, "-m", "experiments.run", *sys.argv[1:]])

from experiments.protocol import Protocol, Run, protocol_for  # noqa: E402

# The default of --eval-reserve: evaluation starts only with this much of --max-minutes left.
EVAL_RESERVE_MINUTES = 1.0


def run_directory(protocol: Protocol, run: Run) -> Path:
    return REPO_ROOT / protocol.runs_dir / run.name


def checkpoint_path(directory: Path, step: int) -> Path:
    """The file ``flashmoba train`` writes at ``step``."""
    return directory / "checkpoints" / f"step_{step:07d}.pt"


def last_metrics_row(directory: Path) -> dict | None:
    """The last row of the run's ``metrics.jsonl`` (None when there is none)."""
    metrics_path = directory / "metrics.jsonl"
    if not metrics_path.exists():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return rows[-1] if rows else None


def last_logged_step(directory: Path) -> int:
    """The step of the last row of ``metrics.jsonl`` (0 when there is none)."""
    row = last_metrics_row(directory)
    return int(row["step"]) if row else 0


def trained_tokens(directory: Path) -> int:
    row = last_metrics_row(directory)
    return int(row["tokens"]) if row else 0


def evaluation_is_done(directory: Path, final_checkpoint: Path) -> bool:
    results_path = directory / "eval" / "results.json"
    if not results_path.exists():
        return False
    return Path(json.loads(results_path.read_text())["checkpoint"]).name == final_checkpoint.name


def newest_checkpoint_step(directory: Path) -> int:
    """The step of the run's newest checkpoint on this machine (0 when it has none)."""
    steps = [int(path.stem.removeprefix("step_")) for path in (directory / "checkpoints").glob("step_*.pt")]
    return max(steps, default=0)


def outputs_are_complete(protocol: Protocol, directory: Path, final_checkpoint: Path) -> bool:
    """Trained to the last step, evaluated on that checkpoint, and (issue 19) its router SNR measured."""
    if last_logged_step(directory) != protocol.training.max_steps:
        return False
    if not evaluation_is_done(directory, final_checkpoint):
        return False
    return protocol.snr is None or snr_is_done(directory, final_checkpoint)


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
    cost["snr_minutes"] = round(sum(call.get("snr_minutes", 0.0) for call in cost["calls"]), 3)
    cost["total_minutes"] = round(cost["train_minutes"] + cost["eval_minutes"] + cost["snr_minutes"], 3)
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


def minutes_left(started: float, max_minutes: float | None) -> float | None:
    """What is left of ``max_minutes`` since ``started`` (a ``time.perf_counter()``); None without a limit."""
    return None if max_minutes is None else max_minutes - (time.perf_counter() - started) / 60


def train_command(config_path: Path, directory: Path, device: str) -> list[str]:
    return [
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


def eval_command(
    protocol: Protocol, run: Run, final_checkpoint: Path, directory: Path, device: str
) -> list[str]:
    return [
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
    ] + protocol.eval_arguments(run)


def train_step(
    config_path: Path, directory: Path, device: str, final_checkpoint: Path, left: float | None
) -> tuple[str, float]:
    """Train (resuming from the latest checkpoint) within ``left`` minutes: (what happened, minutes)."""
    if final_checkpoint.exists():
        return "skipped (already trained)", 0.0
    start = time.perf_counter()
    training = run_logged(
        train_command(config_path, directory, device),
        directory / "train.log",
        None if left is None else max(0.0, left) * 60,
    )
    return training, round((time.perf_counter() - start) / 60, 3)


def snr_command(protocol: Protocol, final_checkpoint: Path, directory: Path, device: str) -> list[str]:
    """``flashmoba.evaluation.router_snr`` on the final checkpoint, into ``eval/snr.json``."""
    settings = protocol.snr
    return [
        sys.executable,
        "-m",
        "flashmoba.evaluation.router_snr",
        "--checkpoint",
        str(final_checkpoint),
        "--out",
        str(directory / "eval" / "snr.json"),
        "--lengths",
        ",".join(str(n) for n in settings.lengths),
        "--tasks",
        ",".join(settings.tasks),
        "--samples",
        str(settings.samples),
        "--seed",
        str(settings.seed),
        "--device",
        device,
    ]


def snr_is_done(directory: Path, final_checkpoint: Path) -> bool:
    path = directory / "eval" / "snr.json"
    if not path.exists():
        return False
    return Path(json.loads(path.read_text())["checkpoint"]).name == final_checkpoint.name


def snr_step(
    protocol: Protocol, directory: Path, device: str, final_checkpoint: Path, left: float | None
) -> tuple[str, float]:
    """The router SNR measurement (protocols with ``snr``) once training is done: (what happened, minutes)."""
    if protocol.snr is None:
        return "not in this protocol", 0.0
    if not final_checkpoint.exists():
        return "skipped (training not finished)", 0.0
    if snr_is_done(directory, final_checkpoint):
        return "skipped (already measured)", 0.0
    if left is not None and left < 0.25:
        return f"skipped (only {left:.1f} of --max-minutes left)", 0.0
    start = time.perf_counter()
    command = snr_command(protocol, final_checkpoint, directory, device)
    measured = run_logged(command, directory / "snr.log", None if left is None else max(15.0, left * 60))
    return measured, round((time.perf_counter() - start) / 60, 3)


def evaluate_step(
    protocol: Protocol,
    run: Run,
    directory: Path,
    device: str,
    final_checkpoint: Path,
    left: float | None,
    eval_reserve_minutes: float,
) -> tuple[str, float]:
    """Evaluate the final checkpoint unless that is done, training is not, or fewer than
    ``eval_reserve_minutes`` of ``left`` remain: (what happened, minutes)."""
    if not final_checkpoint.exists():
        return "skipped (training not finished)", 0.0
    if evaluation_is_done(directory, final_checkpoint):
        return "skipped (already evaluated)", 0.0
    if left is not None and left < eval_reserve_minutes:
        return f"skipped (only {left:.1f} of --max-minutes left)", 0.0
    start = time.perf_counter()
    command = eval_command(protocol, run, final_checkpoint, directory, device)
    evaluation = run_logged(command, directory / "eval.log", None)
    return evaluation, round((time.perf_counter() - start) / 60, 3)


# What one training of a run produced; a run trained again from scratch sets these aside first.
TRAINING_OUTPUTS = ("metrics.jsonl", "config.json", "train.log", "eval.log", "snr.log", "eval")


def set_aside_earlier_training(directory: Path) -> Path | None:
    """Move the outputs of an earlier training of this run into ``earlier_training/<UTC start>/``.

    Called when training starts from step 0 over existing outputs: the checkpoints of that earlier
    training are gone (a fresh machine), so its evaluation and router SNR belong to another set of
    weights than the training about to start, and must be measured again rather than counted as done.
    Nothing is deleted; the report reads the run's top level only."""
    present = [name for name in TRAINING_OUTPUTS if (directory / name).exists()]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    destination = directory / "earlier_training" / stamp
    destination.mkdir(parents=True)
    for name in present:
        (directory / name).rename(destination / name)
    return destination


def make_run(
    protocol: Protocol,
    run: Run,
    device: str,
    max_minutes: float | None,
    eval_reserve_minutes: float = EVAL_RESERVE_MINUTES,
) -> dict:
    """Train and evaluate ``run`` as far as ``max_minutes`` allows; returns the run's cost record."""
    directory = run_directory(protocol, run)
    final_checkpoint = checkpoint_path(directory, protocol.training.max_steps)
    if not final_checkpoint.exists() and outputs_are_complete(protocol, directory, final_checkpoint):
        # A complete run on a machine without its checkpoints (they never leave the machine that trained
        # it): training again would replace its committed outputs.
        print(
            f"{run.name}: complete (evaluated at step {protocol.training.max_steps}); left as it is",
            flush=True,
        )
        return json.loads((directory / "cost.json").read_text())
    directory.mkdir(parents=True, exist_ok=True)
    if newest_checkpoint_step(directory) == 0:
        earlier = set_aside_earlier_training(directory)
        if earlier is not None:
            print(f"{run.name}: training from scratch; the earlier training's outputs are in {earlier}")
    config_path = directory / "train_config.json"
    config_path.write_text(json.dumps(protocol.train_config(run), indent=2) + "\n")
    started = time.perf_counter()
    entry = {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "python": platform.python_version(),
        "train_minutes": 0.0,
        "eval_minutes": 0.0,
        "steps_before": newest_checkpoint_step(directory),  # where training resumes (0: from scratch)
    }
    training, entry["train_minutes"] = train_step(
        config_path, directory, device, final_checkpoint, minutes_left(started, max_minutes)
    )
    evaluation, entry["eval_minutes"] = evaluate_step(
        protocol,
        run,
        directory,
        device,
        final_checkpoint,
        minutes_left(started, max_minutes),
        eval_reserve_minutes,
    )
    snr, entry["snr_minutes"] = snr_step(
        protocol, directory, device, final_checkpoint, minutes_left(started, max_minutes)
    )

    import torch

    entry.update(
        card=describe_card(device),
        torch=torch.__version__,
        steps_after=last_logged_step(directory),
        training=training,
        evaluation=evaluation,
        snr=snr,
    )
    cost = record_cost(directory, entry)
    done = final_checkpoint.exists() and outputs_are_complete(protocol, directory, final_checkpoint)
    print(
        f"{run.name}: training {training}, evaluation {evaluation}, router SNR {snr}; "
        f"step {cost['trained_steps']} of "
        f"{protocol.training.max_steps}, {cost['total_minutes']:.1f} minutes in all"
        + ("" if done else "; not complete: run the same command again"),
        flush=True,
    )
    return cost


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Protocol: experiments/protocol.py. Report: python -m experiments.report.",
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
    parser.add_argument(
        "--design",
        choices=["issue6", "issue19"],
        default="issue6",
        help="which protocol of experiments/protocol.py (default: %(default)s; issue19: PROTOCOL_19)",
    )
    parser.add_argument("--export", help="also write the outputs, without checkpoints, to EXPORT/NAME.tar.gz")
    return parser


def print_run_list(protocol: Protocol) -> None:
    """The budget, then one line per run in the order to make them: name, attention, directory."""
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
        shape += " RoPE" if configuration.global_rope else ""
        print(f"{run.name:<22} {shape:<22} -> {protocol.runs_dir}/{run.name}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    protocol = protocol_for(args.pilot, args.design)
    if args.list:
        print_run_list(protocol)
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
