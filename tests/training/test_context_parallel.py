"""flashmoba train --context-parallel under torchrun on CPU (gloo): the loss of each step equals the run
without context parallelism on the same batches (one process, or data parallel only), and the settings
that have no context-parallel path are refused before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashmoba.cli import train as train_command
from flashmoba.models.checkpoint import load_model
from tests.training.helpers import read_metrics, tiny_run_args

STEPS = 3


def run_args(out: Path, corpus: str, *extra: str) -> list[str]:
    # tiny: window 64, MoBA blocks of 32; rows of 128 cut in 2 slices of 64 (2 blocks, halo 63).
    return tiny_run_args(out, corpus, "--max-steps", str(STEPS), "--no-pack-documents", *extra)


def torchrun(processes: int, args: list[str]) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "flashmoba.train",
        *args,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_same_run(actual: list[dict], expected: list[dict]) -> None:
    assert [row["step"] for row in actual] == [row["step"] for row in expected] == list(range(1, STEPS + 1))
    for got, want in zip(actual, expected):
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
        assert got["lr"] == want["lr"] and got["tokens"] == want["tokens"]
    assert actual[-1]["val_loss"] == pytest.approx(expected[-1]["val_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, corpus) -> list[dict]:
    out = tmp_path_factory.mktemp("single") / "run"
    assert train_command.main(run_args(out, corpus)) == 0
    return read_metrics(out)


@pytest.mark.parametrize(
    "extra",
    [
        ("--distributed", "fsdp", "--activation-checkpointing"),
        ("--distributed", "ddp", "--context-parallel-scheme", "allgather"),
    ],
    ids=["fsdp-selective", "ddp-allgather"],
)
def test_context_parallel_2_matches_one_process(tmp_path, corpus, single_process_run, extra):
    out = tmp_path / "cp2"
    torchrun(2, run_args(out, corpus, "--context-parallel", "2", *extra))
    assert_same_run(read_metrics(out), single_process_run)
    # The checkpoint is a plain full state dict that one process loads.
    model, _ = load_model(out / "checkpoints" / f"step_{STEPS:07d}.pt", device=torch.device("cpu"))
    assert model.num_parameters() > 0


@pytest.mark.slow
def test_data_and_context_parallel_mesh_matches_data_parallel(tmp_path, corpus):
    """dp 2 x cp 2 on a 2-D mesh (FSDP2 as HSDP) against dp 2 alone: the same two batches per step."""
    data_parallel = tmp_path / "dp2"
    torchrun(2, run_args(data_parallel, corpus, "--distributed", "fsdp"))
    mesh = tmp_path / "dp2cp2"
    torchrun(4, run_args(mesh, corpus, "--distributed", "fsdp", "--context-parallel", "2"))
    assert_same_run(read_metrics(mesh), read_metrics(data_parallel))


@pytest.mark.slow
def test_a_context_parallel_checkpoint_resumes_exactly_in_one_process(tmp_path, corpus):
    """Batches depend only on (seed, data rank, step) and the checkpoint is a full state dict, so a
    context-parallel run resumed without context parallelism continues it (context_parallel is a
    setting a resume may change)."""
    full = tmp_path / "full"
    torchrun(
        2,
        [
            *run_args(full, corpus, "--context-parallel", "2", "--distributed", "fsdp"),
            "--max-steps",
            "5",
            "--save-every",
            "3",
        ],
    )
    resumed = tmp_path / "resumed"
    checkpoint = full / "checkpoints" / "step_0000003.pt"
    assert (
        train_command.main([*run_args(resumed, corpus), "--max-steps", "5", "--resume", str(checkpoint)]) == 0
    )
    expected = {row["step"]: row for row in read_metrics(full)}
    got = read_metrics(resumed)
    assert [row["step"] for row in got] == [4, 5]
    for row in got:
        assert row["loss"] == pytest.approx(expected[row["step"]]["loss"], rel=1e-5)
        assert row["lr"] == expected[row["step"]]["lr"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--context-parallel", "2", "--pack-documents"), "needs pack_documents off"),
        (("--context-parallel", "2", "--kconv", "3"), "model.kconv_size 0"),
        (("--context-parallel", "2", "--model.global-attention", "dense"), "global_attention 'moba'"),
        (("--context-parallel", "3"), "seq_len must be a multiple of context_parallel"),
        (("--context-parallel", "4", "--seq-len", "256", "--model.window-size", "80"), "halo"),
        (("--context-parallel", "0"), "context_parallel must be >= 1"),
        (("--context-parallel", "2"), "must divide the number of processes"),  # one process
    ],
)
def test_settings_without_a_context_parallel_path_are_refused(tmp_path, corpus, flags, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train_command.main(run_args(out, corpus, *flags))
    assert not (out / "metrics.jsonl").exists() and not (out / "config.json").exists()
