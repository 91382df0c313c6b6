"""The flashmoba snr command (flashmoba.cli.snr): simulate; measure on a file, synthetic q/k, a checkpoint."""

import contextlib
import io
import time

import pytest
import torch

from flashmoba import snr as model
from flashmoba.cli import snr as snr_cli


def _run_cli(argv):
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = snr_cli.main(argv)
    return code, output.getvalue()


def test_cli_simulate_runs_in_seconds(tmp_path):
    plot = tmp_path / "snr.png"
    started = time.perf_counter()
    code, text = _run_cli(
        [
            "--out",
            str(plot),
            "--trials",
            "2000",
            "--min-trials",
            "300",
            "--retrieval-trials",
            "100",
            "--seed",
            "1",
        ]
    )
    elapsed = time.perf_counter() - started
    assert code == 0
    assert elapsed < 30
    assert plot.stat().st_size > 10_000
    for expected in (
        "1. Pairwise failure",
        "cells agree with Phi(-SNR)",
        "2. Where the Gaussian approximation breaks",
        "Verdict",
        "3. Top-k retrieval",
        "4. Assumption 3 broken",
        f"plot written to {plot}",
    ):
        assert expected in text
    # the table covers head_dim x block_size x m
    rows = [
        line.split()
        for line in text.splitlines()
        if line.strip() and line.split()[0] in ("32", "64", "128", "256")
    ]
    cells = {(row[0], row[1], row[2]) for row in rows if len(row) >= 12}
    assert len(cells) == 4 * 6 * 4


def test_cli_measure_synthetic_and_file(tmp_path):
    code, text = _run_cli(["measure", "--synthetic", "--block-size", "16", "--topk", "3"])
    assert code == 0 and "recall predicted" in text
    q, k = model.planted_needle_qk(
        2, 256, 2, 16, needle_positions=[40, 41], query_positions=[250, 255], cosine=0.6
    )
    path = tmp_path / "qk.pt"
    torch.save(
        {
            "layer1": (q, k),
            "needle_positions": [40, 41],
            "query_positions": [250, 255],
            "block_size": 16,
            "topk": 3,
        },
        path,
    )
    code, text = _run_cli(["measure", str(path)])
    assert code == 0 and "layer layer1: block_size 16, topk 3" in text
    torch.save({"q": q, "k": k}, path)
    code, text = _run_cli(
        ["measure", str(path), "--needle", "40,41", "--queries", "250,255", "--block-size", "32"]
    )
    assert code == 0 and "block_size 32" in text
    with pytest.raises(SystemExit):
        _run_cli(["measure", str(path), "--block-size", "32"])  # no needle / query positions anywhere


def test_measure_on_a_training_checkpoint(tmp_path, capsys):
    """`flashmoba snr measure --checkpoint` reads a `flashmoba train` checkpoint and measures each MoBA
    layer."""
    from flashmoba.cli import main as cli_main

    run = tmp_path / "run"
    assert (
        cli_main(
            [
                "train",
                "--preset",
                "tiny",
                "--max-steps",
                "1",
                "--device",
                "cpu",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli_main(["snr", "measure", "--checkpoint", str(run), "--length", "512", "--samples", "2"]) == 0
    output = capsys.readouterr().out
    assert output.count("recall predicted") == 2  # the tiny preset has two MoBA layers
    assert "block_size 32, topk 4" in output
