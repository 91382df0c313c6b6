"""experiments/run.py: ``--list``, a stopped command, the export, one real tiny run through flashmoba train
and eval that the report then reads, and the file form of the commands."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from experiments import report
from experiments import run as run_module
from experiments.protocol import PILOT_PROTOCOL, PROTOCOL, EvaluationSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_list(*command: str) -> str:
    return subprocess.run(
        [sys.executable, *command, "--list"], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout


def test_run_list_names_every_run():
    listing = run_list("-m", "experiments.run")
    for run in PROTOCOL.runs:
        assert f"\n{run.name} " in listing
    assert f"{len(PROTOCOL.runs)} runs" in listing and f"{PROTOCOL.training.max_steps} steps" in listing
    first = [line.split()[0] for line in listing.splitlines()[1:]]
    assert first[:6] == [
        f"{c.name}-seed0" for c in (PROTOCOL.configuration(n) for n in PROTOCOL.seeds_by_configuration)
    ]


def test_stopped_training_is_reported_and_export_leaves_out_checkpoints(tmp_path):
    log = tmp_path / "sleep.log"
    assert run_module.run_logged([sys.executable, "-c", "import time; time.sleep(30)"], log, 0.5) == "stopped"
    directory = tmp_path / "some-run"
    (directory / "checkpoints").mkdir(parents=True)
    (directory / "checkpoints" / "step_0000001.pt").write_bytes(b"x")
    (directory / "metrics.jsonl").write_text("{}\n")
    import tarfile

    with tarfile.open(run_module.export_outputs(directory, tmp_path / "out")) as archive:
        assert archive.getnames() == ["some-run", "some-run/metrics.jsonl"]


def test_a_tiny_real_run_goes_through_train_eval_and_report(tmp_path):
    """run.py with flashmoba train and eval for real (2 steps, one length): the report reads their files."""
    tiny = replace(
        PILOT_PROTOCOL,
        training=replace(PILOT_PROTOCOL.training, max_steps=2, batch_size=1, eval_every=2, save_every=2),
        evaluation=EvaluationSettings(lengths=(512,), tasks=("niah1",), samples=1, ppl_batches=1),
        seeds_by_configuration={"moba-32": (0,)},
        runs_dir=str(tmp_path / "runs"),
    )
    run = tiny.run("moba-32-seed0")
    cost = run_module.make_run(tiny, run, "cpu", max_minutes=None)
    assert cost["trained_steps"] == 2 and cost["trained_tokens"] == 2 * 512 and len(cost["calls"]) == 1
    again = run_module.make_run(tiny, run, "cpu", max_minutes=None)  # resumes: nothing left to do
    assert again["calls"][-1]["training"].startswith("skipped") and again["calls"][-1][
        "evaluation"
    ].startswith("skipped")

    outputs = report.load_runs(tiny, tmp_path / "runs")
    assert outputs["moba-32-seed0"].complete
    results = outputs["moba-32-seed0"].results
    assert report.heldout_loss(results) > 0 and report.accuracy(results, "niah1", 512) in (0.0, 100.0)
    assert report.router_recall(results, 512) is not None
    text = report.build_report(tiny, tmp_path / "runs", tmp_path / "REPORT.md", tmp_path / "figures")
    assert "1 of 1 runs complete" in text and "CPU pipeline check" in text


def test_the_commands_also_start_as_files_from_the_repository_root():
    """``python experiments/run.py`` and ``python experiments/report.py``, as REPORT.md names them."""
    assert run_list("experiments/run.py") == run_list("-m", "experiments.run")
    help_text = subprocess.run(
        [sys.executable, "experiments/report.py", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    ).stdout
    assert "--pilot" in help_text
