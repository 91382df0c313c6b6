"""``flashmoba bench model`` on CPU with the tiny preset: rows, file, plot, table, refusal to overwrite,
replot, and flag errors (exit 2 naming the flag). ``flashmoba bench`` without ``model`` is unchanged."""

import json

import pytest
import torch

from flashmoba.bench.model import ROW_FIELDS, SPLIT_FIELDS
from flashmoba.cli import bench
from flashmoba.cli import main as flashmoba_main

TINY = ["--preset", "tiny", "--seqlens", "64", "--steps", "2", "--warmup", "1", "--backend", "reference"]


def test_runs_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "model_cpu.json"
    args = ["bench", "model", *TINY, "--block-sizes", "32,16", "--topks", "2,3", "--device", "cpu"]
    assert flashmoba_main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["attention"], r["block_size"], r["topk"]) for r in rows] == [
        ("dense", None, None),
        ("moba", 32, 2),
        ("moba", 16, 3),
    ]
    # Without --rows-per-item, MoBA rows run KernelConfig's default; dense rows record none.
    from flashmoba.ops import KernelConfig  # imports Triton

    default_rows_per_item = KernelConfig().rows_per_item
    assert [r["rows_per_item"] for r in rows] == [None, default_rows_per_item, default_rows_per_item]
    # On CPU the dense row runs once, on flash varlen's path (cuDNN is CUDA's); MoBA rows name none.
    assert [r["dense_kernel"] for r in rows] == ["flash_varlen", None, None]
    for row in rows:
        assert tuple(row) == ROW_FIELDS
        assert row["card"] == "cpu" and row["seqlen"] == 64 and row["tokens_per_s"] > 0
        assert all(row[field] is None for field in SPLIT_FIELDS) and row["mfu"] is None
    assert out.with_suffix(".png").stat().st_size > 1000
    output = capsys.readouterr().out
    assert "Card: **cpu**, preset tiny" in output
    assert "| moba B=16 k=3 | 64 |" in output

    # an existing results file is never replaced silently
    with pytest.raises(SystemExit) as stop:
        bench.main(["model", *TINY, "--attentions", "dense", "--out", str(out)])
    assert stop.value.code == 2
    assert "argument --out" in capsys.readouterr().err and len(json.loads(out.read_text())) == 3
    assert bench.main(["model", *TINY, "--attentions", "dense", "--out", str(out), "--overwrite"]) == 0
    assert len(json.loads(out.read_text())) == 1

    out.with_suffix(".png").unlink()
    capsys.readouterr()
    assert bench.main(["model", "--replot", str(out)]) == 0
    assert out.with_suffix(".png").exists() and "| dense | 64 |" in capsys.readouterr().out


def test_rows_per_item_gives_one_moba_row_per_value(tmp_path, capsys):
    out = tmp_path / "model_cpu.json"
    args = ["model", *TINY, "--block-sizes", "32", "--topks", "2", "--rows-per-item", "16,0"]
    assert bench.main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["attention"], r["rows_per_item"]) for r in rows] == [
        ("dense", None),
        ("moba", 16),
        ("moba", 0),
    ]
    assert all(tuple(row) == ROW_FIELDS for row in rows)
    output = capsys.readouterr().out
    assert "| attention | N | rows_per_item |" in output
    assert "| dense | 64 | - |" in output
    assert "| moba B=32 k=2 | 64 | 16 |" in output and "| moba B=32 k=2 | 64 | 0 |" in output


def test_kernel_configs_give_one_moba_row_per_config(tmp_path, capsys):
    out = tmp_path / "model_cpu.json"
    configs = "default;backward_num_warps=4,backward_block_m=32;router_filter=0"
    args = ["model", *TINY, "--block-sizes", "32", "--topks", "2", "--kernel-configs", configs]
    assert bench.main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["attention"], r["kernel_settings"]) for r in rows] == [
        ("dense", None),
        ("moba", {}),
        ("moba", {"backward_num_warps": 4, "backward_block_m": 32}),
        ("moba", {"router_filter": False}),
    ]
    output = capsys.readouterr().out
    assert "| moba B=32 k=2 backward_num_warps=4,backward_block_m=32 | 64 |" in output
    assert "| moba B=32 k=2 router_filter=False | 64 |" in output


def test_default_out_is_named_after_the_card(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["model", *TINY, "--attentions", "dense", "--device", "cpu"]) == 0
    assert (tmp_path / "benchmarks/results/model_cpu.json").is_file()
    assert (tmp_path / "benchmarks/results/model_cpu.png").is_file()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--steps", "0"], "--steps"),
        (["--warmup", "0"], "--warmup"),
        (["--seqlens", "64,0"], "--seqlens"),
        (["--batch", "x"], "--batch"),
        (["--block-sizes", "32,64", "--topks", "2"], "--topks"),
        (["--attentions", "dense,sparse"], "--attentions"),
        (["--attentions", "dense,dense"], "--attentions"),
        (["--preset", "huge"], "--preset"),
        (["--backend", "cuda"], "--backend"),
        (["--device", "tpu"], "--device"),
        (["--dense-kernels", "flash"], "--dense-kernels"),
        (["--device", "cpu", "--dense-kernels", "flash_varlen,cudnn"], "--dense-kernels"),
        (["--rows-per-item", "1024,-1"], "--rows-per-item"),
        (["--rows-per-item", "many"], "--rows-per-item"),
        (["--kernel-configs", "backward_warps=4"], "--kernel-configs"),
        (["--kernel-configs", "backward_num_warps=0"], "--kernel-configs"),
        (["--kernel-configs", "router_filter=2"], "--kernel-configs"),
        (["--kernel-configs", "rows_per_item=64"], "--kernel-configs"),
        (["--kernel-configs", "default;default"], "--kernel-configs"),
        (["--replot", "no/such.json"], "--replot"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["model", *flags, "--out", str(tmp_path / "rows.json")])
    assert stop.value.code == 2
    assert f"argument {named}" in capsys.readouterr().err
    assert not (tmp_path / "rows.json").exists()


def test_cuda_device_without_cuda_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(SystemExit) as stop:
        bench.main(["model", "--device", "cuda", "--out", str(tmp_path / "rows.json")])
    assert stop.value.code == 2 and "argument --device" in capsys.readouterr().err


def test_out_directory_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["model", *TINY, "--out", str(tmp_path)])
    assert stop.value.code == 2 and "argument --out" in capsys.readouterr().err


def test_plain_bench_keeps_its_own_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--seqlens", "0"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "flashmoba bench: error: argument --seqlens" in error and "bench model" not in error


def test_dense_kernels_give_one_dense_row_per_kernel(monkeypatch):
    # What the jobs ask measure_model for (a CUDA run is not possible here): dense once per kernel,
    # in the given order, MoBA rows unchanged.
    parser = bench._model_parser()
    args = parser.parse_args(["--seqlens", "64", "--dense-kernels", "cudnn,flash_varlen", "--device", "cpu"])
    jobs = bench._model_jobs(args)
    assert [(job["attention"], job["dense_kernel"]) for job in jobs] == [
        ("dense", "cudnn"),
        ("dense", "flash_varlen"),
        ("moba", "flash_varlen"),
    ]
    dense_row = {"attention": "dense", "card": "cpu"}
    assert bench._model_label(dict(dense_row, dense_kernel="cudnn")) == "dense cudnn"
    assert bench._model_label(dict(dense_row, dense_kernel="flash_varlen")) == "dense"
