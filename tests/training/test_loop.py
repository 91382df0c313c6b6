"""flashmoba train / eval on CPU: the tiny preset learns, resume is exact, the schedule, torchrun with 2
processes works (through the old ``-m flashmoba.train`` entry)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from flashmoba.cli import eval as eval_command
from flashmoba.cli import train as train_command
from flashmoba.cli.train import parse_config
from flashmoba.models.checkpoint import load_model
from flashmoba.training.loop import learning_rate
from tests.training.helpers import read_metrics, tiny_run_args


def test_tiny_preset_trains_offline_on_cpu_and_eval_reads_it(tmp_path):
    """The acceptance command, then flashmoba eval on its checkpoint."""
    run = tmp_path / "run"
    assert (
        train_command.main(
            ["--preset", "tiny", "--max-steps", "30", "--device", "cpu", "--out", str(run), "--no-progress"]
        )
        == 0
    )
    metrics = read_metrics(run)
    assert [row["step"] for row in metrics] == list(range(1, 31))
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(metrics[0])
    first = metrics[0]["loss"]
    last = sum(row["loss"] for row in metrics[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert "val_loss" in metrics[-1]
    assert (run / "checkpoints" / "step_0000030.pt").is_file()

    out = tmp_path / "eval"
    assert (
        eval_command.main(
            [
                "--checkpoint",
                str(run),
                "--device",
                "cpu",
                "--lengths",
                "512",
                "--samples",
                "2",
                "--tasks",
                "niah1,passkey",
                "--ppl-batches",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["heldout"]["perplexity"] > 1
    assert [(r["task"], r["length"]) for r in results["retrieval"]] == [("niah1", 512), ("passkey", 512)]
    for r in results["retrieval"]:
        assert 0 <= r["accuracy"] <= 1
        assert set(r["router_recall"]) == {"1", "3"}  # the MoBA layers of the tiny model
    assert (out / "niah.png").stat().st_size > 0 and "S-NIAH-1" in (out / "niah.md").read_text()


def test_resume_from_checkpoint_reproduces_the_next_steps(tmp_path, corpus):
    full = tmp_path / "full"
    train_command.main(tiny_run_args(full, corpus, "--max-steps", "5", "--save-every", "3", "--kconv", "3"))
    resumed = tmp_path / "resumed"
    train_command.main(
        tiny_run_args(
            resumed,
            corpus,
            "--max-steps",
            "5",
            "--kconv",
            "3",
            "--resume",
            str(full / "checkpoints" / "step_0000003.pt"),
        )
    )
    expected = {row["step"]: row for row in read_metrics(full)}
    got = read_metrics(resumed)
    assert [row["step"] for row in got] == [4, 5]
    for row in got:
        assert row["loss"] == pytest.approx(expected[row["step"]]["loss"], rel=1e-6, abs=1e-6)
        assert row["lr"] == expected[row["step"]]["lr"]
    # --resume auto in the same directory continues from the latest checkpoint.
    train_command.main(tiny_run_args(full, corpus, "--max-steps", "6", "--kconv", "3", "--resume", "auto"))
    assert [row["step"] for row in read_metrics(full)] == [1, 2, 3, 4, 5, 6]


def test_learning_rate_schedule():
    config = parse_config(["--max-steps", "1000", "--warmup-steps", "10"])
    assert learning_rate(config, 5) == pytest.approx(3e-4)
    assert learning_rate(config, 10) == pytest.approx(6e-4)
    assert learning_rate(config, 1000) == pytest.approx(6e-5)
    values = [learning_rate(config, step) for step in range(10, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_processes_on_cpu(tmp_path, corpus, strategy):
    run = tmp_path / strategy
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "flashmoba.train",
        *tiny_run_args(
            run, corpus, "--max-steps", "3", "--distributed", strategy, "--activation-checkpointing"
        ),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(run)
    assert [row["step"] for row in metrics] == [1, 2, 3]
    assert metrics[0]["tokens"] == 2 * 2 * 128  # two processes, each 2 rows of 128 tokens
    assert (run / "checkpoints" / "step_0000003.pt").is_file()
    # The checkpoint of a sharded run is a plain full state dict that eval loads on one process.
    model, _ = load_model(run / "checkpoints" / "step_0000003.pt", device=torch.device("cpu"))
    assert model.num_parameters() > 0
