"""The flashmoba bench command (flashmoba.cli.bench) without a GPU: table, plot, replot, CPU comparison."""

import pytest
import torch

from flashmoba import bench as library
from flashmoba.cli import bench


def test_table_and_plot(tmp_path, capsys):
    common = dict(card="test card", seqlen=8192, batch=2, heads=16, head_dim=128, causal=True)
    rows = [
        dict(
            common,
            impl="sdpa_flash",
            block_size=None,
            topk=None,
            route_ms=None,
            fwd_ms=8.0,
            fwd_bwd_ms=30.0,
            peak_mem_gib=0.2,
        ),
        dict(
            common,
            impl="flashmoba",
            block_size=128,
            topk=8,
            route_ms=0.5,
            fwd_ms=2.0,
            fwd_bwd_ms=6.0,
            peak_mem_gib=0.21,
        ),
        dict(
            common,
            impl="flex",
            block_size=128,
            topk=8,
            route_ms=None,
            fwd_ms=None,
            fwd_bwd_ms=None,
            peak_mem_gib=None,
            error="OutOfMemoryError: test",
        ),
    ]
    bench.print_table(rows)
    output = capsys.readouterr().out
    assert "4.0x" in output and "5.0x" in output and "failed" in output
    path = tmp_path / "plot.png"
    bench.plot(rows, path)
    assert path.stat().st_size > 1000
    # 2*d FLOPs per (query, causal-half candidate block): 2*128*32*8192*16*2 FLOP in 0.5 ms
    assert library.router_tflops(rows[1]) == pytest.approx(2 * 128 * 32 * 8192 * 16 * 2 / 0.5e-3 / 1e12)


@pytest.mark.triton
def test_without_cuda_runs_a_cpu_comparison(capsys):
    if torch.cuda.is_available():
        pytest.skip("the CPU comparison runs only without CUDA")
    assert bench.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_replot_reads_a_results_file(tmp_path, capsys):
    rows = [
        dict(
            card="c",
            impl="sdpa_flash",
            seqlen=8192,
            batch=2,
            heads=16,
            head_dim=128,
            block_size=None,
            topk=None,
            causal=True,
            route_ms=None,
            fwd_ms=3.0,
            fwd_bwd_ms=9.0,
            peak_mem_gib=0.1,
        )
    ]
    path = tmp_path / "c.json"
    path.write_text(__import__("json").dumps(rows))
    assert bench.main(["--replot", str(path)]) == 0
    assert path.with_suffix(".png").exists() and "sdpa_flash" in capsys.readouterr().out


def _refuse(*_args, **_kwargs):
    raise AssertionError("a bad flag must fail before any computation")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seqlens", "8192,0"], "argument --seqlens: must be >= 1, got 0"),
        (["--seqlens", ","], "argument --seqlens: expected comma-separated ints, got ','"),
        (["--block-sizes", "0"], "argument --block-sizes: must be >= 1, got 0"),
        (["--block-sizes", "128,x", "--topks", "8,8"], "argument --block-sizes: expected an int, got 'x'"),
        (["--topks", "-1"], "argument --topks: must be >= 1, got -1"),
        (
            ["--block-sizes", "64,128"],
            "argument --topks: must have as many entries as --block-sizes (2), got 1",
        ),
        (["--head-dims", "0"], "argument --head-dims: must be >= 1, got 0"),
        (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
        (["--heads", "0"], "argument --heads: must be >= 1, got 0"),
        (["--dtype", "float32"], "argument --dtype: invalid choice: 'float32'"),
        (["--impls", "flashmoba,dense"], "argument --impls: must be one of"),
        (["--impls", "flex,flex"], "argument --impls: names 'flex' more than once"),
        (["--impls", ","], "argument --impls: expected comma-separated names"),
        (["--dense-max-seqlen", "-1"], "argument --dense-max-seqlen: must be >= 0, got -1"),
        (["--flex-max-seqlen", "-1"], "argument --flex-max-seqlen: must be >= 0, got -1"),
        (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        (["--out", "{tmp}"], "argument --out: must be a file path, got the directory"),
        (["--replot", "{tmp}/missing.json"], "argument --replot: no such file"),
        (["--replot", "{tmp}/bad.json"], "argument --replot: cannot read"),
    ],
)
def test_bad_flags_fail_before_any_work_with_or_without_cuda(flags, message, tmp_path, capsys, monkeypatch):
    """Without CUDA the command falls back to a CPU comparison: a bad flag must still be exit 2 there."""
    from flashmoba.cli import main

    for name in ("cpu_comparison", "_run_jobs", "plot", "print_table"):
        monkeypatch.setattr(bench, name, _refuse)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit) as raised:
        main(["bench", *(flag.replace("{tmp}", str(tmp_path)) for flag in flags)])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
