"""The benchmark's pieces that run without a GPU: the MoBA BlockMask for FlexAttention, table, plot."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

import flashmoba
from flashmoba import bench


@pytest.mark.parametrize("causal", [True, False])
def test_flex_block_mask_is_exactly_moba(causal):
    """Token-level mask of the BlockMask == the keys MoBA lets each query see, and the block lists
    cover every selected block."""
    seqlen, heads, block_size, topk = 300, 2, 32, 3
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, seqlen, heads, 16, generator=generator)
    k = torch.randn(1, seqlen, heads, 16, generator=generator)
    selected = flashmoba.moba_select(q, k, block_size, topk, causal=causal)
    block_mask = bench.flex_moba_block_mask(selected, block_size, seqlen, causal)

    dense = create_mask(block_mask.mask_mod, 1, heads, seqlen, seqlen, device="cpu")[0]
    positions = torch.arange(seqlen)
    expected = torch.zeros(heads, seqlen, seqlen, dtype=torch.bool)
    for slot in range(topk):
        block = selected[0, :, :, slot].T.long()  # [H, T]
        expected |= (positions[None, None, :] // block_size == block[..., None]) & (block[..., None] >= 0)
    if causal:
        expected &= positions[None, None, :] <= positions[None, :, None]
    assert torch.equal(dense, expected)

    block_level = block_mask.to_dense()[0].bool()  # [H, query tiles, key blocks]
    tile_of_query = positions // 128
    for slot in range(topk):
        block = selected[0, :, :, slot].T.long()
        chosen = block >= 0
        heads_idx = torch.arange(heads)[:, None].expand_as(block)
        assert block_level[heads_idx[chosen], tile_of_query.expand_as(block)[chosen], block[chosen]].all()


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
    assert bench.router_tflops(rows[1]) == pytest.approx(2 * 128 * 32 * 8192 * 16 * 2 / 0.5e-3 / 1e12)


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
