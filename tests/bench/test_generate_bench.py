"""flashmoba bench generate on the CPU: rows of both attentions, the table, and no overwrite."""

import json

import pytest

from flashmoba.bench.generate import ROW_FIELDS, measure_generate
from flashmoba.cli import bench as bench_command


def test_measure_generate_row_on_cpu():
    row = measure_generate("tiny", 70, "moba", block_size=16, topk=2, new_tokens=4, device="cpu")
    assert tuple(row) == ROW_FIELDS
    assert row["card"] == "cpu" and (row["block_size"], row["topk"]) == (16, 2) and row["peak_gib"] is None
    assert row["prefill_tokens_per_s"] == pytest.approx(70 / row["prefill_s"])
    # 4 new tokens: the first comes with the prefill, 3 decode steps
    assert row["decode_tokens_per_s"] == pytest.approx(1e3 / row["decode_ms_per_step"])


def test_bench_generate_writes_rows_prints_the_table_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "generate.json"
    argv = ["generate", "--preset", "tiny", "--prompt-lens", "40", "--new-tokens", "3", "--block-sizes", "16"]
    argv += ["--topks", "2", "--device", "cpu", "--out", str(out)]
    assert bench_command.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [row["attention"] for row in rows] == ["dense", "moba"]
    table = capsys.readouterr().out
    assert "| moba B=16 k=2 | 40 |" in table and table.count("x |") == 1  # the MoBA row's decode speedup
    with pytest.raises(SystemExit):
        bench_command.main(argv)
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_profile_adds_the_decode_profile_and_keeps_the_measured_numbers(tmp_path, capsys):
    """--profile: the row keeps every measured field and gains ``profile`` (CPU: operators)."""
    from flashmoba.bench.generate import PROFILE_FIELDS, PROFILE_STEPS, PROFILE_TOP, PROFILE_TOP_FIELDS

    row = measure_generate("tiny", 40, "dense", new_tokens=4, device="cpu", profile=True)
    assert tuple(row) == (*ROW_FIELDS, "profile")
    assert all(
        row[field] is not None for field in ("prefill_s", "decode_ms_per_step", "steady_decode_ms_per_step")
    )
    profile = row["profile"]
    assert tuple(profile) == PROFILE_FIELDS
    assert profile["activity"] == "cpu_ops" and profile["steps"] == PROFILE_STEPS
    assert profile["kernels_per_step"] > 0 and profile["device_us_per_step"] > 0
    assert 0 < len(profile["top"]) <= PROFILE_TOP
    assert all(tuple(entry) == PROFILE_TOP_FIELDS for entry in profile["top"])
    times = [entry["us_per_step"] for entry in profile["top"]]
    assert times == sorted(times, reverse=True)
    assert any(entry["name"] == "aten::mm" for entry in profile["top"])  # the step's matrix products
    assert "profile" not in measure_generate("tiny", 40, "dense", new_tokens=3, device="cpu")

    out = tmp_path / "generate.json"
    argv = [
        "generate",
        "--preset",
        "tiny",
        "--prompt-lens",
        "40",
        "--new-tokens",
        "3",
        "--attentions",
        "moba",
    ]
    argv += ["--block-sizes", "16", "--topks", "2", "--device", "cpu", "--out", str(out), "--profile"]
    assert bench_command.main(argv) == 0
    (written,) = json.loads(out.read_text())
    assert tuple(written["profile"]) == PROFILE_FIELDS and written["decode_ms_per_step"] is not None
    printed = capsys.readouterr().out
    assert "Profile of moba B=16 k=2, prompt 40, eager, batch 1:" in printed
    assert "| cpu_ops | calls/step | self CPU µs/step |" in printed
