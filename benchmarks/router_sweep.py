"""Router sweep: time the MoBA router (``flashmoba.ops.router``) and choose its top-k kernel's tiles.

For each (sequence length, block size : topk) case it builds random q, k on CUDA (batch 2, 16 heads,
head_dim 128, bf16, causal by default) and times

- ``route``: the whole routing call ``flashmoba.ops.moba_select_triton`` (cu_seqlens, centroid kernel,
  top-k kernel);
- ``centroids``: the centroid kernel alone (``router.block_centroids_varlen``), once per case: the
  top-k configuration does not reach it;
- ``topk``: the top-k kernel alone (``router._launch_route`` on precomputed centroids; a private launcher,
  so a changed signature only drops this column, recorded in the row's ``topk_error``),

first with the default configuration (``router._topk_config``, no overrides), then with each configuration
of the grid, passed to the router as a ``KernelConfig`` (``router_config``). Every configuration's
selection must equal the default's (``torch.equal``); one that differs (``status: mismatch``, with the
number of differing (query, head) rows and the float32 score spread of the swapped blocks of a sample of
them: near-ties flipped by a different dot order show as a spread ~1e-3 of the scores) or fails to
compile or launch (``status: error``, with the message) is reported and not timed.

TFLOP/s is ``flashmoba.bench.router_tflops``: 2 * head_dim FLOPs per (query, candidate block) pair, with
num_blocks / 2 candidates per query under the causal rule, i.e. 2 * batch * heads * head_dim * N *
(N / block_size) / 2. The exact causal count of (query, earlier block) pairs is block_size * nb * (nb - 1)
/ 2 per sequence and head (nb = N / block_size), 1/nb below that: the bench formula fits. It counts the
scoring the router must do, not the padded tiles the kernel computes.

Timing: ``flashmoba.bench.time_cuda_ms`` (CUDA events, median over --repeats after one warm-up call;
compilation happens in the untimed correctness call before it). Results: a JSON object (card, versions,
arguments, rows) rewritten after every configuration, so a killed run keeps what it measured;
--max-seconds stops the sweep between configurations and still writes the file and the tables.

Without CUDA it says so and runs a tiny self-check of the sweep itself on CPU in Triton's interpreter
(N 96, block 16, topk 3, head_dim 16, two configurations whose selections must equal the default's).

    python benchmarks/router_sweep.py --grid small --out $OUT/router_sweep.json
    python benchmarks/router_sweep.py --grid full --seqlens 524288 --repeats 3 --max-seconds 540
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from flashmoba import bench

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Partial overrides of router._topk_config by its launch names (unset keys keep the default's choice for
# the case; see router_config).
SMALL_GRID = [
    dict(BLOCK_M=64, num_warps=4),  # the earlier default (see "Router: top-k tiles" in NOTES.md)
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8),
    dict(num_stages=3),
    dict(BLOCK_M=128, num_warps=8, num_stages=3),
    dict(INSERT_ROUNDS=8),
]

# How many single-key insertions a tile may take before a full merge is cheaper (default 8).
INSERT_GRID = [dict(INSERT_ROUNDS=rounds) for rounds in (2, 8, 16, 32, 64)]

# The CPU self-check: two configurations that differ from the default's (BLOCK_M 64, BLOCK_N 16 there)
# and between them take the insert path (FILTER) and the full merge path (no FILTER).
SELF_CHECK = dict(batch=1, heads=2, head_dim=16, seqlen=96, block_size=16, topk=3)
SELF_CHECK_GRID = [
    dict(BLOCK_M=16, BLOCK_N=16),
    dict(BLOCK_M=32, BLOCK_N=32, FILTER=False),
]


def log(message: str) -> None:
    print(message, flush=True)


def full_grid() -> list[dict]:
    return [
        dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
        for m, n, w, s in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3))
    ]


def config_name(overrides: dict) -> str:
    if not overrides:
        return "default"
    short = dict(
        BLOCK_M="M", BLOCK_N="N", num_warps="w", num_stages="s", FILTER="filter", INSERT_ROUNDS="insert"
    )
    return "_".join(
        f"{short.get(key, key)}{int(value) if isinstance(value, bool) else value}"
        for key, value in overrides.items()
    )


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _parse_blocks(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        if not item:
            continue
        block_size, _, topk = item.partition(":")
        if not topk:
            raise argparse.ArgumentTypeError(f"--blocks wants block_size:topk pairs, got {item!r}")
        pairs.append((int(block_size), int(topk)))
    return pairs


def router_config(overrides: dict):
    """The ``KernelConfig`` that sets these top-k launch settings (BLOCK_M, num_warps, FILTER, ...)."""
    from flashmoba.ops.config import KernelConfig

    return KernelConfig.for_kernel("router", overrides)


def effective_config(
    head_dim: int, seqlen: int, block_size: int, topk: int, causal: bool, overrides: dict
) -> tuple[dict, int]:
    """(the top-k kernel's configuration under these overrides, the running top-k list length)."""
    from flashmoba.ops import router
    from flashmoba.ops.utils import head_dim_tile

    max_blocks = -(-seqlen // block_size)
    _, running_topk = router._running_topk(topk, max_blocks, causal)
    config = router._topk_config(head_dim_tile(head_dim), running_topk, max_blocks, router_config(overrides))
    return config, running_topk


def invalid_reason(config: dict, running_topk: int) -> str | None:
    """Why the top-k kernel cannot run this configuration (checked before launching), or None."""
    if config["BLOCK_N"] < running_topk:
        return f"BLOCK_N {config['BLOCK_N']} < running top-k list length {running_topk} (tl.topk)"
    if config["BLOCK_M"] < 16 or config["BLOCK_N"] < 16:
        return "tl.dot needs BLOCK_M and BLOCK_N >= 16"
    return None


def compare_selections(
    expected: torch.Tensor,
    got: torch.Tensor,
    sample: int = 0,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    block_size: int | None = None,
) -> dict:
    """Compare two selections [B, T, H, topk]: equal (torch.equal), and for a difference the number of
    (query, head) rows that differ, the first one, and (sample > 0 with q, k) the largest float32 score
    spread among the swapped blocks of up to `sample` differing rows, relative to the row's largest
    |score| (near-ties flipped by rounding give small spreads)."""
    if expected.shape != got.shape or expected.dtype != got.dtype:
        return dict(
            equal=False,
            rows_differing=None,
            rows_total=None,
            first_difference=None,
            swapped_score_spread=None,
            detail=f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(expected.shape)} {expected.dtype}",
        )
    if torch.equal(expected, got):
        return dict(
            equal=True,
            rows_differing=0,
            rows_total=expected[..., 0].numel(),
            first_difference=None,
            swapped_score_spread=None,
            detail=None,
        )
    differing = (expected != got).any(dim=-1)
    where = differing.nonzero()
    result = dict(
        equal=False,
        rows_differing=int(differing.sum()),
        rows_total=differing.numel(),
        first_difference=[int(x) for x in where[0]],
        swapped_score_spread=None,
        detail=None,
    )
    if sample > 0 and q is not None and k is not None and block_size is not None:
        result["swapped_score_spread"] = _swapped_score_spread(
            expected, got, where[:sample], q, k, block_size
        )
    return result


def _centroid_score(query, keys, block, block_size) -> float:
    """query . centroid of one block of keys [S, D], the centroid formed as the kernel forms it."""
    block_keys = keys[block * block_size : min((block + 1) * block_size, keys.shape[0])]
    return float(query @ block_keys.float().mean(0).to(keys.dtype).float())


def _swapped_score_spread(expected, got, rows, q, k, block_size) -> float | None:
    """max over rows of (max - min float32 score of the blocks one selection has and the other lacks) /
    max |score| of the row's selected blocks; centroids as the kernel forms them (mean in k's dtype).
    None where no sampled row swaps two real blocks."""
    heads_per_kv = q.shape[2] // k.shape[2]
    worst = None
    for b, t, h in rows.tolist():
        chosen = set(expected[b, t, h].tolist()) | set(got[b, t, h].tolist())
        swapped = sorted(set(expected[b, t, h].tolist()) ^ set(got[b, t, h].tolist()))
        chosen.discard(-1)
        if not swapped:
            continue
        blocks = sorted(x for x in chosen if x >= 0)

        query = q[b, t, h].float()
        keys_of_head = k[b, :, h // heads_per_kv]
        scores = {block: _centroid_score(query, keys_of_head, block, block_size) for block in blocks}
        swapped_scores = [scores[x] for x in swapped if x in scores]
        if len(swapped_scores) < 2:  # not a swap of real blocks (e.g. a duplicate or a -1): no spread
            continue
        scale = max(abs(s) for s in scores.values()) or 1.0
        spread = (max(swapped_scores) - min(swapped_scores)) / scale
        worst = spread if worst is None else max(worst, spread)
    return worst


def _time_wall_ms(fn, repeats: int, warmup: int = 1) -> float:
    """CPU stand-in for bench.time_cuda_ms (the interpreter self-check)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _error_text(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Triton's compile errors end with the cause; keep the first and the last line.
    summary = lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(error).__name__}: {summary[:400]}"


def _default_repeats(seqlen: int) -> int:
    """Router calls take ~0.4 ms at 8K and ~0.1-1.5 s at 512K on an H100: fewer repeats for long ones."""
    return 20 if seqlen <= 65536 else 5 if seqlen <= 131072 else 3


class Deadline:
    def __init__(self, seconds: float | None):
        self.start = time.perf_counter()
        self.seconds = seconds if seconds and seconds > 0 else None
        self.stopped = False  # set once a check found the time up

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def passed(self) -> bool:
        if self.seconds is not None and self.elapsed() > self.seconds:
            self.stopped = True
        return self.stopped


# The fields of a case that every row of it records.
CASE_FIELDS = ("batch", "seqlen", "heads", "head_dim", "dtype", "block_size", "topk", "causal")


def _default_route(q, k, block_size, topk, causal, config):
    import flashmoba.ops

    return flashmoba.ops.moba_select_triton(q, k, block_size, topk, causal, config=config)


class _CaseInputs:
    """Random q, k of one case (padded and packed views), and the top-k kernel's output buffer."""

    def __init__(self, case: dict, device: str):
        batch, seqlen, heads, head_dim = case["batch"], case["seqlen"], case["heads"], case["head_dim"]
        dtype = DTYPES[case["dtype"]]
        generator = torch.Generator(device=device).manual_seed(0)
        self.q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, generator=generator)
        self.k = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, generator=generator)
        self.q_packed = self.q.view(batch * seqlen, heads, head_dim)
        self.k_packed = self.k.view(batch * seqlen, heads, head_dim)
        self.cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
        self.topk_buffer = torch.empty(batch * seqlen, heads, case["topk"], dtype=torch.int32, device=device)


def _launch_topk_alone(inputs: _CaseInputs, centroids, case: dict, config) -> None:
    """The top-k kernel alone on precomputed centroids, into inputs.topk_buffer."""
    from flashmoba.ops import router

    seqlen = case["seqlen"]
    router._launch_route(
        inputs.q_packed,
        centroids,
        inputs.topk_buffer,
        inputs.cu_seqlens,
        inputs.cu_seqlens,
        case["batch"],
        0,
        0,
        seqlen,
        seqlen,
        case["block_size"],
        case["topk"],
        case["causal"],
        is_varlen=True,
        config=config,
    )


def _new_row(base: dict, overrides: dict, config: dict, running_topk: int) -> dict:
    return dict(
        base,
        config_name=config_name(overrides),
        overrides=overrides,
        config=config,
        running_topk=running_topk,
        is_default=not overrides,
        status=None,
        error=None,
        selection=None,
        route_ms=None,
        centroid_ms=None,
        topk_ms=None,
        topk_error=None,
        route_tflops=None,
        topk_tflops=None,
    )


def sweep_case(
    case: dict,
    grid: list[dict],
    repeats: int,
    device: str,
    deadline: Deadline,
    route_fn=None,
    timer=None,
    on_row=None,
) -> list[dict]:
    """Rows of one (seqlen, block_size, topk) case: the default configuration, then each of the grid.

    route_fn(q, k, block_size, topk, causal, config) -> selection, config a ``KernelConfig`` (default
    flashmoba.ops.moba_select_triton); timer(fn, repeats) -> ms (default bench.time_cuda_ms on CUDA,
    wall-clock on CPU).
    """
    from flashmoba.ops import router

    route_fn = route_fn or _default_route
    timer = timer or (bench.time_cuda_ms if device == "cuda" else _time_wall_ms)
    seqlen, head_dim = case["seqlen"], case["head_dim"]
    block_size, topk, causal = case["block_size"], case["topk"], case["causal"]
    label = f"N {seqlen} B{block_size}/k{topk}"
    inputs = _CaseInputs(case, device)

    def route(config):
        return route_fn(inputs.q, inputs.k, block_size, topk, causal, config)

    def centroids_alone():
        return router.block_centroids_varlen(inputs.k_packed, inputs.cu_seqlens, seqlen, block_size)

    base = dict(card=bench.card_name(), **{key: case[key] for key in CASE_FIELDS}, repeats=repeats)
    rows: list[dict] = []
    default_selection = None
    centroids = None
    centroid_ms = None
    for index, overrides in enumerate([{}] + list(grid)):
        name = config_name(overrides)
        if deadline.passed():
            log(f"[{deadline.elapsed():6.0f}s] {label}: --max-seconds reached, stopping before {name}")
            break
        config, running_topk = effective_config(head_dim, seqlen, block_size, topk, causal, overrides)
        kernel_config = router_config(overrides)
        row = _new_row(base, overrides, config, running_topk)
        reason = invalid_reason(config, running_topk)
        if reason is not None:
            row.update(status="invalid", error=reason)
        elif default_selection is None and overrides:
            row.update(status="error", error="no default selection to compare against")
        else:
            try:
                selection = route(kernel_config)  # compiles this configuration (untimed)
                if device == "cuda":
                    torch.cuda.synchronize()
                if default_selection is None:
                    default_selection = selection
                    row["selection"] = compare_selections(default_selection, selection)
                else:
                    row["selection"] = compare_selections(
                        default_selection, selection, sample=64, q=inputs.q, k=inputs.k, block_size=block_size
                    )
                del selection
                if not row["selection"]["equal"]:
                    row["status"] = "mismatch"
                else:
                    row["route_ms"] = timer(functools.partial(route, kernel_config), repeats)
                    row["status"] = "ok"
                    if centroid_ms is None:
                        centroid_ms = timer(centroids_alone, repeats)
                        centroids = centroids_alone()
                    row["centroid_ms"] = centroid_ms
                    _time_topk_alone(row, inputs, centroids, case, kernel_config, default_selection, timer)
            except Exception as error:  # noqa: BLE001 - compile/launch failures are results
                row.update(status="error", error=_error_text(error))
                if default_selection is None:
                    log(
                        f"[{deadline.elapsed():6.0f}s] {label}: the default configuration failed: "
                        f"{row['error']}"
                    )
        for field, tflops_field in (("route_ms", "route_tflops"), ("topk_ms", "topk_tflops")):
            if row[field] is not None:
                row[tflops_field] = bench.router_tflops(dict(row, route_ms=row[field]))
        rows.append(row)
        log(f"[{deadline.elapsed():6.0f}s] {label} [{index}/{len(grid)}] {name:<24} {_row_summary(row)}")
        if on_row is not None:
            on_row(row)
        if row["status"] == "error" and default_selection is None:
            break  # nothing to compare the grid against
    inputs = default_selection = centroids = None  # free the case's tensors before emptying the cache
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _time_topk_alone(row, inputs, centroids, case, kernel_config, default_selection, timer) -> None:
    """row["topk_ms"]: the top-k kernel alone, where it gives the routing call's selection; a private
    launcher, so a changed signature only drops this column (recorded in row["topk_error"])."""
    topk_alone = functools.partial(_launch_topk_alone, inputs, centroids, case, kernel_config)
    try:
        topk_alone()
        if torch.equal(inputs.topk_buffer.view_as(default_selection), default_selection):
            row["topk_ms"] = timer(topk_alone, row["repeats"])
        else:
            row["topk_error"] = "top-k alone gave another selection than the routing call"
    except Exception as error:  # noqa: BLE001 - a private launcher may change
        row["topk_error"] = _error_text(error)


def _row_summary(row: dict) -> str:
    if row["status"] == "ok":
        topk = "-" if row["topk_ms"] is None else f"{row['topk_ms']:.3f} ms ({row['topk_tflops']:.0f} TF/s)"
        return (
            f"ok  route {row['route_ms']:.3f} ms ({row['route_tflops']:.0f} TF/s)  top-k {topk}  "
            f"centroids {row['centroid_ms']:.3f} ms"
            + (f"  [{row['topk_error']}]" if row["topk_error"] else "")
        )
    if row["status"] == "mismatch":
        sel = row["selection"]
        spread = sel.get("swapped_score_spread")
        return (
            f"MISMATCH {sel['rows_differing']}/{sel['rows_total']} rows differ, "
            f"first {sel['first_difference']}"
            + ("" if spread is None else f", swapped-score spread {spread:.2e} of |score|")
        )
    return f"{row['status'].upper()}: {row['error']}"


def print_case_table(rows: list[dict]) -> None:
    """Default vs best (by the whole routing call) of one case, and the count of rejected configurations."""
    if not rows:
        return
    first = rows[0]
    print(
        f"\nN {first['seqlen']}, block {first['block_size']}, topk {first['topk']} ({first['card']}, "
        f"B {first['batch']} H {first['heads']} d {first['head_dim']} {first['dtype']}, causal)"
    )
    header = (
        f"{'':<8} {'config':<28} {'route ms':>9} {'TF/s':>6} {'top-k ms':>9} {'TF/s':>6} {'centr. ms':>9}"
    )
    print(header)
    print("-" * len(header))
    ok = [row for row in rows if row["status"] == "ok"]
    default = next((row for row in ok if row["is_default"]), None)
    best = min(ok, key=lambda row: row["route_ms"], default=None)

    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    for title, row in (("default", default), ("best", best)):
        if row is None:
            print(f"{title:<8} (none)")
            continue
        config = row["config"]
        text = (
            f"M{config['BLOCK_M']} N{config['BLOCK_N']} w{config['num_warps']} s{config['num_stages']} "
            f"f{int(config['FILTER'])} i{config['INSERT_ROUNDS']}"
        )
        print(
            f"{title:<8} {text:<28} {number(row['route_ms'], '.3f'):>9} "
            f"{number(row['route_tflops'], '.0f'):>6} "
            f"{number(row['topk_ms'], '.3f'):>9} {number(row['topk_tflops'], '.0f'):>6} "
            f"{number(row['centroid_ms'], '.3f'):>9}"
        )
    if default is not None and best is not None:
        print(
            f"default route ms / best route ms = {default['route_ms'] / best['route_ms']:.2f} "
            f"(best: {best['config_name']})"
        )
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print("configurations: " + ", ".join(f"{count} {status}" for status, count in sorted(counts.items())))
    for row in rows:
        if row["status"] in ("mismatch", "error"):
            print(f"  {row['status']:<8} {row['config_name']}: {_row_summary(row)}")


def _versions() -> dict:
    versions = dict(python=platform.python_version(), torch=torch.__version__)
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return versions


def run_sweep(
    cases: list[dict],
    grid: list[dict],
    repeats: int | None,
    device: str,
    out: Path | None,
    max_seconds: float | None,
    args_record: dict,
    route_fn=None,
) -> dict:
    deadline = Deadline(max_seconds)
    result = dict(
        card=bench.card_name(),
        **_versions(),
        args=args_record,
        tflops_formula="bench.router_tflops: 2*batch*heads*head_dim*seqlen*(seqlen/block_size)/2",
        complete=False,
        rows=[],
    )

    def write():
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))

    for number, case in enumerate(cases, 1):
        if deadline.passed():
            log(
                f"[{deadline.elapsed():6.0f}s] --max-seconds reached: "
                f"{len(cases) - number + 1} case(s) not run"
            )
            break
        case_repeats = repeats or _default_repeats(case["seqlen"])
        log(
            f"[{deadline.elapsed():6.0f}s] case {number}/{len(cases)}: N {case['seqlen']} "
            f"block {case['block_size']} "
            f"topk {case['topk']}, {len(grid)} grid configs, {case_repeats} repeats"
        )

        def on_row(row):
            result["rows"].append(row)
            write()

        try:
            rows = sweep_case(case, grid, case_repeats, device, deadline, route_fn=route_fn, on_row=on_row)
        except torch.OutOfMemoryError as error:  # inputs of this case do not fit: report, go on
            log(f"[{deadline.elapsed():6.0f}s] case {number}: out of memory ({_error_text(error)})")
            result["rows"].append(dict(card=result["card"], **case, status="error", error=_error_text(error)))
            write()
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        print_case_table(rows)
        sys.stdout.flush()
    result["complete"] = not deadline.stopped
    result["elapsed_s"] = deadline.elapsed()
    write()
    return result


def self_check(out: Path | None) -> int:
    """No CUDA: the sweep on a tiny case in Triton's interpreter; every configuration must match."""
    log(
        "router_sweep: no CUDA device here; the sweep needs one. Running a tiny self-check on CPU in "
        "Triton's "
        f"interpreter instead ({SELF_CHECK}, {len(SELF_CHECK_GRID)} configurations)."
    )
    os.environ["TRITON_INTERPRET"] = "1"  # before flashmoba.ops imports triton's kernels
    case = dict(SELF_CHECK, dtype="bf16", causal=True)
    result = run_sweep([case], SELF_CHECK_GRID, 1, "cpu", out, None, dict(self_check=True))
    rows = result["rows"]
    ok = [row for row in rows if row["status"] == "ok"]
    distinct = {json.dumps(row["config"], sort_keys=True) for row in ok}
    passed = len(ok) == 1 + len(SELF_CHECK_GRID) and len(distinct) == len(ok)
    log(
        f"self-check {'passed' if passed else 'FAILED'}: {len(ok)}/{len(rows)} configurations ran and "
        "matched the "
        f"default's selection ({len(distinct)} distinct configurations)"
    )
    return 0 if passed else 1


def count_paths(cases: list[dict], device: str) -> list[dict]:
    """The default configuration's tile update paths per case (router.count_topk_paths), printed as a
    table."""
    from flashmoba.ops import router

    rows = []
    log(f"{'case':<22} {'tiles':>12} {'skipped':>8} {'inserted':>9} {'merged':>7} {'rounds/insert':>14}")
    for case in cases:
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (case["batch"], case["seqlen"], case["heads"], case["head_dim"])
        q, k = (
            torch.randn(*shape, device=device, dtype=DTYPES[case["dtype"]], generator=generator)
            for _ in range(2)
        )
        counts = router.count_topk_paths(q, k, case["block_size"], case["topk"], case["causal"])
        counts.pop("selected")
        rows.append(dict(case, **counts))
        tiles = max(1, counts["tiles"])
        log(
            f"{'N ' + str(case['seqlen']) + ' B' + str(case['block_size']) + '/k' + str(case['topk']):<22} "
            f"{counts['tiles']:>12} {counts['skipped'] / tiles:>8.1%} {counts['inserted'] / tiles:>9.1%} "
            f"{counts['merged'] / tiles:>7.1%} "
            f"{counts['insertion_rounds'] / max(1, counts['inserted']):>14.2f}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=_parse_ints, default=[8192, 65536, 524288])
    parser.add_argument(
        "--blocks",
        type=_parse_blocks,
        default=_parse_blocks("128:8,64:16,32:32"),
        help="block_size:topk pairs, comma separated (default 128:8,64:16,32:32)",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per measurement (default 20 up to 64K, 5 up to 128K, then 3)",
    )
    parser.add_argument(
        "--grid",
        choices=("small", "full", "insert"),
        default="small",
        help=f"small: {len(SMALL_GRID)} configs; full: BLOCK_M x BLOCK_N in {{32,64,128}}, "
        "num_warps {4,8}, num_stages {2,3} (36); insert: INSERT_ROUNDS 2-64 "
        f"({len(INSERT_GRID)})",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=540,
        help="stop between configurations after this many seconds, still writing results "
        "(default 540, for a 10-minute command; 0: no limit)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default benchmarks/results/router_sweep_<card>.json; "
        "the CPU self-check writes only when given)",
    )
    parser.add_argument(
        "--count-paths",
        action="store_true",
        help="only count the default configuration's tile update paths per case (no timing)",
    )
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        if args.count_paths:  # a small case through the interpreter
            os.environ["TRITON_INTERPRET"] = "1"  # before flashmoba.ops imports triton's kernels
            count_paths([dict(SELF_CHECK, dtype="bf16", causal=True)], "cpu")
        return self_check(args.out)

    grid = {"small": SMALL_GRID, "insert": INSERT_GRID}.get(args.grid) or full_grid()
    cases = [
        dict(
            batch=args.batch,
            seqlen=seqlen,
            heads=args.heads,
            head_dim=args.head_dim,
            dtype=args.dtype,
            block_size=block_size,
            topk=topk,
            causal=True,
        )
        for seqlen in args.seqlens
        for block_size, topk in args.blocks
    ]
    if args.count_paths:
        rows = count_paths(cases, "cuda")
        if args.out:
            args.out.write_text(json.dumps(dict(card=bench.card_name(), rows=rows), indent=1))
        return 0
    out = args.out or Path("benchmarks/results") / f"router_sweep_{bench._file_stem(bench.card_name())}.json"
    record = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    log(
        f"router_sweep on {bench.card_name()}: {len(cases)} cases x (default + {len(grid)} configs), "
        f"results in {out}"
    )
    result = run_sweep(cases, grid, args.repeats, "cuda", out, args.max_seconds, record)
    log(
        f"\n{'complete' if result['complete'] else 'INCOMPLETE (--max-seconds)'}: "
        f"{len(result['rows'])} rows in "
        f"{result['elapsed_s']:.0f} s -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
