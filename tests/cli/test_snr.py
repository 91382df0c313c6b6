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
    with pytest.raises(SystemExit) as raised:  # too short for the task's text: a flag error, not a traceback
        cli_main(["snr", "measure", "--checkpoint", str(run), "--length", "8", "--samples", "1"])
    assert raised.value.code == 2 and "argument --length: length 8 is too short" in capsys.readouterr().err


def _refuse(*_args, **_kwargs):
    raise AssertionError("a bad flag must fail before any computation")


@pytest.mark.parametrize(
    "argv, message",
    [
        # simulate (also without the subcommand's name)
        (["--mu-signal", "inf"], "argument --mu-signal: must be finite, got inf"),
        (["simulate", "--mu-signal", "1.5"], "argument --mu-signal: must lie in [-1, 1] with --law sphere"),
        (["--mu-cluster", "nan"], "argument --mu-cluster: must be finite, got nan"),
        (["--mu-noise", "zero"], "argument --mu-noise: expected a number, got 'zero'"),
        (["--law", "cauchy"], "argument --law: invalid choice: 'cauchy'"),
        (["--head-dims", "32,0"], "argument --head-dims: must be >= 1, got 0"),
        (["--head-dims", "2"], "argument --head-dims: must be >= 3 with --law sphere, got 2"),
        (["--block-sizes", "0"], "argument --block-sizes: must be >= 1, got 0"),
        (["--block-sizes", ","], "argument --block-sizes: expected comma-separated ints, got ','"),
        (["--ms", "0"], "argument --ms: must be >= 1, got 0"),
        (["--ms", "32"], "argument --ms: must be <= the smallest of --block-sizes (16), got 32"),
        (["--trials", "0"], "argument --trials: must be >= 1, got 0"),
        (["--min-trials", "0"], "argument --min-trials: must be >= 1, got 0"),
        (["--retrieval-trials", "-1"], "argument --retrieval-trials: must be >= 1, got -1"),
        (["--seq-len", "0"], "argument --seq-len: must be >= 1, got 0"),
        (["--seq-len", "1000"], "argument --seq-len: must hold two blocks of the largest of --block-sizes"),
        (["--density", "0"], "argument --density: must be > 0.0, got 0.0"),
        (["--density", "1.5"], "argument --density: must be <= 1.0, got 1.5"),
        (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["--out", "{tmp}"], "argument --out: must be a file path, got the directory"),
        (["--out", "{tmp}/missing/snr.png"], "argument --out: its directory"),
        (["--out", "{tmp}/snr.nope"], "argument --out: must end in an image format"),
        # measure
        (["measure"], "give one of FILE, --synthetic or --checkpoint"),
        (["measure", "{tmp}/missing.pt"], "argument file: no such file"),
        (["measure", "--checkpoint", "{tmp}/missing"], "argument --checkpoint: checkpoint"),
        (["measure", "--checkpoint", "{tmp}"], "argument --checkpoint: no checkpoints"),
        (["measure", "--checkpoint", "{tmp}", "--task", "niah9"], "argument --task: invalid choice: 'niah9'"),
        (["measure", "--synthetic", "--length", "0"], "argument --length: must be >= 1, got 0"),
        (["measure", "--synthetic", "--samples", "0"], "argument --samples: must be >= 1, got 0"),
        (["measure", "--synthetic", "--device", "cuda:99"], "argument --device:"),
        (["measure", "--synthetic", "--device", "abacus"], "argument --device: not a torch device"),
        (["measure", "--synthetic", "--block-size", "0"], "argument --block-size: must be >= 1, got 0"),
        (["measure", "--synthetic", "--topk", "0"], "argument --topk: must be >= 1, got 0"),
        (["measure", "--synthetic", "--needle", "3,-1"], "argument --needle: must be >= 0, got -1"),
        (
            ["measure", "--synthetic", "--needle", "4096"],
            "argument --needle: must be < 2048 (with --synthetic)",
        ),
        (["measure", "--synthetic", "--queries", "x"], "argument --queries: expected an int, got 'x'"),
        (["measure", "{tmp}/qk.pt", "--needle", "1", "--queries", "64"], "argument --queries: must be < 64"),
        (["measure", "--synthetic", "--signal", "-1"], "argument --signal: must be >= 0, got -1"),
        (["measure", "--synthetic", "--signal", "2048"], "argument --signal: must be < 2048"),
        (["measure", "--synthetic", "--cosine", "1.5"], "argument --cosine: must be <= 1.0, got 1.5"),
        (["measure", "--synthetic", "--cosine=-inf"], "argument --cosine: must be finite, got -inf"),
        (["measure", "--synthetic", "--seed", "-3"], "argument --seed: must be >= 0, got -3"),
    ],
)
def test_bad_flags_fail_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    from flashmoba.cli import main

    for name in ("simulate_router", "planted_needle_qk", "measure_router_snr", "capture_qk"):
        monkeypatch.setattr(model, name, _refuse)
    torch.save({"q": torch.zeros(64, 1, 4), "k": torch.zeros(64, 1, 4)}, tmp_path / "qk.pt")
    with pytest.raises(SystemExit) as raised:
        main(["snr", *(item.replace("{tmp}", str(tmp_path)) for item in argv)])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_simulate_survives_a_prediction_that_underflows(tmp_path):
    """At an SNR near 90, Phi(-SNR) is 0 in float64: the tables and the plot must not divide by it."""
    plot = tmp_path / "snr.png"
    flags = "--law gaussian --mu-signal 1 --mu-noise -1 --mu-cluster 0 --head-dims 4096 --block-sizes 1"
    flags += " --ms 1 --seq-len 4 --trials 100 --min-trials 100 --retrieval-trials 10"
    code, text = _run_cli([*flags.split(), "--out", str(plot)])
    assert code == 0 and plot.exists()
    assert "underflows to 0" in text
