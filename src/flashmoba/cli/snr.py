"""``flashmoba snr``: the router's signal-to-noise model against Monte-Carlo simulation and exact computation.

The model, the simulator and the measurement are ``flashmoba.snr``; this module is the command around them.

Two modes:

- ``flashmoba snr [options]`` (or ``flashmoba snr simulate``): tables of the paper's predictions against
  simulated rates over head_dim x block_size x m, where the Gaussian approximation breaks and by how much,
  and a plot (``--out``).
- ``flashmoba snr measure FILE [options]``: the model's quantities on the q and k of a real attention
  layer (saved with ``torch.save``), predicted against measured router recall. ``--synthetic`` makes q and
  k with a planted needle instead of reading a file.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashmoba import snr as model
from flashmoba.cli._flags import device as device_flag
from flashmoba.cli._flags import int_at_least, ints_at_least, real
from flashmoba.data import TASKS

# Extra small sizes for the exact tail scan: they show where the Gaussian step really breaks.
EXTRA_HEAD_DIMS = (8, 16)
EXTRA_BLOCK_SIZES = (1, 2, 4, 8)
TAIL_PROBABILITIES = (1e-2, 1e-4, 1e-6)
# A relative error of Phi(-SNR) beyond this counts as "broken" in the verdicts.
BREAK_TOLERANCE = 0.10
# The synthetic measurement's sequences: this many blocks of --block-size keys.
_SYNTHETIC_BLOCKS = 32
# Cells need this many expected failures before their relative deviation is quoted.
MIN_EXPECTED_FAILURES = 25


_int_list = ints_at_least(1)
_nonnegative_list = ints_at_least(0)
_positive = int_at_least(1)
_nonnegative = int_at_least(0)
_mean = real()  # a mean dot product; --law sphere further needs [-1, 1] (checked after parsing)


def _simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmoba snr",
        description="The paper's router SNR model (SNR = dmu_eff sqrt(d / 2B), p_fail = Phi(-SNR)) against "
        "Monte-Carlo simulation of unit-vector queries and keys, and against the exact unit-vector failure "
        "rate. Use 'flashmoba snr measure --help' for measurements on real q/k.",
    )
    parser.add_argument("--out", default="snr.png", help="path of the plot (PNG); default snr.png")
    parser.add_argument(
        "--law",
        choices=model.DOT_PRODUCT_LAWS,
        default="sphere",
        help="dot products: sphere = unit vectors (default), gaussian = the paper's assumptions",
    )
    parser.add_argument(
        "--mu-signal", type=_mean, default=0.5, help="mean q.k of the signal key (default 0.5)"
    )
    parser.add_argument(
        "--mu-cluster",
        type=_mean,
        default=0.1,
        help="mean q.k of the m-1 clustered keys of the signal block (default 0.1)",
    )
    parser.add_argument("--mu-noise", type=_mean, default=0.0, help="mean q.k of a noise key (default 0)")
    parser.add_argument(
        "--head-dims", type=_int_list, default=[32, 64, 128, 256], help="default 32,64,128,256"
    )
    parser.add_argument(
        "--block-sizes",
        type=_int_list,
        default=[16, 32, 64, 128, 256, 512],
        help="default 16,32,64,128,256,512",
    )
    parser.add_argument(
        "--ms", type=_int_list, default=[1, 2, 4, 8], help="clustered keys m; default 1,2,4,8"
    )
    parser.add_argument(
        "--trials",
        type=_positive,
        default=20000,
        help="pairwise trials at the smallest block size; a block k times larger gets 1/k of "
        "them (every cell draws about as many dot products), at least --min-trials",
    )
    parser.add_argument("--min-trials", type=_positive, default=1000, help="fewest pairwise trials of a cell")
    parser.add_argument(
        "--retrieval-trials", type=_positive, default=400, help="top-k trials per cell (default 400)"
    )
    parser.add_argument(
        "--seq-len", type=_positive, default=4096, help="keys N of the top-k simulation (default 4096)"
    )
    parser.add_argument(
        "--density",
        type=real(exclusive_minimum=0.0, maximum=1.0),
        default=0.125,
        help="fraction of blocks selected in the top-k simulation, k = density * N / B "
        "(default 1/8, the paper's 7/8 sparsity)",
    )
    parser.add_argument("--seed", type=_nonnegative, default=0)
    return parser


def _measure_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmoba snr measure",
        description="Estimate mu_signal, mu_noise, sigma^2 and delta_mu_eff on real q/k with a planted "
        "needle and compare the router recall the SNR model predicts with the recall of "
        "flashmoba.moba_select. FILE is a torch.save'd dict {'q': [batch, T, Hq, D], "
        "'k': [batch, T, Hkv, D], 'needle_positions': [...], "
        "'query_positions': [...]} (optionally 'signal_positions', 'block_size', 'topk'), or a dict of such "
        "dicts / (q, k) pairs per layer (as flashmoba.snr.capture_qk returns). Flags override the file.",
    )
    parser.add_argument("file", nargs="?", help="the .pt file (omit with --synthetic or --checkpoint)")
    parser.add_argument(
        "--checkpoint",
        help="a flashmoba train checkpoint (file or run directory): capture q/k of its MoBA layers on "
        "S-NIAH samples and measure there (needle: the value's tokens; query: the token before the answer)",
    )
    parser.add_argument(
        "--task", default="niah1", choices=TASKS, help="--checkpoint: the retrieval task of the samples"
    )
    parser.add_argument(
        "--length", type=_positive, help="--checkpoint: sample length (default: the training length)"
    )
    parser.add_argument("--samples", type=_positive, default=8, help="--checkpoint: samples (needle depths)")
    parser.add_argument(
        "--device", type=device_flag, default="cpu", help="--checkpoint: device to run the model on"
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="measure synthetic unit-vector q/k with a planted needle instead of a file",
    )
    parser.add_argument(
        "--block-size", type=_positive, help="router block size (default: the file's, else 64)"
    )
    parser.add_argument(
        "--topk", type=_positive, help="router topk, own block included (default: the file's, else 4)"
    )
    parser.add_argument("--needle", type=_nonnegative_list, help="needle key positions, comma-separated")
    parser.add_argument("--queries", type=_nonnegative_list, help="answer query positions, comma-separated")
    parser.add_argument(
        "--signal", type=_nonnegative, help="the signal key's position (default: the best needle key)"
    )
    parser.add_argument("--layer", help="measure only this layer of a per-layer file")
    parser.add_argument("--non-causal", action="store_true", help="non-causal router")
    parser.add_argument(
        "--cosine",
        type=real(minimum=-1.0, maximum=1.0),
        default=0.3,
        help="--synthetic: the needle keys' cosine to q",
    )
    parser.add_argument("--seed", type=_nonnegative, default=0, help="--synthetic, --checkpoint: random seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "measure":
        parser = _measure_parser()
        args = parser.parse_args(argv[1:])
        _check_measure_args(parser, args)
        return _measure(args, parser)
    if argv and argv[0] == "simulate":
        argv = argv[1:]
    parser = _simulate_parser()
    args = parser.parse_args(argv)
    _check_simulate_args(parser, args)
    return _simulate(args)


# ----------------------------------------------------------------------------------------------------
# simulate
# ----------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    head_dim: int
    block_size: int
    m: int
    result: model.RouterSimulation
    exact: float  # failure probability for unit vectors without the Gaussian step (NaN for the Gaussian law)
    flagged: bool  # prediction outside the Bonferroni-corrected interval


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; a prediction that underflows to 0 gives inf (or NaN for 0 / 0), not an
    exception."""
    if denominator != 0:
        return numerator / denominator
    return math.nan if numerator == 0 else math.inf


def _pairwise_trials(args, block_size: int) -> int:
    return max(args.min_trials, args.trials * min(args.block_sizes) // block_size)


def _check_simulate_args(parser: argparse.ArgumentParser, args) -> None:
    """What one flag alone cannot say (each flag's own range is its argparse ``type``)."""
    if args.law == "sphere":
        for flag in ("mu_signal", "mu_cluster", "mu_noise"):
            value = getattr(args, flag)
            if not -1.0 <= value <= 1.0:
                parser.error(
                    f"argument --{flag.replace('_', '-')}: must lie in [-1, 1] with --law sphere "
                    f"(a mean cosine of unit vectors), got {value}"
                )
        if min(args.head_dims) < 3:
            parser.error(f"argument --head-dims: must be >= 3 with --law sphere, got {min(args.head_dims)}")
    _check_plot_path(parser, args.out)
    if max(args.ms) > min(args.block_sizes):
        parser.error(
            f"argument --ms: must be <= the smallest of --block-sizes ({min(args.block_sizes)}), "
            f"got {max(args.ms)}"
        )
    if args.seq_len < 2 * max(args.block_sizes):
        parser.error(
            "argument --seq-len: must hold two blocks of the largest of --block-sizes "
            f"(>= {2 * max(args.block_sizes)}), got {args.seq_len}"
        )


def _check_plot_path(parser: argparse.ArgumentParser, out: str) -> None:
    """The plot is written last: a path it cannot be written to must fail before the simulation."""
    path = Path(out)
    if path.is_dir():
        parser.error(f"argument --out: must be a file path, got the directory {out!r}")
    if not path.parent.is_dir():
        parser.error(f"argument --out: its directory {str(path.parent)!r} does not exist, got {out!r}")
    suffix = path.suffix.removeprefix(".").lower()
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:  # the plot step reports the missing matplotlib itself
        return
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        parser.error(f"argument --out: must end in an image format {tuple(sorted(formats))}, got {out!r}")


def _simulate(args) -> int:
    started = time.perf_counter()
    mu = {"mu_signal": args.mu_signal, "mu_cluster": args.mu_cluster, "mu_noise": args.mu_noise}
    law_text = {
        "sphere": "unit vectors: q.k = mean + cosine of two uniform unit vectors in d dims (variance 1/d)",
        "gaussian": "Gaussian q.k with variance 1/d (the paper's assumptions hold exactly)",
    }[args.law]
    print("flashmoba snr: the router's SNR model (paper section 2) against simulation")
    print(f"dot products: {law_text}")
    print(
        f"means: mu_signal {args.mu_signal}, mu_cluster {args.mu_cluster}, mu_noise {args.mu_noise}; "
        f"seed {args.seed}"
    )

    cells = _pairwise_table(args, mu)
    tails = _tail_scan(args)
    retrieval = _retrieval_table(args, mu)
    fixed_angle = _fixed_angle_table(args, mu)
    _plot(args, cells, tails, retrieval, fixed_angle)
    print(f"\nplot written to {args.out}; {time.perf_counter() - started:.1f} s")
    return 0


def _pairwise_table(args, mu) -> list[Cell]:
    num_cells = len(args.head_dims) * len(args.block_sizes) * len(args.ms)
    # Bonferroni: one flag among all cells is a false alarm with probability <= 5%.
    strict = 1 - 0.05 / num_cells
    print("\n1. Pairwise failure: P(a pure-noise block outscores the signal block), predicted Phi(-SNR)")
    print(
        f"   exact = the unit-vector rate without the Gaussian step; 95% Wilson intervals; '*' = Phi(-SNR) "
        f"outside the {strict:.2%} interval (Bonferroni over {num_cells} cells)"
    )
    print(
        f"{'d':>5} {'B':>4} {'m':>2} {'dmu_eff':>7} {'SNR':>6} {'Phi(-SNR)':>10} {'exact':>10} "
        f"{'simulated':>10} {'[95% interval]':>22} {'trials':>6} {'sim/pred':>8} {'z':>6}"
    )
    cells = []
    seed = args.seed
    for d in args.head_dims:
        for b in args.block_sizes:
            for m in args.ms:
                seed += 1
                cells.append(_pairwise_cell(args, mu, d, b, m, seed, strict))
                _print_pairwise_row(cells[-1])
    _pairwise_verdict(cells, strict)
    return cells


def _pairwise_cell(args, mu, d: int, b: int, m: int, seed: int, strict: float) -> Cell:
    """One simulated cell, its exact unit-vector rate, and whether Phi(-SNR) leaves the strict interval."""
    result = model.simulate_router(d, b, m=m, trials=_pairwise_trials(args, b), law=args.law, seed=seed, **mu)
    exact = (
        float(model.sphere_failure_probability(result.delta_mu_eff, d, b))
        if args.law == "sphere"
        else float("nan")
    )
    low, high = model.wilson_interval(result.failures, result.trials, strict)
    flagged = not low <= result.predicted_failure <= high
    return Cell(d, b, m, result, exact, flagged)


def _print_pairwise_row(cell: Cell) -> None:
    result, predicted = cell.result, cell.result.predicted_failure
    z = (result.failure_rate - predicted) / math.sqrt(
        max(predicted * (1 - predicted), 1e-300) / result.trials
    )
    low95, high95 = result.failure_interval
    print(
        f"{cell.head_dim:>5} {cell.block_size:>4} {cell.m:>2} {result.delta_mu_eff:>7.3f} {result.snr:>6.3f} "
        f"{predicted:>10.3e} {cell.exact:>10.3e} {result.failure_rate:>10.3e} [{low95:.3e}, {high95:.3e}] "
        f"{result.trials:>6} {_ratio(result.failure_rate, predicted):>8.3f} {z:>6.2f}"
        f"{' *' if cell.flagged else ''}"
    )


def _pairwise_verdict(cells: list[Cell], strict: float) -> None:
    flagged = [cell for cell in cells if cell.flagged]
    print(
        f"\n   {len(cells) - len(flagged)} of {len(cells)} cells agree with Phi(-SNR) "
        f"(prediction inside the {strict:.2%} interval)."
    )
    for cell in flagged:
        r = cell.result
        print(
            f"   disagrees: d={cell.head_dim} B={cell.block_size} m={cell.m}: "
            f"simulated {r.failure_rate:.3e} vs Phi(-SNR) {r.predicted_failure:.3e} "
            f"({_ratio(r.failure_rate, r.predicted_failure) - 1:+.1%}); "
            f"exact {cell.exact:.3e}"
        )
    outside = sum(
        not c.result.failure_interval[0] <= c.result.predicted_failure <= c.result.failure_interval[1]
        for c in cells
    )
    print(
        f"   {outside} of {len(cells)} cells have Phi(-SNR) outside their 95% interval "
        f"(about {0.05 * len(cells):.0f} expected by chance alone)."
    )
    measurable = [c for c in cells if c.result.predicted_failure * c.result.trials >= MIN_EXPECTED_FAILURES]
    if measurable:
        worst = max(measurable, key=lambda c: abs(c.result.failure_rate / c.result.predicted_failure - 1))
        r = worst.result
        low, high = r.failure_interval
        print(
            f"   Largest relative deviation among the {len(measurable)} cells with "
            f">= {MIN_EXPECTED_FAILURES} expected failures: {r.failure_rate / r.predicted_failure - 1:+.1%} "
            f"at d={worst.head_dim} "
            f"B={worst.block_size} m={worst.m} (95% interval {low / r.predicted_failure - 1:+.1%} to "
            f"{high / r.predicted_failure - 1:+.1%})."
        )
    clipped = max(c.result.clipped_fraction for c in cells)
    if clipped > 0:
        print(f"   Unit vectors: at most {clipped:.2e} of a cell's dot products were clipped to [-1, 1].")


def _tail_scan(args) -> dict:
    """Exact unit-vector failure rate / Phi(-SNR) - 1 at the gaps where Phi(-SNR) = p; no sampling noise."""
    head_dims = sorted(set(EXTRA_HEAD_DIMS) | set(args.head_dims))
    block_sizes = sorted(set(EXTRA_BLOCK_SIZES) | set(args.block_sizes))
    head_dims = [d for d in head_dims if d >= 3]
    errors = {p: _tail_errors(p, head_dims, block_sizes) for p in TAIL_PROBABILITIES}
    print("\n2. Where the Gaussian approximation breaks: exact unit-vector failure rate / Phi(-SNR) - 1,")
    print("   at the delta_mu_eff that makes Phi(-SNR) = p (numerical convolution of the cosine law, no")
    print(
        "   sampling noise; negative = Phi(-SNR) overstates failures: unit-vector cosines have light tails)"
    )
    for p, table in errors.items():
        print(f"   p = {p:.0e}")
        print("   " + "d \\ B".rjust(6) + " " + " ".join(f"{b:>6}" for b in block_sizes))
        for i, d in enumerate(head_dims):
            print(f"   {d:>6} " + " ".join(f"{value:>+6.0%}" for value in table[i]))
    print(f"   Verdict (broken = more than {BREAK_TOLERANCE:.0%} off):")
    for p, table in errors.items():
        print(f"   p = {p:.0e}: {_tail_verdict(args, table, head_dims, block_sizes)}.")
    return {"head_dims": head_dims, "block_sizes": block_sizes, "errors": errors}


def _tail_errors(p: float, head_dims: list[int], block_sizes: list[int]) -> np.ndarray:
    """[head_dims, block_sizes]: exact / Phi(-SNR) - 1 at the gap where Phi(-SNR) = p."""
    table = np.zeros((len(head_dims), len(block_sizes)))
    target_snr = float(model.normal_ppf(1 - p))
    for i, d in enumerate(head_dims):
        for j, b in enumerate(block_sizes):
            gap = target_snr / math.sqrt(d / (2 * b))
            table[i, j] = float(model.sphere_failure_probability(gap, d, b)) / p - 1
    return table


def _tail_verdict(args, table: np.ndarray, head_dims: list[int], block_sizes: list[int]) -> str:
    """Where the relative error passes BREAK_TOLERANCE, and the worst cell on the simulated grid."""
    broken = [
        (d, b)
        for i, d in enumerate(head_dims)
        for j, b in enumerate(block_sizes)
        if abs(table[i, j]) > BREAK_TOLERANCE
    ]
    grid = [
        (i, j)
        for i, d in enumerate(head_dims)
        for j, b in enumerate(block_sizes)
        if d in args.head_dims and b in args.block_sizes
    ]
    if broken:
        largest_db = max(d * b for d, b in broken)
        worst_d, worst_b = np.unravel_index(int(np.argmax(np.abs(table))), table.shape)
        where = (
            f"broken at {len(broken)} of {table.size} (d, B) pairs, all with d*B <= {largest_db}; "
            f"worst {table[worst_d, worst_b]:+.0%} at d={head_dims[worst_d]}, B={block_sizes[worst_b]}"
        )
    else:
        where = "never broken"
    if grid:
        worst_i, worst_j = max(grid, key=lambda ij: abs(table[ij]))
        where += (
            f"; on the simulated grid the worst is {table[worst_i, worst_j]:+.1%} "
            f"(d={head_dims[worst_i]}, B={block_sizes[worst_j]})"
        )
    return where


def _retrieval_table(args, mu) -> list[model.RouterSimulation]:
    m = min(args.ms)
    print(
        f"\n3. Top-k retrieval of the signal block among n = N/B blocks, N = {args.seq_len}, "
        f"k = {args.density:g} n, m = {m}"
    )
    print(
        "   predicted = the model's order-statistic integral (retrieval_probability); the paper's rule calls "
        "retrieval reliable when SNR > Phi^-1(1 - k/n)"
    )
    print(
        f"{'d':>5} {'B':>4} {'n':>4} {'k':>3} {'SNR':>6} {'needed':>6} {'rule':>5} {'predicted':>9} "
        f"{'simulated':>9} {'[95% interval]':>16}"
    )
    results = []
    seed = args.seed + 100_000
    for d in args.head_dims:
        for b in args.block_sizes:
            seed += 1
            n = args.seq_len // b
            k = max(1, round(args.density * n))
            result = model.simulate_router(
                d, b, m=m, num_blocks=n, topk=k, trials=args.retrieval_trials, law=args.law, seed=seed, **mu
            )
            results.append(result)
            needed = float(model.required_snr(k, n))
            low, high = result.retrieval_interval
            print(
                f"{d:>5} {b:>4} {n:>4} {k:>3} {result.snr:>6.3f} {needed:>6.3f} "
                f"{'yes' if result.snr > needed else 'no':>5} {result.predicted_retrieval:>9.3f} "
                f"{result.retrieval_rate:>9.3f} [{low:.3f}, {high:.3f}]"
            )
    inside = sum(r.retrieval_interval[0] <= r.predicted_retrieval <= r.retrieval_interval[1] for r in results)
    print(
        f"\n   {inside} of {len(results)} predictions inside the 95% interval (about 95% expected by chance)."
    )
    _print_retrieval_at_threshold(args)
    return results


def _print_retrieval_at_threshold(args) -> None:
    """What the paper's threshold promises: the model's retrieval probability exactly at
    SNR = Phi^-1(1 - k/n)."""
    at_rule = []
    for b in args.block_sizes:
        n = args.seq_len // b
        k = max(1, round(args.density * n))
        needed = float(model.required_snr(k, n))
        if math.isfinite(needed):
            gap = needed / math.sqrt(args.head_dims[0] / (2 * b))
            at_rule.append((b, n, k, float(model.retrieval_probability(gap, args.head_dims[0], b, k, n))))
    if at_rule:
        text = ", ".join(f"{p:.2f} (n={n}, k={k})" for _, n, k, p in at_rule)
        print(
            f"   At the paper's threshold SNR = Phi^-1(1 - k/n) the model retrieves the signal block with "
            f"probability {text}: the pairwise rule p_fail < k/n marks the middle of the transition, "
            f"not reliability."
        )


def _fixed_angle_table(args, mu) -> list[model.RouterSimulation]:
    d = 64 if 64 in args.head_dims else args.head_dims[0]
    ms = sorted({min(args.ms), max(args.ms)})
    print(f"\n4. Assumption 3 broken: the m planted keys at a fixed angle to q (no spread), d = {d}")
    print(f"{'B':>5} {'m':>2} {'Phi(-SNR)':>10} {'simulated':>10} {'[95% interval]':>22} {'sim/pred':>8}")
    results = []
    seed = args.seed + 200_000
    for m in ms:
        for b in args.block_sizes:
            seed += 1
            result = model.simulate_router(
                d, b, m=m, trials=_pairwise_trials(args, b), law=args.law, planted_std=0.0, seed=seed, **mu
            )
            results.append(result)
            low, high = result.failure_interval
            print(
                f"{b:>5} {m:>2} {result.predicted_failure:>10.3e} {result.failure_rate:>10.3e} "
                f"[{low:.3e}, {high:.3e}] {_ratio(result.failure_rate, result.predicted_failure):>8.3f}"
            )
    comparable = [r for r in results if r.predicted_failure > 0]
    if comparable:
        worst = min(comparable, key=lambda r: r.failure_rate / r.predicted_failure)
        where = (
            f": simulated/predicted = {worst.failure_rate / worst.predicted_failure:.2f} "
            f"at B={worst.block_size}, m={worst.m}."
        )
    else:
        where = " (here Phi(-SNR) underflows to 0 in every cell)."
    print(
        "   The model gives every planted key variance 1/d; without it the signal block varies less, so "
        "Phi(-SNR) overstates failures most when m/B is large" + where
    )
    return results


def _plot(args, cells, tails, retrieval, fixed_angle) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 9.5))
    colors = {d: plt.cm.viridis(i / max(1, len(args.head_dims) - 1)) for i, d in enumerate(args.head_dims)}
    _plot_pairwise(axes[0, 0], args, cells, colors)
    _plot_tails(axes[0, 1], tails, plt.cm.plasma)
    _plot_retrieval(axes[1, 0], args, retrieval, colors)
    _plot_fixed_angle(axes[1, 1], fixed_angle)
    figure.suptitle(
        f"Router SNR model: mu_signal={args.mu_signal}, mu_cluster={args.mu_cluster}, "
        f"mu_noise={args.mu_noise}"
    )
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    plt.close(figure)


def _plot_pairwise(axis, args, cells: list[Cell], colors: dict) -> None:
    for d in args.head_dims:
        chosen = [c for c in cells if c.head_dim == d and c.result.failures > 0]
        if not chosen:
            continue
        predicted = np.array([c.result.predicted_failure for c in chosen])
        rate = np.array([c.result.failure_rate for c in chosen])
        low = np.array([c.result.failure_interval[0] for c in chosen])
        high = np.array([c.result.failure_interval[1] for c in chosen])
        axis.errorbar(
            predicted, rate, yerr=[rate - low, high - rate], fmt="o", ms=3, color=colors[d], label=f"d={d}"
        )
    positive = [c.result.predicted_failure for c in cells if c.result.predicted_failure > 0]
    limits = [min(positive, default=1e-6) / 2, 0.6]  # a prediction can underflow to 0 at a huge SNR
    axis.plot(limits, limits, "k--", lw=1, label="simulated = Phi(-SNR)")
    axis.set(
        xscale="log",
        yscale="log",
        xlabel="predicted Phi(-SNR)",
        ylabel="simulated failure rate",
        title=f"1. pairwise failure ({args.law} law), 95% Wilson intervals",
    )
    axis.legend(fontsize=8)


def _plot_tails(axis, tails: dict, colormap) -> None:
    for i, d in enumerate(tails["head_dims"]):
        color = colormap(0.9 * i / max(1, len(tails["head_dims"]) - 1))
        for p, style in zip(TAIL_PROBABILITIES, ("-", "--", ":")):
            axis.plot(
                tails["block_sizes"],
                100 * tails["errors"][p][i],
                style,
                color=color,
                label=f"d={d}" if p == TAIL_PROBABILITIES[0] else None,
            )
    axis.axhline(-100 * BREAK_TOLERANCE, color="gray", lw=0.8)
    axis.set(
        xscale="log",
        xlabel="block size B",
        ylabel="exact / Phi(-SNR) - 1  (%)",
        ylim=(-100, 5),
        title="2. Gaussian step, unit vectors: - p=1e-2, -- 1e-4, : 1e-6",
    )
    axis.set_xscale("log", base=2)
    axis.legend(fontsize=8)


def _plot_retrieval(axis, args, retrieval: list[model.RouterSimulation], colors: dict) -> None:
    for d in args.head_dims:
        chosen = [r for r in retrieval if r.head_dim == d]
        sizes = [r.block_size for r in chosen]
        axis.plot(
            sizes, [r.predicted_retrieval for r in chosen], "-", color=colors[d], label=f"d={d} predicted"
        )
        rate = np.array([r.retrieval_rate for r in chosen])
        low = np.array([r.retrieval_interval[0] for r in chosen])
        high = np.array([r.retrieval_interval[1] for r in chosen])
        axis.errorbar(sizes, rate, yerr=[rate - low, high - rate], fmt="o", ms=3, color=colors[d])
    axis.set(
        xlabel="block size B",
        ylabel="P(signal block in top-k)",
        ylim=(0, 1.02),
        title=f"3. top-k retrieval, N={args.seq_len}, k={args.density:g} n (points: simulated)",
    )
    axis.set_xscale("log", base=2)
    axis.legend(fontsize=8)


def _plot_fixed_angle(axis, fixed_angle: list[model.RouterSimulation]) -> None:
    plotted = False
    for m, marker in zip(sorted({r.m for r in fixed_angle}), ("o", "s")):
        chosen = [r for r in fixed_angle if r.m == m and r.predicted_failure > 0]  # 0: underflow at huge SNR
        if not chosen:
            continue
        sizes = np.array([r.block_size for r in chosen])
        ratio = np.array([r.failure_rate / r.predicted_failure for r in chosen])
        low = np.array([r.failure_interval[0] / r.predicted_failure for r in chosen])
        high = np.array([r.failure_interval[1] / r.predicted_failure for r in chosen])
        axis.errorbar(sizes, ratio, yerr=[ratio - low, high - ratio], fmt=marker + "-", ms=4, label=f"m={m}")
        plotted = True
    axis.set(
        xlabel="block size B",
        ylabel="simulated / Phi(-SNR)",
        title=f"4. planted keys at a fixed angle (d={fixed_angle[0].head_dim})",
    )
    if not plotted:
        axis.text(0.5, 0.5, "Phi(-SNR) underflows to 0 in every cell", ha="center", transform=axis.transAxes)
        return
    axis.axhline(1.0, color="k", ls="--", lw=1)
    axis.set_xscale("log", base=2)
    axis.legend(fontsize=8)


# ----------------------------------------------------------------------------------------------------
# measure
# ----------------------------------------------------------------------------------------------------


def _check_measure_args(parser: argparse.ArgumentParser, args) -> None:
    """What one flag alone cannot say; checked before any file or model is read."""
    import torch

    if [args.synthetic, args.file is not None, args.checkpoint is not None].count(True) != 1:
        parser.error("give one of FILE, --synthetic or --checkpoint")
    if args.file is not None and not Path(args.file).is_file():
        parser.error(f"argument file: no such file, got {args.file!r}")
    if args.checkpoint is not None:
        from flashmoba.models.checkpoint import find_checkpoint

        try:
            find_checkpoint(args.checkpoint)
        except ValueError as error:
            parser.error(f"argument --checkpoint: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: CUDA is not available here, got {str(args.device)!r}")
    if args.device.type == "cuda" and (args.device.index or 0) >= torch.cuda.device_count():
        parser.error(
            f"argument --device: only {torch.cuda.device_count()} CUDA devices, got {str(args.device)!r}"
        )
    if args.synthetic:
        seqlen = _SYNTHETIC_BLOCKS * (64 if args.block_size is None else args.block_size)
        _check_flag_positions(parser, args, seqlen, seqlen, "with --synthetic")


def _check_flag_positions(parser, args, seqlen_k: int, seqlen_q: int, where: str) -> None:
    """--needle and --signal index keys, --queries queries: each must lie in its sequence."""
    for flag, positions, length in (
        ("--needle", args.needle, seqlen_k),
        ("--queries", args.queries, seqlen_q),
        ("--signal", None if args.signal is None else [args.signal], seqlen_k),
    ):
        outside = [p for p in positions or [] if p >= length]
        if outside:
            parser.error(f"argument {flag}: must be < {length} ({where}), got {outside[0]}")


def _measure(args, parser: argparse.ArgumentParser) -> int:
    if args.checkpoint is not None:
        layers = _layers_from_checkpoint(args, parser)
    elif args.synthetic:
        layers = _synthetic_layers(args)
    else:
        layers = _layers_from_file_argument(args, parser)
    for name, entry in layers.items():
        _measure_layer(args, parser, name, entry)
    return 0


def _synthetic_layers(args) -> dict:
    """Unit-vector q/k with a planted needle: 16 sequences of 32 blocks, 4 heads, d = 64."""
    block_size = 64 if args.block_size is None else args.block_size
    seqlen, heads, head_dim = _SYNTHETIC_BLOCKS * block_size, 4, 64
    needles = args.needle if args.needle is not None else [5 * block_size + i for i in (3, 4, 5)]
    queries = args.queries if args.queries is not None else list(range(seqlen - 4, seqlen))
    q, k = model.planted_needle_qk(
        16,
        seqlen,
        heads,
        head_dim,
        needle_positions=needles,
        query_positions=queries,
        cosine=args.cosine,
        seed=args.seed,
    )
    print(
        f"synthetic q/k: 16 sequences of {seqlen} tokens, {heads} heads, d={head_dim}, unit vectors; "
        f"needle keys {needles} at cosine {args.cosine} to the queries {queries}"
    )
    return {"synthetic": {"q": q, "k": k, "needle_positions": needles, "query_positions": queries}}


def _layers_from_file_argument(args, parser: argparse.ArgumentParser) -> dict:
    import torch

    loaded = torch.load(args.file, map_location="cpu", weights_only=True)
    layers = _layers_from_file(loaded, args.file)
    if args.layer is not None:
        if args.layer not in layers:
            parser.error(f"--layer {args.layer!r} is not in the file; it has {sorted(layers)}")
        layers = {args.layer: layers[args.layer]}
    return layers


def _measure_layer(args, parser: argparse.ArgumentParser, name: str, entry: dict) -> None:
    """Measure one layer's q/k (flags override what the entry stores) and print its table."""
    block_size = args.block_size if args.block_size is not None else int(entry.get("block_size", 64))
    topk = args.topk if args.topk is not None else int(entry.get("topk", 4))
    needles = args.needle if args.needle is not None else entry.get("needle_positions")
    queries = args.queries if args.queries is not None else entry.get("query_positions")
    signal = args.signal if args.signal is not None else entry.get("signal_positions")
    q_shape, k_shape = getattr(entry["q"], "shape", ()), getattr(entry["k"], "shape", ())
    if len(q_shape) >= 3 and len(k_shape) >= 3:  # other shapes: measure_router_snr says what is wrong
        _check_flag_positions(parser, args, k_shape[-3], q_shape[-3], f"layer {name!r}")
    if needles is None or queries is None:
        parser.error(
            f"layer {name!r}: give --needle and --queries (or store needle_positions and "
            "query_positions in the file)"
        )
    result = model.measure_router_snr(
        entry["q"],
        entry["k"],
        block_size,
        topk,
        needle_positions=needles,
        query_positions=queries,
        signal_positions=signal,
        causal=not args.non_causal,
    )
    mode = "non-causal" if args.non_causal else "causal, own block counted"
    print(
        f"\nlayer {name}: block_size {block_size}, topk {topk} ({mode}), q {tuple(entry['q'].shape)}, "
        f"k {tuple(entry['k'].shape)}"
    )
    print(
        "  dmu, dmu_eff: gaps over the query's mean noise dot product; pred: the paper's model with the "
        "measured sigma2; dmu_blk/var_rt/predblk: block-level gap, noise-block variance / (sigma2/B), "
        "prediction from them; measured: flashmoba.moba_select"
    )
    print(result.table())
    skipped = {reason: count for reason, count in result.skipped.items() if count}
    if skipped:
        print(f"  left out: {skipped}")


def _layers_from_checkpoint(args, parser: argparse.ArgumentParser) -> dict:
    """q/k of every MoBA layer of a trained model on S-NIAH samples, with needle and query positions."""
    import torch

    from flashmoba.data import make_sample
    from flashmoba.models.checkpoint import find_checkpoint, load_model

    checkpoint = find_checkpoint(args.checkpoint)
    lm, run_config = load_model(checkpoint, args.device, backend="reference")
    length = args.length if args.length is not None else int(run_config["seq_len"])
    rng = np.random.default_rng(args.seed)
    depths = (np.arange(args.samples) + 0.5) / args.samples
    try:
        samples = [make_sample(args.task, length, rng, depth=float(depth)) for depth in depths]
    except ValueError as error:  # too short for the task's text
        parser.error(f"argument --length: {error}")
    tokens = torch.from_numpy(np.stack([sample.tokens for sample in samples])).to(args.device)
    captured = model.capture_qk(lm, tokens)
    needles = [list(range(*sample.value_span)) for sample in samples]
    queries = [[sample.prompt_length - 1] for sample in samples]  # the query that must produce the answer
    print(
        f"checkpoint {checkpoint}: {len(captured)} MoBA layers, {args.samples} {args.task} samples of "
        f"{length} tokens; needle = the value's tokens, query = the token before the answer"
    )
    block_size, topk = lm.config.moba_block_size, lm.config.moba_topk
    return {
        name: {
            "q": q.float().cpu(),
            "k": k.float().cpu(),
            "needle_positions": needles,
            "query_positions": queries,
            "block_size": block_size,
            "topk": topk,
        }
        for name, (q, k) in captured.items()
    }


def _layers_from_file(loaded, path: str) -> dict:
    """{'q', 'k', ...} or {layer: {'q', 'k', ...} or (q, k)} -> {layer: {'q', 'k', ...}}."""
    if not isinstance(loaded, dict):
        raise TypeError(f"{path} must hold a dict with 'q' and 'k', or a dict of them per layer")
    if "q" in loaded and "k" in loaded:
        return {"qk": loaded}
    layers = {}
    shared = {
        key: value
        for key, value in loaded.items()
        if not isinstance(value, (dict, tuple, list)) or key.endswith("positions")
    }
    for name, value in loaded.items():
        if name in shared:
            continue
        if isinstance(value, (tuple, list)) and len(value) == 2:
            value = {"q": value[0], "k": value[1]}
        if not isinstance(value, dict) or "q" not in value or "k" not in value:
            raise ValueError(f"{path}: entry {name!r} is neither (q, k) nor a dict with 'q' and 'k'")
        layers[name] = {**shared, **value}
    if not layers:
        raise ValueError(f"{path} holds no q/k")
    return layers


if __name__ == "__main__":
    sys.exit(main())
