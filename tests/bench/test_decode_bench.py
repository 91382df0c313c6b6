"""``flashmoba bench decode`` on CPU at tiny sizes: rows, file, plot, table, refusal to overwrite, replot,
flag errors; the bytes floor's arithmetic; the Triton step under the interpreter, one row per launch config
(--decode-configs) with its profile (--profile); configurations that do not fit in memory are skipped with
a row saying so."""

import argparse
import json
import os

import pytest
import torch

from flashmoba.bench import decode
from flashmoba.bench.timing import PROFILE_FIELDS, PROFILE_TOP_FIELDS
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
        assert row["device_floor_ratio"] is None  # no profile
        assert row["graph_step_ms"] is None and row["graph_floor_ratio"] is None  # no graphs on CPU
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
        (["--decode-configs", "num_split=2"], "--decode-configs"),  # not a DecodeConfig field
        (["--decode-configs", "num_splits=0"], "--decode-configs"),
        (["--decode-configs", "num_splits=two"], "--decode-configs"),
        (["--decode-configs", "num_splits"], "--decode-configs"),
        (["--decode-configs", "num_splits=1,num_splits=2"], "--decode-configs"),
        (["--decode-configs", "num_splits=1;num_splits=1"], "--decode-configs"),
        (["--decode-configs", "num_splits=2"], "--decode-configs"),  # TINY's backend is the reference
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


def test_decode_configs_parse_into_the_set_fields():
    parse = bench._decode_configs
    assert parse("default") == [{}] and parse("") == [{}]
    assert parse(" default ; num_splits=1; num_splits = 2 , attn_num_stages=3") == [
        {},
        {"num_splits": 1},
        {"num_splits": 2, "attn_num_stages": 3},
    ]
    with pytest.raises(
        argparse.ArgumentTypeError, match="unknown DecodeConfig field 'splits'; fields: route_block_m"
    ):
        parse("splits=2")
    with pytest.raises(argparse.ArgumentTypeError, match="num_splits must be >= 1, got 0"):
        parse("num_splits=0")
    assert parse("fold_append=1;fold_append=0,num_splits=2") == [
        {"fold_append": True},
        {"fold_append": False, "num_splits": 2},
    ]
    with pytest.raises(argparse.ArgumentTypeError, match="fold_append must be 0 or 1, got '2'"):
        parse("fold_append=2")


@pytest.mark.triton
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
def test_device_floor_ratio_is_the_profiled_kernels_time_over_the_floor(tmp_path, monkeypatch):
    # A CUDA profile stood in for (this machine has no GPU): 100 us of kernels per step, replayed in 200,
    # 150 per step of a graph of several.
    profile = dict(
        activity="cuda_kernels",
        steps=decode.PROFILE_STEPS,
        kernels_per_step=3.0,
        device_us_per_step=100.0,
        top=[dict(name="_decode_attn_group_kernel", calls_per_step=1.0, us_per_step=100.0)],
    )
    timed = dict(step_ms=0.2, graph_step_ms=0.15, eager_ms=0.3, timing="cuda_graph", profile=profile)
    monkeypatch.setattr(decode, "time_step", lambda *args, **kwargs: dict(timed))
    out = tmp_path / "decode_cpu.json"
    argv = ["bench", "decode", *TINY, "--impls", "sdpa", "--profile", "--out", str(out)]
    assert flashmoba_main(argv) == 0
    for row in json.loads(out.read_text()):
        assert row["floor_ratio"] == pytest.approx(0.2 / row["floor_ms"])
        assert row["graph_floor_ratio"] == pytest.approx(0.15 / row["floor_ms"])
        assert row["device_floor_ratio"] == pytest.approx(0.1 / row["floor_ms"])


def test_decode_configs_give_one_moba_row_each_with_its_profile(tmp_path, capsys):
    out = tmp_path / "decode.json"
    argv = ["decode", "--device", "cpu", "--cache-lens", "40", "--batches", "2", "--heads", "4/2/8"]
    argv += ["--block-sizes", "8", "--topks", "3", "--impls", "moba,sdpa", "--dtype", "float32"]
    argv += ["--backend", "triton", "--repeats", "1", "--warmup", "1", "--out", str(out), "--profile"]
    argv += ["--decode-configs", "default;num_splits=1;num_splits=2,attn_num_stages=3,fold_append=1"]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(row["impl"], row["decode_config"]) for row in rows] == [
        ("moba", {}),
        ("moba", {"num_splits": 1}),
        ("moba", {"num_splits": 2, "attn_num_stages": 3, "fold_append": True}),
        ("sdpa", None),  # dense rows once, no config
    ]
    for row in rows:
        assert tuple(row) == (*decode.ROW_FIELDS, "profile") and row["error"] is None
        assert row["step_ms"] > 0 and row["floor_ratio"] > 0
        assert row["device_floor_ratio"] is None  # a CPU profile times operators, not device kernels
        profile = row["profile"]
        assert tuple(profile) == PROFILE_FIELDS and profile["activity"] == "cpu_ops"
        assert profile["steps"] == decode.PROFILE_STEPS and profile["kernels_per_step"] > 0
        assert 0 < len(profile["top"]) <= decode.PROFILE_TOP
        assert all(tuple(entry) == PROFILE_TOP_FIELDS for entry in profile["top"])
        times = [entry["us_per_step"] for entry in profile["top"]]
        assert times == sorted(times, reverse=True)
    printed = capsys.readouterr().out
    assert "| moba B=8 k=3 num_splits=2,attn_num_stages=3,fold_append=True | 4/2 d8 | 2 | 40 |" in printed
    assert "| moba B=8 k=3 | 4/2 d8 | 2 | 40 |" in printed
    assert "Profile of moba B=8 k=3 num_splits=1, 4/2 d8, batch 2, cache 40, perf_counter:" in printed
    assert printed.count("| cpu_ops | calls/step | self CPU µs/step |") == 4
    # a replot prints the tables again, profiles included
    assert bench.main(["decode", "--replot", str(out)]) == 0
    assert capsys.readouterr().out.count("| cpu_ops | calls/step |") == 4


@pytest.mark.triton
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1",
)
@pytest.mark.parametrize(
    "config", [{}, {"num_splits": 2, "attn_num_stages": 1, "route_block_splits": 2, "fold_append": True}]
)
def test_the_triton_step_is_the_public_decode_on_the_same_inputs(config):
    """The benchmark's MoBA step calls the ops-level launcher with a launch config: the same output and
    the same appended caches as ``moba_attn_with_kvcache``."""
    from flashmoba.kvcache import moba_attn_with_kvcache

    shape = decode.decode_shape(70, 2, 4, 2, 8, 8, 3, "float32", "cpu")
    inputs = decode.make_inputs(shape, torch.device("cpu"))
    public = {name: tensor.clone() for name, tensor in inputs.items()}
    out = decode.moba_step(inputs, 8, 3, "triton", config)()
    expected = moba_attn_with_kvcache(
        public["q"],
        public["k_cache"],
        public["v_cache"],
        public["block_sums"],
        public["cache_seqlens"],
        8,
        3,
        k=public["k"],
        v=public["v"],
        backend="triton",
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name in ("k_cache", "v_cache", "block_sums"):
        torch.testing.assert_close(inputs[name], public[name], rtol=0, atol=1e-5)


def test_a_decode_config_needs_the_triton_backend():
    shape = decode.decode_shape(40, 1, 2, 1, 8, 8, 2, "float32", "cpu")
    with pytest.raises(ValueError, match="decode configs need the triton backend"):
        decode.measure_decode(shape, ["moba"], backend="reference", decode_configs=[{"num_splits": 1}])


def test_a_configuration_that_does_not_fit_is_skipped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**30))
    shape = decode.decode_shape(1 << 20, 64, 32, 8, 128, 128, 8, "bfloat16", "cuda")
    configs = [{}, {"num_splits": 1}]
    rows = decode.measure_decode(shape, ["moba", "sdpa"], copy_gbps=1000.0, decode_configs=configs)
    assert [(row["impl"], row["decode_config"]) for row in rows] == [
        ("moba", {}),
        ("moba", configs[1]),
        ("sdpa", None),
    ]
    # 256 GiB of K and V, 2 GiB of centroids
    assert all(row["error"] == "skipped: the caches need 258.0 GiB, 1.0 GiB free" for row in rows)
