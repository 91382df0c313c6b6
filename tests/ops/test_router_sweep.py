"""benchmarks/router_sweep.py without a GPU: the CPU self-check path, and that the sweep rejects a
configuration whose selection differs from the default's (or that fails) instead of timing it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from flashmoba.ops import router

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="the CPU self-check path (CUDA runs the real sweep)"
    ),
]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "router_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("router_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_self_check_main_matches_and_writes(sweep, tmp_path):
    out = tmp_path / "sweep.json"
    assert sweep.main(["--out", str(out)]) == 0
    # The configurations travel as KernelConfig arguments: the router module holds no override state.
    assert not hasattr(router, "TOPK_CONFIG_OVERRIDES")
    result = json.loads(out.read_text())
    assert result["complete"] and result["card"] == "cpu"
    rows = result["rows"]
    assert [row["config_name"] for row in rows] == ["default", "M16_N16", "M32_N32_filter0"]
    assert all(row["status"] == "ok" and row["selection"]["equal"] for row in rows)
    assert all(row["route_ms"] > 0 and row["topk_ms"] > 0 and row["centroid_ms"] > 0 for row in rows)
    # The overrides reached the kernel's configuration.
    assert [row["config"]["BLOCK_M"] for row in rows] == [64, 16, 32]
    assert rows[2]["config"]["FILTER"] is False


def test_compare_selections_detects_a_difference(sweep):
    generator = torch.Generator().manual_seed(0)
    expected = torch.randint(0, 50, (2, 40, 3, 4), generator=generator, dtype=torch.int32)
    assert sweep.compare_selections(expected, expected.clone())["equal"]

    got = expected.clone()
    got[1, 17, 2, 3] += 1
    result = sweep.compare_selections(expected, got)
    assert not result["equal"]
    assert result["rows_differing"] == 1 and result["rows_total"] == 2 * 40 * 3
    assert result["first_difference"] == [1, 17, 2]

    assert not sweep.compare_selections(expected, expected[..., :3].contiguous())["equal"]  # shape
    assert not sweep.compare_selections(expected, expected.long())["equal"]  # dtype


def test_sweep_reports_mismatch_error_and_invalid_without_timing(sweep):
    """A route whose selection changes under one override is a mismatch, one that raises is an error,
    BLOCK_N below the running list is invalid; none is timed, and no override state is left behind."""
    import flashmoba.ops

    def route(q, k, block_size, topk, causal, config):
        if config.router_block_m == 32:
            raise RuntimeError("deliberate compile failure")
        selection = flashmoba.ops.moba_select_triton(q, k, block_size, topk, causal, config=config)
        if config.router_block_m == 16:
            selection = selection.clone()
            # Query 95 (own block 5) keeps 2 of the candidates 0..4: swap one for a candidate it left out.
            kept = selection[0, 95, 1, :2].tolist()
            selection[0, 95, 1, 0] = next(block for block in range(5) if block not in kept)
        return selection

    case = dict(sweep.SELF_CHECK, dtype="bf16", causal=True)
    grid = [dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_M=32, BLOCK_N=32), dict(BLOCK_N=1)]
    rows = sweep.sweep_case(case, grid, 1, "cpu", sweep.Deadline(None), route_fn=route)
    assert not hasattr(router, "TOPK_CONFIG_OVERRIDES")
    assert [row["status"] for row in rows] == ["ok", "mismatch", "error", "invalid"]
    default, mismatch, error, invalid = rows
    assert default["route_ms"] > 0
    assert mismatch["selection"]["rows_differing"] == 1
    assert mismatch["selection"]["first_difference"] == [0, 95, 1]
    assert mismatch["selection"]["swapped_score_spread"] > 0  # random scores: no tie between the swapped
    assert "deliberate compile failure" in error["error"]
    assert "BLOCK_N 1" in invalid["error"]
    for row in (mismatch, error, invalid):
        assert row["route_ms"] is None and row["topk_ms"] is None and row["route_tflops"] is None


def test_max_seconds_stops_and_still_writes(sweep, tmp_path):
    out = tmp_path / "partial.json"
    case = dict(sweep.SELF_CHECK, dtype="bf16", causal=True)
    result = sweep.run_sweep([case, case], sweep.SELF_CHECK_GRID, 1, "cpu", out, 1e-9, {})
    assert not result["complete"] and result["rows"] == []
    assert json.loads(out.read_text())["complete"] is False


def test_deadline_inside_a_case_keeps_the_rows_measured(sweep):
    class AfterFirstConfig(sweep.Deadline):
        checks = 0

        def passed(self):
            self.checks += 1
            self.stopped = self.checks > 1
            return self.stopped

    case = dict(sweep.SELF_CHECK, dtype="bf16", causal=True)
    rows = sweep.sweep_case(case, sweep.SELF_CHECK_GRID, 1, "cpu", AfterFirstConfig(None))
    assert [row["config_name"] for row in rows] == ["default"] and rows[0]["status"] == "ok"


def test_count_paths_rows_add_up(sweep):
    case = dict(sweep.SELF_CHECK, dtype="bf16", causal=True)
    (row,) = sweep.count_paths([case], "cpu")
    assert row["tiles"] == row["skipped"] + row["inserted"] + row["merged"] > 0
    assert "selected" not in row and row["seqlen"] == case["seqlen"]
