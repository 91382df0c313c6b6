"""The issue-19 part of the report: paired verdicts (claim 3 under both dense baselines), the router SNR
inside every trained MoBA layer, the cost of every run, the concurrency rerun.

``experiments.report`` appends ``issue19_sections`` to REPORT.md. The rules are those of
``experiments.protocol`` (``CLAIMS_19``, ``PairedCheck``), fixed before any issue-19 run; a verdict is
"pending" while a deciding run is missing, and no number is shown that a run did not produce.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from experiments import report as base
from experiments.protocol import (
    BEYOND_LENGTH_FACTOR,
    CLAIMS_19,
    JUSTIFICATION_19,
    LEARNED_ACCURACY,
    MIN_PAIRS,
    PairedCheck,
    PairedClaim,
    Protocol,
    Run,
)

PENDING = "pending"
BELOW_PAPER = "below the paper's effect"

# One-sided 95% quantiles of Student's t by degrees of freedom (standard table values).
T_95 = {
    1: 6.314,
    2: 2.920,
    3: 2.353,
    4: 2.132,
    5: 2.015,
    6: 1.943,
    7: 1.895,
    8: 1.860,
    9: 1.833,
    10: 1.812,
    11: 1.796,
    12: 1.782,
    13: 1.771,
    14: 1.761,
    15: 1.753,
}


def t_quantile(df: int) -> float:
    return T_95.get(df, 1.645 if df > 15 else float("nan"))


# ----------------------------------------------------------------------------------------------------
# The runs: issue 6's (seeds 0-3) and issue 19's, by configuration and seed
# ----------------------------------------------------------------------------------------------------


@dataclass
class Pool:
    """Complete runs by (configuration, seed): issue 19's where made, else issue 6's; reruns apart."""

    old: dict  # run name -> RunOutputs (issue 6)
    new: dict  # run name -> RunOutputs (issue 19, reruns included)
    protocol19: Protocol

    def output(self, configuration: str, seed: int):
        name = Run(self.protocol19.configuration(configuration), seed).name
        if name not in self.protocol19.reruns and name in self.new and self.new[name].complete:
            return self.new[name]
        if name in self.old and self.old[name].complete:
            return self.old[name]
        return None

    def is_new(self, configuration: str, seed: int) -> bool:
        name = Run(self.protocol19.configuration(configuration), seed).name
        return name not in self.protocol19.reruns and name in self.new and self.new[name].complete

    def seeds(self, configuration: str) -> list[int]:
        found = set(self.protocol19.seeds_by_configuration.get(configuration, ()))
        found |= {o.run.seed for o in self.old.values() if o.run.configuration.name == configuration}
        return sorted(s for s in found if self.output(configuration, s) is not None)

    def expected_new(self, configuration: str) -> list[str]:
        """The issue-19 runs of ``configuration`` (reruns left out)."""
        return [
            Run(self.protocol19.configuration(configuration), seed).name
            for seed in self.protocol19.seeds_by_configuration.get(configuration, ())
            if Run(self.protocol19.configuration(configuration), seed).name not in self.protocol19.reruns
        ]


def load_pool(protocol6: Protocol, runs6: Path, protocol19: Protocol, runs19: Path) -> Pool:
    return Pool(base.load_runs(protocol6, runs6), base.load_runs(protocol19, runs19), protocol19)


# ----------------------------------------------------------------------------------------------------
# Per-seed values and the paired rule
# ----------------------------------------------------------------------------------------------------


def _n1(results: dict, lengths) -> float | None:
    values = [base.accuracy(results, "niah1", n) for n in lengths]
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def _measure(measure: str, results: dict, protocol: Protocol) -> float | None:
    train = protocol.training.seq_len
    beyond = [n for n in protocol.evaluation.lengths if n >= BEYOND_LENGTH_FACTOR * train]
    if measure == "niah_average":
        return base.retrieval_average(results, protocol.evaluation.tasks, protocol.evaluation.lengths)
    if measure == "niah1_beyond":
        return _n1(results, beyond)
    if measure == "heldout_loss":
        return base.heldout_loss(results)
    if measure == "niah1_at_length":
        return _n1(results, [train])
    raise ValueError(measure)


def paired_values(check: PairedCheck, pool: Pool, fresh_only: bool = False) -> dict[int, float]:
    """The check's value per seed (only seeds where every run it needs is complete)."""
    protocol = pool.protocol19
    values = {}
    for seed in pool.seeds(check.first):
        first = pool.output(check.first, seed)
        if check.second is not None:
            second = pool.output(check.second, seed)
            if second is None:
                continue
            if fresh_only and not (pool.is_new(check.first, seed) or pool.is_new(check.second, seed)):
                continue
        elif fresh_only and not pool.is_new(check.first, seed):
            continue
        if check.measure == "niah_average" or check.measure == "niah1_beyond":
            a, b = (
                _measure(check.measure, first.results, protocol),
                _measure(check.measure, second.results, protocol),
            )
            if a is not None and b is not None:
                values[seed] = a - b
        elif check.measure == "heldout_loss_relative":
            a, b = base.heldout_loss(first.results), base.heldout_loss(second.results)
            if a is not None and b:
                values[seed] = 100.0 * (a / b - 1.0)
        elif check.measure == "niah1_retention":
            at = _measure("niah1_at_length", first.results, protocol)
            beyond = _measure("niah1_beyond", first.results, protocol)
            if at is not None and beyond is not None and at >= LEARNED_ACCURACY:
                values[seed] = beyond / at
        else:
            raise ValueError(check.measure)
    return values


@dataclass
class CheckResult:
    check: PairedCheck
    values: dict[int, float]
    verdict: str
    mean: float | None = None
    low: float | None = None  # one-sided 95% lower bound
    high: float | None = None  # one-sided 95% upper bound


def judge(check: PairedCheck, values: dict[int, float], runs_missing: bool = False) -> CheckResult:
    """The paired rule on one check; with no value at all it is pending while runs are still missing,
    and unresolved once they are all made (e.g. no seed learned the task a retention check needs)."""
    n = len(values)
    if n < MIN_PAIRS:
        return CheckResult(check, values, PENDING if n == 0 and runs_missing else base.UNRESOLVED)
    data = list(values.values())
    mean = sum(data) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in data) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if check.claimed == "higher":
        if low > check.threshold:
            verdict = base.HOLDS
        elif high < check.threshold:
            verdict = base.REVERSED
        elif check.paper_effect is not None and high < check.paper_effect:
            verdict = BELOW_PAPER
        else:
            verdict = base.UNRESOLVED
    else:
        if high < check.threshold:
            verdict = base.HOLDS
        elif low > check.threshold:
            verdict = base.REVERSED
        elif check.paper_effect is not None and low > check.paper_effect:
            verdict = BELOW_PAPER
        else:
            verdict = base.UNRESOLVED
    return CheckResult(check, values, verdict, mean, low, high)


@dataclass
class ClaimResult:
    claim: PairedClaim
    checks: list[CheckResult]
    verdict: str
    missing: list[str]


def evaluate(claim: PairedClaim, pool: Pool, fresh_only: bool = False) -> ClaimResult:
    missing = [
        name
        for configuration in claim.deciding
        for name in pool.expected_new(configuration)
        if not (name in pool.new and pool.new[name].complete)
    ]
    checks = [judge(check, paired_values(check, pool, fresh_only), bool(missing)) for check in claim.checks]
    verdicts = [c.verdict for c in checks]
    if missing:
        verdict = PENDING
    elif all(v == base.HOLDS for v in verdicts):
        verdict = base.REPRODUCED
    elif any(v in (base.REVERSED, BELOW_PAPER) for v in verdicts):
        verdict = base.NOT_REPRODUCED
    else:
        verdict = base.INCONCLUSIVE
    return ClaimResult(claim, checks, verdict, missing)


# ----------------------------------------------------------------------------------------------------
# Router SNR
# ----------------------------------------------------------------------------------------------------

SNR_FIELDS = (
    ("mu_signal", 3),
    ("mu_noise", 3),
    ("sigma", 3),
    ("delta_mu_eff", 3),
    ("snr", 2),
    ("failure_probability", 3),
    ("predicted_recall", 3),
    ("measured_recall", 3),
)


def snr_rows(pool: Pool, runs19: Path) -> list[dict]:
    """Every (run, layer, length) row of the issue-19 runs' eval/snr.json, with the run's configuration."""
    rows = []
    for name, output in pool.new.items():
        data = base.read_json(runs19 / name / "eval" / "snr.json")
        if not data:
            continue
        for row in data["layers"]:
            rows.append({**row, "run": name, "configuration": output.run.configuration.name})
    return rows


def snr_from_earlier_training(cost: dict) -> bool:
    """Whether a run's router SNR was measured on an earlier training than the one it was evaluated on:
    a call after the SNR's trained the run again from step 0 (its checkpoints lost with a machine).
    Runs made by today's run.py set such outputs aside instead; this reads the cost records of those
    made before."""
    calls = cost.get("calls", [])
    snr_calls = [i for i, call in enumerate(calls) if call.get("snr") == "finished"]
    restarts = [
        i for i, call in enumerate(calls) if call.get("steps_before") == 0 and call.get("steps_after", 0) > 0
    ]
    return bool(snr_calls and restarts) and restarts[-1] > snr_calls[-1]


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def snr_table(pool: Pool, rows: list[dict]) -> list[str]:
    header = " | ".join(name for name, _ in SNR_FIELDS)
    lines = [
        f"| configuration | layer | length | runs | samples | {header} |",
        "|" + "---|" * (5 + len(SNR_FIELDS)),
    ]
    for configuration in pool.protocol19.configurations:
        mine = [r for r in rows if r["configuration"] == configuration.name]
        for key in sorted({(r["layer"], r["length"]) for r in mine}):
            chosen = [r for r in mine if (r["layer"], r["length"]) == key]
            cells = [base.cell(_mean([r.get(name) for r in chosen]), digits) for name, digits in SNR_FIELDS]
            lines.append(
                f"| {configuration.title} | {key[0]} | {key[1]} | {len(chosen)} | "
                f"{sum(r['samples'] for r in chosen)} | " + " | ".join(cells) + " |"
            )
    return lines


def snr_ordering(pool: Pool, rows: list[dict]) -> list[str]:
    """The theory's orderings, on the mean SNR at the training length over layers and runs."""
    train = pool.protocol19.training.seq_len

    def mean_snr(configuration: str) -> float | None:
        return _mean([r["snr"] for r in rows if r["configuration"] == configuration and r["length"] == train])

    values = {c: mean_snr(c) for c in ("moba-128", "moba-64", "moba-32", "moba-32-kconv3", "moba-32-kconv5")}
    shown = ", ".join(f"{c} {base.cell(v, 2)}" for c, v in values.items())
    lines = [f"- Mean SNR at {train} tokens (layers and runs): {shown}."]
    b128, b64, b32 = values["moba-128"], values["moba-64"], values["moba-32"]
    if None in (b128, b64, b32):
        lines.append("- B = 128 < 64 < 32: pending (a configuration has no measurement yet).")
    else:
        lines.append(f"- B = 128 < 64 < 32: {'yes' if b128 < b64 < b32 else 'no'}.")
    for kconv in ("moba-32-kconv3", "moba-32-kconv5"):
        if values[kconv] is None or b32 is None:
            lines.append(f"- {kconv} above moba-32: pending.")
        else:
            lines.append(f"- {kconv} above moba-32: {'yes' if values[kconv] > b32 else 'no'}.")
    pairs = [
        (r["predicted_recall"], r["measured_recall"]) for r in rows if r.get("predicted_recall") is not None
    ]
    if len(pairs) >= 3:
        px, my = zip(*pairs)
        mx, mm = sum(px) / len(px), sum(my) / len(my)
        sxy = sum((a - mx) * (b - mm) for a, b in pairs)
        sxx, syy = sum((a - mx) ** 2 for a in px), sum((b - mm) ** 2 for b in my)
        r = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
        error = sum(abs(a - b) for a, b in pairs) / len(pairs)
        lines.append(
            f"- Predicted against measured recall over {len(pairs)} (run, layer, length) points: correlation "
            f"{r:.2f}, mean absolute error {error:.3f}, mean predicted {mx:.3f}, mean measured {mm:.3f}."
        )
    else:
        lines.append("- Predicted against measured recall: pending (no measurement yet).")
    return lines


def snr_figure(pool: Pool, rows: list[dict], figures_dir: Path) -> Path | None:
    points = [
        r for r in rows if r.get("predicted_recall") is not None and r.get("measured_recall") is not None
    ]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 5))
    train = pool.protocol19.training.seq_len
    for configuration in pool.protocol19.configurations:
        mine = [r for r in points if r["configuration"] == configuration.name]
        for length, marker in ((train, "o"), (None, "^")):
            chosen = [r for r in mine if (r["length"] == train) == (length is not None)]
            if chosen:
                axis.scatter(
                    [r["predicted_recall"] for r in chosen],
                    [r["measured_recall"] for r in chosen],
                    marker=marker,
                    label=f"{configuration.title}" + (f" @{train}" if length else " beyond"),
                    alpha=0.8,
                )
    axis.plot([0, 1], [0, 1], color="gray", linewidth=1, linestyle="--")
    axis.set_xlabel("predicted recall (paper's model, measured mu and sigma)")
    axis.set_ylabel("measured router recall of the needle block")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_title("Router SNR model in trained MoBA layers (one point per run, layer, length)", fontsize=8)
    axis.legend(fontsize=6)
    figure.tight_layout()
    figures_dir.mkdir(parents=True, exist_ok=True)
    path = figures_dir / "snr_predicted_vs_measured.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


def _format_values(values: dict[int, float], digits: int = 2) -> str:
    return ", ".join(f"seed {s}: {v:+.{digits}f}" for s, v in sorted(values.items())) or "none"


def claim_label(claim: PairedClaim) -> str:
    return f"{claim.number}" + (f" ({claim.baseline} dense)" if claim.baseline else "")


def verdict_table(pooled: list[ClaimResult], fresh: list[ClaimResult], pool: Pool) -> list[str]:
    lines = [
        "| claim | verdict (pre-registered: all paired seeds) | verdict, pairs with an issue-19 run only | "
        "issue-19 deciding runs complete |",
        "|---|---|---|---|",
    ]
    for result, fresh_result in zip(pooled, fresh):
        expected = [n for c in result.claim.deciding for n in pool.expected_new(c)]
        done = len(expected) - len(result.missing)
        lines.append(
            f"| {claim_label(result.claim)}. {result.claim.statement} | **{result.verdict}** | "
            f"{fresh_result.verdict} | {done} of {len(expected)} |"
        )
    return lines


def claim_details(result: ClaimResult, pool: Pool) -> list[str]:
    lines = [
        f"### Claim {claim_label(result.claim)}: {result.verdict}",
        "",
        result.claim.statement,
        "",
        f"- Paper: {result.claim.paper_evidence}",
    ]
    if result.missing:
        lines.append(f"- Issue-19 runs not complete yet: {', '.join(result.missing)}.")
    for check in result.checks:
        c = check.check
        bounds = (
            f"n = {len(check.values)}, mean {check.mean:+.2f}, one-sided 95% bounds [{check.low:+.2f}, "
            f"{check.high:+.2f}]"
            if check.mean is not None
            else f"n = {len(check.values)} (at least {MIN_PAIRS} needed)"
        )
        paper = "" if c.paper_effect is None else f", paper's effect {c.paper_effect:+g}"
        lines.append(
            f"- Check {c.label} (claimed {c.claimed} than {c.threshold:g}{paper}): **{check.verdict}**. "
            f"{bounds}. Values: {_format_values(check.values)}"
        )
        if c.measure == "niah1_retention" and len(check.values) < MIN_PAIRS and not result.missing:
            lines.append(f"  {_unlearned_seeds(c, pool)}")
    lines.append("")
    return lines


def _unlearned_seeds(check: PairedCheck, pool: Pool) -> str:
    """Why a retention check has too few seeds: each seed's S-NIAH-1 at the training length."""
    at_length = {
        seed: _measure("niah1_at_length", pool.output(check.first, seed).results, pool.protocol19)
        for seed in pool.seeds(check.first)
    }
    shown = ", ".join(f"seed {s}: {v:.1f}%" for s, v in sorted(at_length.items()) if v is not None)
    return (
        f"Retention is judged only on seeds that learned the task (S-NIAH-1 at the training length >= "
        f"{LEARNED_ACCURACY:g}%); {check.first}'s: {shown or 'none measured'}."
    )


def card_samples(runs19: Path) -> list[str]:
    """A line per call of experiments/gpu_runs_concurrent.sh (its gpu_samples_<call>.csv)."""
    lines = []
    for path in sorted(runs19.glob("gpu_samples_*.csv")):
        lines += call_samples(path)
    return lines


def call_samples(path: Path) -> list[str]:
    with path.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("utilization_gpu_percent", "").strip()]
    try:
        utilisation = [float(r["utilization_gpu_percent"]) for r in rows]
        memory = [float(r["memory_used_mib"]) for r in rows]
    except (KeyError, ValueError):
        return []
    if not rows:
        return []
    return [
        f"- The card while the runs shared it, {path.stem.removeprefix('gpu_samples_')} "
        f"({len(rows)} samples, 20 s apart): utilisation mean "
        f"{sum(utilisation) / len(utilisation):.0f}%, memory used at most {max(memory) / 1024:.1f} GiB."
    ]


def rerun_lines(pool: Pool) -> list[str]:
    lines = []
    protocol = pool.protocol19
    for name, earlier in protocol.reruns.items():
        rerun = pool.new.get(name)
        configuration = rerun.run.configuration.name if rerun else name.rsplit("-seed", 1)[0]
        if rerun is None or not rerun.complete:
            lines.append(f"- {name} made again beside the others (concurrency check): pending.")
            continue
        old = [o for o in pool.old.values() if o.run.configuration.name == configuration and o.complete]
        for label, measure, digits in (
            ("S-NIAH average", lambda r: _measure("niah_average", r, protocol), 1),
            ("held-out loss", base.heldout_loss, 4),
        ):
            value = measure(rerun.results)
            spread = [measure(o.results) for o in old]
            spread = [v for v in spread if v is not None]
            before = pool.old.get(name)
            before_value = measure(before.results) if before and before.complete else None
            within = "within" if spread and min(spread) <= value <= max(spread) else "outside"
            lines.append(
                f"- {name} made again beside the others ({earlier}: {base.cell(before_value, digits)}): "
                f"{label} {value:.{digits}f}, {within} issue 6's seed range "
                f"{min(spread):.{digits}f}-{max(spread):.{digits}f}."
                if spread
                else f"- {name}: {label} {value:.{digits}f}."
            )
    return lines


def issue19_sections(pool: Pool, runs19: Path, figures_dir: Path, report_dir: Path) -> list[str]:
    pooled = [evaluate(claim, pool) for claim in CLAIMS_19]
    fresh = [evaluate(claim, pool, fresh_only=True) for claim in CLAIMS_19]
    rows = snr_rows(pool, runs19)
    figure = snr_figure(pool, rows, figures_dir)
    made = [o for o in pool.new.values() if o.complete]
    lines = [
        "# Issue 19: the claims decided by paired seeds, claim 3 under both dense baselines, the router SNR",
        "",
        f"{len(made)} of {len(pool.new)} issue-19 runs complete ({pool.protocol19.runs_dir}/). "
        "Design, rule and power in experiments/protocol.py (`PROTOCOL_19`, `CLAIMS_19`, "
        "`JUSTIFICATION_19`), written before any of these runs; the issue-6 verdicts above stay as "
        "they were.",
        "",
        "## Verdicts (issue 19)",
        "",
        *verdict_table(pooled, fresh, pool),
        "",
        (
            "Rule: per seed, the difference between two configurations trained on that seed (same "
            "initialisation and batches), or a configuration's retention beyond the length; one-sided 95% "
            "Student bounds L, U on the mean over seeds. A check claimed higher than a threshold holds if "
            "L > threshold, is reversed if U < threshold, is below the paper's effect if U < the paper's "
            "effect, and is unresolved otherwise (lower: mirrored); fewer than "
            f"{MIN_PAIRS} paired seeds leave it unresolved. A claim is reproduced when all its checks hold, "
            "not reproduced when one is reversed or below the paper's effect, inconclusive otherwise, and "
            "pending while an issue-19 deciding run is missing. Pairs use issue 6's runs for seeds 0-3 and "
            "issue 19's for the others (and for dense-rope)."
        ),
        "",
    ]
    lines += base.discussion_section(
        report_dir / "DISCUSSION19.md", heading="Discussion (issue 19, written after the runs)"
    )
    lines += [
        "## Design (issue 19)",
        "",
    ]
    for heading, text in JUSTIFICATION_19:
        lines += [f"- **{heading}.** {text}"]
    lines += [
        "",
        "## Commands (issue 19)",
        "",
        "One command on one H200 (the device tool's `run`, `timeout_s` 600), from the repository root; the "
        "runs go PROCS at a time in RUN_ORDER_19, each stopping by the deadline, and complete runs are left "
        "as they are. The card saturates at about 1.45M tokens/s in all (8 and 10 processes, 2026-12-02), "
        "so 10 runs train in about 9 minutes and evaluate in a second call. RUNS_HOME keeps the runs "
        "outside the working tree, which the device tool replaces on every call, so that the same command "
        "again on the same warm machine resumes them:",
        "",
        "```bash",
        "RUNS_HOME=$HOME/flashmoba-runs PROCS=10 bash experiments/gpu_runs_concurrent.sh 2>&1 \\",
        "  | tee $OUT/gpu_log.txt   # -> $OUT/runs-issue19.tar.gz",
        "```",
        "",
        "Then, here: `tar -xzf <returned files>/runs-issue19.tar.gz` (it holds "
        "experiments/runs-issue19/) and "
        "`python experiments/report.py`. The CPU check of the same pipeline: `PILOT=1 PROCS=2 "
        "PATH=<stand-in nvidia-smi>:$PATH bash experiments/gpu_runs_concurrent.sh`.",
    ]
    lines += ["", "## Claims in detail (issue 19)", ""]
    for result in pooled:
        lines += claim_details(result, pool)
    lines += [
        "## Router SNR inside the trained MoBA layers",
        "",
        (
            "Per configuration, MoBA layer and sample length: the mean over its issue-19 runs of each run's "
            "sample-weighted head means (eval/snr.json of each run). Held-out S-NIAH-1/2/3 samples; needle "
            "= the value's tokens, query = the last prompt token; dot products raw (no softmax scale). "
            "SNR = delta_mu_eff / sqrt(2 sigma^2 B); predicted recall: the paper's top-k model with the "
            "measured quantities; measured: the router's choice (samples whose needle block is not the "
            "query's own)."
        ),
        "",
    ]
    lines += snr_table(pool, rows) if rows else ["Pending: no issue-19 run has measured it yet."]
    lines += ["", *snr_ordering(pool, rows)]
    earlier = sorted(
        {row["run"] for row in rows}
        & {
            name
            for name in pool.new
            if snr_from_earlier_training(base.read_json(runs19 / name / "cost.json") or {})
        }
    )
    if earlier:
        lines.append(
            f"- Measured on an earlier training of the same run: {', '.join(earlier)}. Their checkpoints "
            "were lost with the machine before the evaluation; each was trained again from step 0 (same "
            "configuration, seed and batches) and evaluated on that training. GPU training is not bitwise "
            "repeatable, so for these runs the SNR rows and the S-NIAH scores come from two trainings "
            "(cost.json lists the calls; the earlier training's metrics are in the git history)."
        )
    lines += [""]
    if figure is not None:
        lines += [f"![snr_predicted_vs_measured]({figure.relative_to(report_dir).as_posix()})", ""]
    lines += ["## Cost of every issue-19 run", ""]
    lines += [
        "Wall-clock minutes as measured by `run.py` (cost.json; total = training + evaluation + router SNR), "
        "the card, the tokens trained. The runs shared one card, several processes at a time.",
        "",
        *base.cost_table(pool.new),
        "",
        *card_samples(runs19),
        *rerun_lines(pool),
        "",
    ]
    return lines
