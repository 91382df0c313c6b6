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
