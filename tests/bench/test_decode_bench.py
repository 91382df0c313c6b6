"""``flashmoba bench decode`` on CPU at tiny sizes: rows, file, plot, table, refusal to overwrite, replot,
flag errors; the bytes floor's arithmetic; the Triton step under the interpreter; configurations that do
not fit in memory are skipped with a row saying so."""

import json
import os

import pytest
import torch

from flashmoba.bench import decode
from flashmoba.cli import bench
from flashmoba.cli import main as flashmoba_main

TINY = [
    "--device",
    "cpu",
    "--cache-lens",
    "40,70",
    "--batches",
    "1,2",
    "--heads",
    "4/2/8",
    "--block-sizes",
    "16,8",
    "--topks",
    "2,3",
    "--backend",
    "reference",
    "--repeats",
    "2",
    "--warmup",
    "1",
]


def test_runs_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "decode_cpu.json"
    assert flashmoba_main(["bench", "decode", *TINY, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["batch"], r["cache_len"], r["block_size"]) for r in rows[:4]] == [
        ("moba", 1, 40, 16),
        ("sdpa", 1, 40, None),
        ("flex", 1, 40, None),
        ("moba", 1, 40, 8),  # dense rows once per cache, beside the first block / topk pair
    ]
    assert len(rows) == 2 * 2 * 4
    for row in rows:
        assert tuple(row) == decode.ROW_FIELDS and row["card"] == "cpu" and row["dtype"] == "bfloat16"
        if row["impl"] == "flex":
            assert row["error"] == "FlexAttention's decoding kernel needs CUDA"
            continue
        assert row["error"] is None and row["timing"] == "perf_counter"
        assert row["step_ms"] > 0 and row["floor_ms"] > 0 and row["copy_gbps"] > 0
        assert row["floor_ratio"] == pytest.approx(row["step_ms"] / row["floor_ms"])
    dense = next(r for r in rows if r["impl"] == "sdpa" and r["batch"] == 2 and r["cache_len"] == 70)
    assert dense["bytes_read"] == 2 * 70 * 2 * 8 * 2 * 2 + 2 * (2 * 4 + 2 * 2) * 8 * 2  # K, V; q, o, k, v
    assert out.with_suffix(".png").stat().st_size > 1000
    output = capsys.readouterr().out
    assert "Card: **cpu**, bfloat16" in output
    assert "| moba B=16 k=2 | 4/2 d8 | 2 | 70 |" in output and "| sdpa | 4/2 d8 | 1 | 40 |" in output

    # an existing results file is never replaced silently
    with pytest.raises(SystemExit) as stop:
        bench.main(["decode", *TINY, "--impls", "sdpa", "--out", str(out)])
    assert stop.value.code == 2
    assert "argument --out" in capsys.readouterr().err and len(json.loads(out.read_text())) == 16
    assert bench.main(["decode", *TINY, "--impls", "sdpa", "--out", str(out), "--overwrite"]) == 0
    assert [r["impl"] for r in json.loads(out.read_text())] == ["sdpa"] * 4

    out.with_suffix(".png").unlink()
    capsys.readouterr()
    assert bench.main(["decode", "--replot", str(out)]) == 0
    assert out.with_suffix(".png").exists() and "| sdpa | 4/2 d8 | 2 | 70 |" in capsys.readouterr().out


def test_default_out_is_named_after_the_card(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["decode", *TINY, "--impls", "sdpa", "--batches", "1", "--cache-lens", "40"]) == 0
    assert (tmp_path / "benchmarks/results/decode_cpu.json").is_file()
    assert (tmp_path / "benchmarks/results/decode_cpu.png").is_file()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--heads", "3/2/8"], "--heads"),
        (["--heads", "32x8"], "--heads"),
        (["--cache-lens", "1"], "--cache-lens"),
        (["--impls", "moba,dense"], "--impls"),
        (["--topks", "2"], "--topks"),  # two block sizes, one topk
        (["--backend", "cuda"], "--backend"),
    ],
)
def test_bad_flags_are_named(flags, named, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        bench.main(["decode", *TINY, *flags, "--out", str(tmp_path / "x.json")])
    assert stop.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err


def test_bytes_floor_of_the_notes_example():
    # ../shared/inference.md: 128K cache, 32/8 heads, d 128, bf16, per sequence: dense reads 512 MiB of K
    # and V; MoBA 4 MiB of centroids and at most topk x group blocks per kv head.
    shape = decode.decode_shape(131072, 1, 32, 8, 128, 128, 8, "bfloat16", "cpu")
    io = (2 * 32 + 2 * 8) * 128 * 2
    assert decode.dense_bytes(shape) == 512 * 2**20 + io
    candidates = 1023  # the own block (the last) is not scored
    distinct = 8 * 8 * 4  # every query head picks topk blocks of its own
    blocks = distinct * 128 * 128 * 2 * 2
    assert decode.moba_bytes(shape, distinct) == candidates * 8 * 128 * 4 + blocks + io


def test_distinct_selected_blocks():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 8, generator=generator)
    sums = torch.randn(2, 5, 2, 8, generator=generator)
    # 5 blocks of 8 at cache length 40: own block 4; topk 9 takes every block.
    assert decode.distinct_selected_blocks(q, sums, 40, 8, 9) == 2 * 2 * 5
    assert decode.distinct_selected_blocks(q, sums, 40, 8, 1) == 2 * 2  # the own block only
    # topk 2: each query head one candidate, a group of 2 heads at most 2 per kv head, plus the own block.
    count = decode.distinct_selected_blocks(q, sums, 40, 8, 2)
    assert 2 * 2 * 2 <= count <= 2 * 2 * 3
    # Group heads that agree share their block: identical query heads count once.
    same = q[:, :, :1].expand(2, 1, 4, 8).contiguous()
    assert decode.distinct_selected_blocks(same, sums, 40, 8, 2) == 2 * 2 * 2


@pytest.mark.triton
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
def test_the_triton_step_runs_in_the_interpreter():
    shape = decode.decode_shape(40, 1, 2, 1, 8, 8, 2, "float32", "cpu")
    (row,) = decode.measure_decode(shape, ["moba"], backend="triton", repeats=1, warmup=1, copy_gbps=10.0)
    assert row["error"] is None and row["backend"] == "triton" and row["step_ms"] > 0


def test_a_configuration_that_does_not_fit_is_skipped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**30))
    shape = decode.decode_shape(1 << 20, 64, 32, 8, 128, 128, 8, "bfloat16", "cuda")
    rows = decode.measure_decode(shape, ["moba", "sdpa"], copy_gbps=1000.0)
    assert [row["impl"] for row in rows] == ["moba", "sdpa"]
    # 256 GiB of K and V, 2 GiB of centroids
    assert all(row["error"] == "skipped: the caches need 258.0 GiB, 1.0 GiB free" for row in rows)
