"""Build ``experiments/REPORT.md`` (and its figures) from the runs' outputs.

    python -m experiments.report            # the protocol's runs -> experiments/REPORT.md
    python -m experiments.report --pilot    # the CPU pipeline check -> experiments/pilot/REPORT.md

Run from the repository root; ``python experiments/report.py`` does the same. It reads, for every run of
``experiments.protocol``, what ``flashmoba train`` and ``flashmoba eval`` wrote (``metrics.jsonl``;
``eval/results.json``) and what ``experiments.run`` wrote (``cost.json``). A run counts once its training
reached the last step and ``eval/results.json`` exists; anything less shows as missing or incomplete.
Numbers come only from those files: nothing is filled in.

Verdict rule, per claim (fixed before any run):

- each check compares the seeds of two configurations: it **holds** when every seed of one is on the
  claimed side of every seed of the other (the seed ranges do not overlap), is **reversed** when they do
  not overlap the other way, and is **unresolved** when they overlap;
- a claim is **reproduced** when all its checks hold, **not reproduced** when any check is reversed,
  **inconclusive** otherwise, or when a run that decides it is missing, and **not run** when none of
  its deciding runs is complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__" and not __package__:
    # Started as a file (``python experiments/report.py``, the command REPORT.md names): the imports below
    # need the ``experiments`` package, which ``python -m`` finds from the repository root.
    if Path.cwd().resolve() != REPO_ROOT:
        sys.exit(f"run this from the repository root ({REPO_ROOT}): python -m experiments.report")
    os.execv(sys.executable, [sys.executable, "-m", "experiments.report", *sys.argv[1:]])

from experiments import protocol as protocol_module  # noqa: E402
from experiments.protocol import CLAIMS, JUSTIFICATION, Claim, Protocol, Run, protocol_for  # noqa: E402

TASK_TITLES = {"niah1": "S-NIAH-1", "niah2": "S-NIAH-2", "niah3": "S-NIAH-3", "passkey": "passkey"}
TASK_SHORT = {"niah1": "N1", "niah2": "N2", "niah3": "N3", "passkey": "PK"}

HOLDS, REVERSED, UNRESOLVED = "holds", "reversed", "unresolved"
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_RUN = "reproduced", "not reproduced", "inconclusive", "not run"

# ----------------------------------------------------------------------------------------------------
# Reading the runs
# ----------------------------------------------------------------------------------------------------


@dataclass
class RunOutputs:
    run: Run
    metrics: list[dict] = field(default_factory=list)  # rows of metrics.jsonl
    results: dict | None = None  # eval/results.json
    cost: dict | None = None  # cost.json
    max_steps: int = 0

    @property
    def trained_steps(self) -> int:
        return int(self.metrics[-1]["step"]) if self.metrics else 0

    @property
    def complete(self) -> bool:
        return self.trained_steps >= self.max_steps and self.results is not None

    @property
    def status(self) -> str:
        if self.complete:
            return "complete"
        if not self.metrics and self.results is None:
            return "missing"
        if self.trained_steps < self.max_steps:
            return f"training stopped at step {self.trained_steps} of {self.max_steps}"
        return "trained, not evaluated"


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def load_runs(protocol: Protocol, runs_dir: Path) -> dict[str, RunOutputs]:
    outputs = {}
    for run in protocol.runs:
        directory = runs_dir / run.name
        outputs[run.name] = RunOutputs(
            run,
            read_jsonl(directory / "metrics.jsonl"),
            read_json(directory / "eval" / "results.json"),
            read_json(directory / "cost.json"),
            protocol.training.max_steps,
        )
    return outputs


# ----------------------------------------------------------------------------------------------------
# Numbers of one run (None where the run does not have them)
# ----------------------------------------------------------------------------------------------------


def accuracy(results: dict, task: str, length: int) -> float | None:
    """S-NIAH accuracy in % of ``task`` at ``length``."""
    for cell in results["retrieval"]:
        if cell["task"] == task and cell["length"] == length and cell["accuracy"] is not None:
            return 100.0 * cell["accuracy"]
    return None


def retrieval_average(results: dict, tasks, lengths) -> float | None:
    """Mean of the task x length accuracy cells, as the paper's "Avg." of Table 3 (None if a cell is
    missing)."""
    cells = [accuracy(results, task, length) for task in tasks for length in lengths]
    return None if any(cell is None for cell in cells) else sum(cells) / len(cells)


def router_recall(results: dict, length: int, layer: str | None = None) -> float | None:
    """Router recall of the needle block in %, at ``length``: mean over tasks and MoBA layers (or over one
    layer)."""
    values = [
        value
        for cell in results["retrieval"]
        if cell["length"] == length
        for name, value in cell["router_recall"].items()
        if layer is None or name == layer
    ]
    return 100.0 * sum(values) / len(values) if values else None


def recall_layers(results: dict) -> list[str]:
    return sorted({name for cell in results["retrieval"] for name in cell["router_recall"]}, key=int)


def heldout_loss(results: dict) -> float | None:
    return results["heldout"]["loss"] if "heldout" in results else None


def heldout_perplexity(results: dict) -> float | None:
    return results["heldout"]["perplexity"] if "heldout" in results else None


def final_validation_loss(metrics: list[dict]) -> float | None:
    values = [row["val_loss"] for row in metrics if "val_loss" in row]
    return values[-1] if values else None


# ----------------------------------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------------------------------


@dataclass
class Check:
    description: str
    outcome: str  # HOLDS, REVERSED or UNRESOLVED
    numbers: str


@dataclass
class Verdict:
    claim: Claim
    verdict: str
    checks: list[Check]
    missing_runs: list[str]
    notes: list[str]  # informative numbers, not used by the verdict
    rule: str


def compare_seeds(claimed_better: list[float], claimed_worse: list[float], higher_is_better: bool) -> str:
    """HOLDS when every seed of ``claimed_better`` beats every seed of ``claimed_worse``; REVERSED when every
    seed of ``claimed_worse`` beats every seed of ``claimed_better``; UNRESOLVED when the ranges overlap."""
    sign = 1.0 if higher_is_better else -1.0
    better = [sign * value for value in claimed_better]
    worse = [sign * value for value in claimed_worse]
    if min(better) > max(worse):
        return HOLDS
    if max(better) < min(worse):
        return REVERSED
    return UNRESOLVED


def compare_retention(at_training_length: list[float], beyond: list[float], expect_retained: bool) -> str:
    """Whether accuracy beyond the training length stays at >= RETENTION_FRACTION of the accuracy at it.

    Retained for sure: min(beyond) >= fraction * max(at length); collapsed for sure: max(beyond) < fraction *
    min(at length); overlap otherwise. UNRESOLVED as well when a seed is below LEARNED_ACCURACY at the
    training length: a model that never learned the task can neither keep nor lose it.
    """
    fraction = protocol_module.RETENTION_FRACTION
    if min(at_training_length) < protocol_module.LEARNED_ACCURACY:
        return UNRESOLVED
    retained = min(beyond) >= fraction * max(at_training_length)
    collapsed = max(beyond) < fraction * min(at_training_length)
    if retained:
        return HOLDS if expect_retained else REVERSED
    if collapsed:
        return REVERSED if expect_retained else HOLDS
    return UNRESOLVED


def compare_closeness(moba_losses: list[float], dense_losses: list[float], tolerance: float) -> str:
    """HOLDS when MoBA's loss is at most ``tolerance`` (relative) above dense's for every pair of seeds;
    REVERSED when it is more than that above for every pair; UNRESOLVED otherwise."""
    worst = max(moba_losses) / min(dense_losses) - 1
    best = min(moba_losses) / max(dense_losses) - 1
    if worst <= tolerance:
        return HOLDS
    if best > tolerance:
        return REVERSED
    return UNRESOLVED


def combine(checks: list[Check], missing_runs: list[str], any_present: bool) -> str:
    if not any_present:
        return NOT_RUN
    if missing_runs:
        return INCONCLUSIVE
    outcomes = [check.outcome for check in checks]
    if REVERSED in outcomes:
        return NOT_REPRODUCED
    if outcomes and all(outcome == HOLDS for outcome in outcomes):
        return REPRODUCED
    return INCONCLUSIVE


def format_seeds(values: list[float], digits: int = 1) -> str:
    if not values:
        return "missing"
    text = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{text} (mean {sum(values) / len(values):.{digits}f})" if len(values) > 1 else text


class SeedValues:
    """Per configuration, the values of one measure over its complete runs (one per seed)."""

    def __init__(self, protocol: Protocol, outputs: dict[str, RunOutputs]):
        self.protocol = protocol
        self.outputs = outputs

    def complete_runs(self, configuration_name: str) -> list[RunOutputs]:
        return [
            o for o in self.outputs.values() if o.run.configuration.name == configuration_name and o.complete
        ]

    def of(self, configuration_name: str, measure) -> list[float]:
        values = [measure(o) for o in self.complete_runs(configuration_name)]
        return [v for v in values if v is not None]


SAME_SIDE = "every seed of the first beyond every seed of the second (non-overlapping seed ranges)"


class ClaimEvidence:
    """What the rule of one claim reads (the measures of a run, their values per seed) and what it
    produces (its checks, and notes that inform without deciding)."""

    def __init__(self, protocol: Protocol, outputs: dict[str, RunOutputs]):
        self.protocol = protocol
        self.seeds = SeedValues(protocol, outputs)
        self.tasks, self.lengths = protocol.evaluation.tasks, protocol.evaluation.lengths
        self.train_length = protocol.training.seq_len
        self.beyond_lengths = [
            n for n in self.lengths if n >= protocol_module.BEYOND_LENGTH_FACTOR * self.train_length
        ]
        self.checks: list[Check] = []
        self.notes: list[str] = []

    def title(self, name: str) -> str:
        return self.protocol.configuration(name).title

    # The measures of one run (None where it lacks them)

    def average(self, o: RunOutputs):
        return retrieval_average(o.results, self.tasks, self.lengths)

    def loss(self, o: RunOutputs):
        return heldout_loss(o.results)

    def niah1_at_training_length(self, o: RunOutputs):
        return accuracy(o.results, "niah1", self.train_length)

    def niah1_beyond(self, o: RunOutputs):
        cells = [accuracy(o.results, "niah1", n) for n in self.beyond_lengths]
        return None if not cells or any(c is None for c in cells) else sum(cells) / len(cells)

    def add_comparison(
        self, description: str, better: str, worse: str, measure, higher_is_better: bool, digits: int
    ) -> None:
        """A check that every seed of ``better`` beats every seed of ``worse`` on ``measure`` (none
        while either configuration lacks complete runs)."""
        better_values, worse_values = self.seeds.of(better, measure), self.seeds.of(worse, measure)
        if not better_values or not worse_values:
            return
        self.checks.append(
            Check(
                description,
                compare_seeds(better_values, worse_values, higher_is_better),
                f"{self.title(better)}: {format_seeds(better_values, digits)}; "
                f"{self.title(worse)}: {format_seeds(worse_values, digits)}",
            )
        )

    def add_note(self, name: str, label: str, measure, digits: int) -> None:
        values = self.seeds.of(name, measure)
        self.notes.append(f"{self.title(name)} {label}: {format_seeds(values, digits)}")


def block_size_rule(claim: Claim, evidence: ClaimEvidence) -> str:
    """Claim 1: smaller blocks retrieve better and reach a lower loss."""
    small, large = claim.deciding[1], claim.deciding[0]
    title, tasks, lengths = evidence.title, evidence.tasks, evidence.lengths
    evidence.add_comparison(
        "(a) S-NIAH average: smaller block higher", small, large, evidence.average, True, 1
    )
    evidence.add_comparison(
        "(b) held-out loss (nats per token): smaller block lower", small, large, evidence.loss, False, 4
    )
    for name in claim.informative:
        evidence.add_note(name, "S-NIAH average", evidence.average, 1)
        evidence.add_note(name, "held-out loss", evidence.loss, 4)
    return (
        f"(a) S-NIAH average over the {len(tasks) * len(lengths)} cells: {title(small)} above "
        f"{title(large)}; (b) held-out loss: {title(small)} below {title(large)}; both with {SAME_SIDE}."
    )


def key_convolution_rule(claim: Claim, evidence: ClaimEvidence) -> str:
    """Claim 2: the key convolution retrieves better."""
    plain, with_conv = claim.deciding
    title = evidence.title
    evidence.add_comparison(
        "S-NIAH average: with the key convolution higher", with_conv, plain, evidence.average, True, 1
    )
    for name in claim.informative:
        evidence.add_note(name, "S-NIAH average", evidence.average, 1)
    return f"S-NIAH average over all cells: {title(with_conv)} above {title(plain)}, with {SAME_SIDE}."


def length_extrapolation_rule(claim: Claim, evidence: ClaimEvidence) -> str:
    """Claim 3: beyond the training length MoBA keeps retrieving and dense collapses."""
    dense, moba = claim.deciding
    title, train_length = evidence.title, evidence.train_length
    beyond_text = "/".join(str(n) for n in evidence.beyond_lengths)
    fraction = protocol_module.RETENTION_FRACTION
    evidence.add_comparison(
        f"(a) S-NIAH-1 at {beyond_text}: MoBA higher than dense", moba, dense, evidence.niah1_beyond, True, 1
    )
    for letter, name, expect_retained in (("b", dense, False), ("c", moba, True)):
        at_length = evidence.seeds.of(name, evidence.niah1_at_training_length)
        beyond = evidence.seeds.of(name, evidence.niah1_beyond)
        if at_length and beyond:
            verb = "keeps retrieving" if expect_retained else "collapses"
            evidence.checks.append(
                Check(
                    f"({letter}) {title(name)} {verb} beyond the training length",
                    compare_retention(at_length, beyond, expect_retained),
                    f"S-NIAH-1 at {train_length}: {format_seeds(at_length)}; "
                    f"at {beyond_text}: {format_seeds(beyond)}",
                )
            )
    for name in claim.informative:
        evidence.add_note(name, f"S-NIAH-1 at {beyond_text}", evidence.niah1_beyond, 1)
    return (
        f"S-NIAH-1 at {beyond_text} tokens (>= {protocol_module.BEYOND_LENGTH_FACTOR}x the training "
        f"length {train_length}), mean over those lengths: (a) {title(moba)} above {title(dense)} with "
        f"{SAME_SIDE}; (b) dense collapses: every dense seed beyond the length is below {fraction:g} x "
        f"the lowest dense seed at the training length; (c) MoBA keeps retrieving: every MoBA seed "
        f"beyond the length is at least {fraction:g} x the highest MoBA seed at the training length. "
        f"(b) and (c) are unresolved if a seed is below {protocol_module.LEARNED_ACCURACY:g}% at the "
        f"training length (the task was never learned)."
    )


def language_modelling_rule(claim: Claim, evidence: ClaimEvidence) -> str:
    """Claim 4: MoBA's held-out loss is close to dense's."""
    dense, moba = claim.deciding
    title = evidence.title
    tolerance = protocol_module.LM_CLOSENESS
    moba_losses, dense_losses = (
        evidence.seeds.of(moba, evidence.loss),
        evidence.seeds.of(dense, evidence.loss),
    )
    if moba_losses and dense_losses:
        worst = max(moba_losses) / min(dense_losses) - 1
        best = min(moba_losses) / max(dense_losses) - 1
        evidence.checks.append(
            Check(
                f"held-out loss of {title(moba)} within {100 * tolerance:g}% of dense",
                compare_closeness(moba_losses, dense_losses, tolerance),
                f"{title(moba)}: {format_seeds(moba_losses, 4)}; {title(dense)}: "
                f"{format_seeds(dense_losses, 4)}; relative difference {100 * best:+.2f}% to "
                f"{100 * worst:+.2f}%",
            )
        )
    for name in claim.informative:
        evidence.add_note(name, "held-out loss", evidence.loss, 4)
    return (
        f"held-out loss (nats per token) of {title(moba)} at most {100 * tolerance:g}% above dense's for "
        f"every pair of seeds (holds); more than {100 * tolerance:g}% above for every pair: reversed. "
        f"The threshold sits between the paper's MoBA-128 (0.2% above dense in log-perplexity) and "
        f"MoBA-512 (2.1% above)."
    )


# Claim number -> its rule: adds the claim's checks and notes to the evidence, returns the rule's text.
CLAIM_RULES = {
    1: block_size_rule,
    2: key_convolution_rule,
    3: length_extrapolation_rule,
    4: language_modelling_rule,
}


def evaluate_claim(claim: Claim, protocol: Protocol, outputs: dict[str, RunOutputs]) -> Verdict:
    deciding_runs = [o for o in outputs.values() if o.run.configuration.name in claim.deciding]
    missing_runs = [o.run.name for o in deciding_runs if not o.complete]
    any_present = any(o.complete for o in deciding_runs)
    if claim.number not in CLAIM_RULES:
        raise ValueError(f"no rule for claim {claim.number}")
    evidence = ClaimEvidence(protocol, outputs)
    rule = CLAIM_RULES[claim.number](claim, evidence)
    verdict = combine(evidence.checks, missing_runs, any_present)
    return Verdict(claim, verdict, evidence.checks, missing_runs, evidence.notes, rule)


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cell(value: float | None, digits: int = 0) -> str:
    return (
        "missing"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def seed_summary(values: list[float], digits: int) -> str:
    """'mean (min-max, n seeds)' or 'missing'."""
    if not values:
        return "missing"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return (
        f"{mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f}, {len(values)} seeds)"
    )


def short_length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def language_modelling_table(protocol: Protocol, outputs: dict[str, RunOutputs]) -> list[str]:
    seeds = SeedValues(protocol, outputs)
    lines = [
        (
            "| Model | held-out perplexity (per token) | held-out loss (nats per token) | bits per token | "
            "final validation loss (training) |"
        ),
        "|---|---|---|---|---|",
    ]
    for configuration in protocol.configurations:
        name = configuration.name
        perplexities = seeds.of(name, lambda o: heldout_perplexity(o.results))
        losses = seeds.of(name, lambda o: heldout_loss(o.results))
        bits = [value / math.log(2) for value in losses]
        validation = seeds.of(name, lambda o: final_validation_loss(o.metrics))
        lines.append(
            f"| {configuration.title} | {seed_summary(perplexities, 3)} | {seed_summary(losses, 4)} | "
            f"{seed_summary(bits, 4)} | {seed_summary(validation, 4)} |"
        )
    return lines


def retrieval_header(protocol: Protocol, first_column: str) -> list[str]:
    tasks, lengths = protocol.evaluation.tasks, protocol.evaluation.lengths
    columns = [f"{TASK_SHORT[task]} {short_length(n)}" for task in tasks for n in lengths]
    return [f"| {first_column} | " + " | ".join(columns) + " | Avg |", "|---" * (len(columns) + 2) + "|"]


def retrieval_table_by_configuration(protocol: Protocol, outputs: dict[str, RunOutputs]) -> list[str]:
    """Table 3's shape: seed means per cell; the average with its seed range."""
    seeds = SeedValues(protocol, outputs)
    tasks, lengths = protocol.evaluation.tasks, protocol.evaluation.lengths
    lines = retrieval_header(protocol, "Model")
    for configuration in protocol.configurations:
        name = configuration.name
        cells = [
            cell(mean(seeds.of(name, lambda o, t=task, n=length: accuracy(o.results, t, n))))
            for task in tasks
            for length in lengths
        ]
        averages = seeds.of(name, lambda o: retrieval_average(o.results, tasks, lengths))
        lines.append(f"| {configuration.title} | " + " | ".join(cells) + f" | {seed_summary(averages, 1)} |")
    return lines


def retrieval_table_by_run(protocol: Protocol, outputs: dict[str, RunOutputs]) -> list[str]:
    tasks, lengths = protocol.evaluation.tasks, protocol.evaluation.lengths
    lines = retrieval_header(protocol, "Run")
    for output in outputs.values():
        if not output.complete:
            lines.append(
                f"| {output.run.name} | " + " | ".join(["missing"] * (len(tasks) * len(lengths) + 1)) + " |"
            )
            continue
        cells = [cell(accuracy(output.results, task, length)) for task in tasks for length in lengths]
        average = retrieval_average(output.results, tasks, lengths)
        lines.append(f"| {output.run.name} | " + " | ".join(cells) + f" | {cell(average, 1)} |")
    return lines


def router_recall_table(protocol: Protocol, outputs: dict[str, RunOutputs]) -> list[str]:
    seeds = SeedValues(protocol, outputs)
    lengths = protocol.evaluation.lengths
    lines = [
        "| Model | "
        + " | ".join(short_length(n) for n in lengths)
        + " | best layer (its mean over lengths) |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for configuration in protocol.configurations:
        if configuration.attention != "moba":
            continue
        name = configuration.name
        cells = [
            cell(mean(seeds.of(name, lambda o, n=length: router_recall(o.results, n)))) for length in lengths
        ]
        runs = seeds.complete_runs(name)
        best = "missing"
        if runs:
            by_layer = {
                layer: mean(
                    [
                        router_recall(o.results, n, layer)
                        for o in runs
                        for n in lengths
                        if router_recall(o.results, n, layer) is not None
                    ]
                )
                for layer in recall_layers(runs[0].results)
            }
            if by_layer:
                layer = max(by_layer, key=lambda key: by_layer[key])
                best = f"layer {layer} ({by_layer[layer]:.0f})"
        lines.append(f"| {configuration.title} | " + " | ".join(cells) + f" | {best} |")
    return lines


def cost_table(outputs: dict[str, RunOutputs]) -> list[str]:
    lines = [
        "| Run | status | card | training min | evaluation min | total min | trained tokens | calls |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals = {"train": 0.0, "eval": 0.0, "tokens": 0}
    for output in outputs.values():
        cost = output.cost
        if cost is None:
            lines.append(f"| {output.run.name} | {output.status} | - | - | - | - | - | 0 |")
            continue
        totals["train"] += cost["train_minutes"]
        totals["eval"] += cost["eval_minutes"]
        totals["tokens"] += cost["trained_tokens"]
        lines.append(
            f"| {output.run.name} | {output.status} | {', '.join(cost['cards'])} | "
            f"{cost['train_minutes']:.1f} | {cost['eval_minutes']:.1f} | {cost['total_minutes']:.1f} | "
            f"{cost['trained_tokens']:,} | {len(cost['calls'])} |"
        )
    lines.append(
        f"| all runs | | | {totals['train']:.1f} | {totals['eval']:.1f} | "
        f"{totals['train'] + totals['eval']:.1f} | {totals['tokens']:,} | |"
    )
    return lines


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------


@dataclass
class FigureData:
    """What the figures plot: the configurations with complete runs, their values per seed."""

    protocol: Protocol
    seeds: SeedValues
    configurations: list  # of the protocol's, those with at least one complete run
    complete: list[RunOutputs]

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.protocol.evaluation.tasks

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.protocol.evaluation.lengths


def error_bars(values_per_point: list[list[float]]):
    """Seed means, and the distances from each mean down to its seeds' minimum and up to their maximum."""
    means = [mean(v) if v else math.nan for v in values_per_point]
    below = [m - min(v) if v else 0 for m, v in zip(means, values_per_point)]
    above = [max(v) - m if v else 0 for m, v in zip(means, values_per_point)]
    return means, [below, above]


def label_by_length(axis, data: FigureData, ylabel: str, title: str) -> None:
    """A percentage against context length (log axis), the training length dotted."""
    lengths = data.lengths
    axis.axvline(data.protocol.training.seq_len, color="grey", linestyle=":", linewidth=1)
    axis.set(xscale="log", xlabel="context length (tokens)", ylabel=ylabel, ylim=(-3, 103), title=title)
    axis.set_xticks(lengths, [short_length(n) for n in lengths])
    axis.minorticks_off()


def niah_by_length_figure(plt, data: FigureData):
    """S-NIAH accuracy by length, one panel per task (Table 3 as a plot)."""
    tasks, lengths = data.tasks, data.lengths
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for configuration in data.configurations:
            per_length = [
                data.seeds.of(configuration.name, lambda o, n=n, t=task: accuracy(o.results, t, n))
                for n in lengths
            ]
            means, bars = error_bars(per_length)
            axis.errorbar(lengths, means, yerr=bars, marker="o", capsize=3, label=configuration.title)
        label_by_length(axis, data, "accuracy (%)", TASK_TITLES[task])
    axes[0][0].legend(fontsize="small")
    figure.suptitle("S-NIAH accuracy by length (seed mean, bars: seed range; dotted: training length)")
    return figure


def block_size_figure(plt, data: FigureData):
    """Block size against held-out perplexity and S-NIAH average (the paper's Figure 2); None without
    a complete MoBA run without key convolution."""
    block_configurations = [c for c in data.configurations if c.attention == "moba" and not c.kconv]
    if not block_configurations:
        return None
    tasks, lengths = data.tasks, data.lengths
    figure, left = plt.subplots(figsize=(6, 4))
    right = left.twinx()
    blocks = [c.block_size for c in block_configurations]
    perplexities = [
        data.seeds.of(c.name, lambda o: heldout_perplexity(o.results)) for c in block_configurations
    ]
    averages = [
        data.seeds.of(c.name, lambda o: retrieval_average(o.results, tasks, lengths))
        for c in block_configurations
    ]
    means, bars = error_bars(perplexities)
    left.errorbar(blocks, means, yerr=bars, marker="o", color="tab:blue", capsize=3)
    left.set(xscale="log", xlabel="block size B (k x B fixed)", ylabel="held-out perplexity per token")
    left.yaxis.label.set_color("tab:blue")
    means, bars = error_bars(averages)
    right.errorbar(blocks, means, yerr=bars, marker="s", color="tab:red", capsize=3)
    right.set_ylabel("S-NIAH average (%)", color="tab:red")
    left.set_xticks(blocks, [str(b) for b in blocks])
    left.minorticks_off()
    left.invert_xaxis()
    figure.suptitle("Block size at equal sparsity (seed mean and range)")
    return figure


def router_recall_figure(plt, data: FigureData):
    """Router recall of the needle block by length; None without a complete MoBA run."""
    moba_configurations = [c for c in data.configurations if c.attention == "moba"]
    if not moba_configurations:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for configuration in moba_configurations:
        per_length = [
            data.seeds.of(configuration.name, lambda o, n=n: router_recall(o.results, n))
            for n in data.lengths
        ]
        means, bars = error_bars(per_length)
        axis.errorbar(data.lengths, means, yerr=bars, marker="o", capsize=3, label=configuration.title)
    label_by_length(
        axis, data, "recall (%)", "Router recall of the needle block (mean over layers, heads, tasks)"
    )
    axis.legend(fontsize="small")
    return figure


def training_loss_figure(plt, data: FigureData):
    """The training loss of every complete run against trained tokens, a colour per configuration."""
    figure, axis = plt.subplots(figsize=(7, 4))
    colours = {c.name: f"C{i}" for i, c in enumerate(data.protocol.configurations)}
    for output in data.complete:
        rows = output.metrics
        axis.plot(
            [r["tokens"] for r in rows],
            [r["loss"] for r in rows],
            color=colours[output.run.configuration.name],
            alpha=0.6,
            linewidth=1,
            label=output.run.name,
        )
    axis.set(xlabel="trained tokens", ylabel="training loss (nats per token)", title="Training loss")
    axis.legend(fontsize="x-small", ncol=2)
    return figure


# The figures in the order of the report: file name (without .png), drawing function.
FIGURES = (
    ("niah_by_length", niah_by_length_figure),
    ("block_size", block_size_figure),
    ("router_recall", router_recall_figure),
    ("training_loss", training_loss_figure),
)


def make_figures(protocol: Protocol, outputs: dict[str, RunOutputs], figures_dir: Path) -> list[Path]:
    """The plots of the complete runs; none when there is no complete run."""
    complete = [o for o in outputs.values() if o.complete]
    if not complete:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures_dir.mkdir(parents=True, exist_ok=True)
    seeds = SeedValues(protocol, outputs)
    configurations = [c for c in protocol.configurations if seeds.complete_runs(c.name)]
    data = FigureData(protocol, seeds, configurations, complete)
    paths = []
    for name, draw in FIGURES:
        figure = draw(plt, data)
        if figure is None:
            continue
        figure.tight_layout()
        paths.append(figures_dir / f"{name}.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------


def commands_section(protocol: Protocol) -> list[str]:
    """The commands that make the runs and this report (in the file form, which starts the module)."""
    first = protocol.runs[0].name
    if protocol.pilot:
        return [
            "```bash",
            "python experiments/run.py --list --pilot",
            "python experiments/run.py dense-seed0 --device cpu --pilot      "
            "# about a minute per run on a CPU",
            "python experiments/report.py --pilot                            # this file",
            "```",
        ]
    return [
        (
            "On a machine of 4 GPUs, 12 runs per device call (the device tool's `run`, `timeout_s` 600): the "
            "runs of seeds 0-1, then those of seeds 2-3. Each card runs three, one after the other:"
        ),
        "",
        "```bash",
        'names() { python3 experiments/run.py --list | awk -v s="$1" '
        '\'$1 ~ ("-seed[" s "]$") {print $1}\'; }',
        "bash experiments/gpu_runs.sh $(names 01)     # outputs without checkpoints in $OUT/runs.tar.gz",
        "bash experiments/gpu_runs.sh $(names 23)     # (next call)",
        "```",
        "",
        (
            f"Or make one run by itself: `python3 experiments/run.py {first} --device cuda --max-minutes 9`. "
            "A run stopped by its deadline resumes from its last checkpoint when the same command is "
            "repeated on the same (warm) machine. Then, here:"
        ),
        "",
        "```bash",
        "tar -xzf <returned files>/runs.tar.gz        # experiments/runs/NAME/, outputs without checkpoints",
        "python experiments/report.py                 # rebuilds this file and its figures",
        "```",
        "",
        (
            f"Plan: {len(protocol.runs)} runs, estimated 2-2.5 H100 minutes each (training plus evaluation; "
            "see the cost estimate above), three per card in one 10-minute command on 4 cards. The cost "
            "table below has what each run took; the protocol does not change after any evaluation has been "
            "seen."
        ),
    ]


def settings_table(protocol: Protocol) -> list[str]:
    """What every run shares: model, data, budget, schedule, evaluation."""
    settings, evaluation = protocol.training, protocol.evaluation
    shape = json.dumps(settings.model_shape) if settings.model_shape else "its own shape"
    return [
        "| setting | value |",
        "|---|---|",
        f"| model | preset `{settings.preset}` with {shape} |",
        f"| training length | {settings.seq_len} tokens (byte tokenizer) |",
        (
            f"| batch | {settings.batch_size} rows x {settings.seq_len} = "
            f"{settings.tokens_per_step:,} tokens per step |"
        ),
        (
            f"| steps / token budget | {settings.max_steps} / {settings.token_budget:,} tokens, the same for "
            "every run |"
        ),
        (
            f"| optimiser | AdamW (0.9, 0.95), wd 0.1, clip 1.0, peak LR {settings.lr:g}, "
            f"{settings.warmup_steps} warmup steps, cosine to 10% |"
        ),
        (
            f"| data | corpus `{settings.corpus}`, {100 * settings.task_fraction:g}% of rows retrieval "
            "samples (niah1/2/3, passkey) |"
        ),
        f"| checkpoints / validation | every {settings.save_every} / {settings.eval_every} steps |",
        (
            f"| evaluation | {', '.join(TASK_TITLES[t] for t in evaluation.tasks)} at "
            f"{', '.join(str(n) for n in evaluation.lengths)} tokens, {evaluation.samples} samples per cell; "
            f"held-out perplexity over {evaluation.ppl_batches} batch(es) |"
        ),
    ]


def configurations_table(protocol: Protocol) -> list[str]:
    """Per configuration: its attention, block size, top-k, sparsity, key convolution and seeds."""
    settings = protocol.training
    lines = [
        "| configuration | global layers | B | k | sparsity at the training length | key conv | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for configuration in protocol.configurations:
        seeds = protocol.seeds_by_configuration.get(configuration.name, ())
        if configuration.attention == "moba":
            kept = configuration.block_size * configuration.topk / settings.seq_len
            lines.append(
                f"| {configuration.title} | MoBA | {configuration.block_size} | {configuration.topk} | "
                f"{1 - kept:.3g} ({settings.seq_len // configuration.block_size} blocks) | "
                f"{configuration.kconv or '-'} | {', '.join(map(str, seeds))} |"
            )
        else:
            lines.append(
                f"| {configuration.title} | dense (NoPE) | - | - | 0 | {configuration.kconv or '-'} | "
                f"{', '.join(map(str, seeds))} |"
            )
    return lines


def protocol_section(protocol: Protocol) -> list[str]:
    """The settings, the configurations, and the reasons for the choices (``JUSTIFICATION``)."""
    why = (
        "Why these choices (of the H100 protocol; the pilot only shrinks it):"
        if protocol.pilot
        else "Why these choices:"
    )
    return (
        settings_table(protocol)
        + [""]
        + configurations_table(protocol)
        + ["", why, ""]
        + [f"- **{choice}.** {reason}" for choice, reason in JUSTIFICATION]
    )


def reruns_section(protocol: Protocol, outputs: dict[str, RunOutputs], reruns_dir: Path) -> list[str]:
    """Runs repeated later (``reruns/NAME-TAG/``, the outputs of ``run.py`` moved there) against the seed
    ranges of their configuration: the issue's check that a rerun lands within the reported spread."""
    directories = sorted(path for path in reruns_dir.glob("*") if (path / "cost.json").exists())
    if not directories:
        return []
    tasks, lengths = protocol.evaluation.tasks, protocol.evaluation.lengths
    seeds = SeedValues(protocol, outputs)
    lines = [
        "| rerun | of run | card | S-NIAH average | seed range | within | held-out loss | seed range "
        "| within |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for directory in directories:
        cost = read_json(directory / "cost.json")
        rerun = RunOutputs(
            protocol.run(cost["run"]),
            read_jsonl(directory / "metrics.jsonl"),
            read_json(directory / "eval" / "results.json"),
            cost,
            protocol.training.max_steps,
        )
        if not rerun.complete:
            lines.append(f"| {directory.name} | {cost['run']} | | {rerun.status} | | | | | |")
            continue
        name = rerun.run.configuration.name
        cells = []
        for measure, digits in (
            (lambda o: retrieval_average(o.results, tasks, lengths), 1),
            (lambda o: heldout_loss(o.results), 4),
        ):
            value, spread = measure(rerun), seeds.of(name, measure)
            within = "yes" if spread and min(spread) <= value <= max(spread) else "no"
            low_high = f"{min(spread):.{digits}f}-{max(spread):.{digits}f}" if spread else "-"
            cells += [f"{value:.{digits}f}", low_high, within]
        lines.append(
            f"| {directory.name} | {cost['run']} | {', '.join(cost['cards'])} | " + " | ".join(cells) + " |"
        )
    return lines


def scale_difference(protocol: Protocol) -> str:
    """The scale line of "Differences from the paper", from the protocol's own numbers."""
    import torch

    from flashmoba.models import HybridLM, model_config_from_preset

    settings = protocol.training
    config = model_config_from_preset(settings.preset, **settings.model_shape)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in HybridLM(config).parameters())
    paper_length = 8192
    return (
        f"- Scale: {parameters / 1e6:.2f}M parameters and {settings.token_budget / 1e6:.1f}M byte tokens "
        "per run against 340M/1B parameters and 100B Llama-2 tokens; "
        f"{config.num_layers} layers instead of 24; training length {settings.seq_len} instead of "
        f"{paper_length}, blocks {paper_length // settings.seq_len}x smaller at the same block count."
    )


def titled(heading: str, body: list[str], intro: str | None = None) -> list[str]:
    """A ``##`` section: the heading, an optional paragraph, then ``body``, each followed by a blank line."""
    return [f"## {heading}", ""] + ([intro, ""] if intro is not None else []) + body + [""]


def opening_lines(protocol: Protocol, outputs: dict[str, RunOutputs]) -> list[str]:
    """The title, what the report is made from, and the warnings of a pilot or of a protocol not yet run."""
    complete = [o for o in outputs.values() if o.complete]
    lines = [f"# {protocol.title}", ""]
    if protocol.pilot:
        lines += [
            (
                "**This is a CPU check of the pipeline, with no evidential value.** The protocol is shrunk "
                f"(preset `{protocol.training.preset}`, {protocol.training.max_steps} steps, training length "
                f"{protocol.training.seq_len}, block sizes divided by {protocol_module.PILOT_SCALE}, "
                f"{protocol.evaluation.samples} samples per cell) so that train, evaluate, cost and report "
                "run end to end in about a minute per run. Its numbers say nothing about the paper's claims."
            ),
            "",
        ]
    lines += [
        (
            f"Generated by `python experiments/report.py{' --pilot' if protocol.pilot else ''}` from "
            f"`{protocol.runs_dir}/`: {len(complete)} of {len(outputs)} runs complete. Issue 6; paper: "
            '"Optimizing Mixture of Block Attention" (arXiv 2511.11571), its Tables 1 and 3.'
        ),
        "",
    ]
    if not complete:
        lines += [
            (
                "**No run of this protocol has been made yet** (the H100 runs are planned for a later "
                'session). Every table shows its runs as missing and every verdict is "not run".'
            ),
            "",
        ]
    return lines


def verdicts_section(
    protocol: Protocol, outputs: dict[str, RunOutputs], verdicts: list[Verdict]
) -> list[str]:
    """One row per claim; with seeds added after the pre-registered ones, the verdict on those beside."""
    preregistered = {
        name: o for name, o in outputs.items() if o.run.seed in protocol_module.PREREGISTERED_SEEDS
    }
    added_seeds = len(preregistered) < len(outputs)
    preregistered_verdicts = [evaluate_claim(claim, protocol, preregistered) for claim in CLAIMS]
    preregistered_text = ", ".join(map(str, protocol_module.PREREGISTERED_SEEDS))
    if added_seeds:
        table = [
            f"| claim | verdict, all seeds | verdict, pre-registered seeds ({preregistered_text}) | "
            "deciding runs complete |",
            "|---|---|---|---|",
        ]
    else:
        table = ["| claim | verdict | deciding runs complete |", "|---|---|---|"]
    for verdict, early in zip(verdicts, preregistered_verdicts):
        deciding = [o for o in outputs.values() if o.run.configuration.name in verdict.claim.deciding]
        table.append(
            f"| {verdict.claim.number}. {verdict.claim.statement} | **{verdict.verdict}** | "
            + (f"{early.verdict} | " if added_seeds else "")
            + f"{sum(o.complete for o in deciding)} of {len(deciding)} |"
        )
    rule = (
        "Rule: a check **holds** when the seed ranges of the two configurations do not overlap in the "
        "claimed direction, is **reversed** when they do not overlap the other way, and is unresolved when "
        "they overlap. A claim is *reproduced* when all its checks hold, *not reproduced* when one is "
        "reversed, *inconclusive* otherwise or when a deciding run is missing, and *not run* when none of "
        "its deciding runs is complete. The thresholds were fixed in `experiments/protocol.py` before any "
        "run."
        + (
            f" Seeds {preregistered_text} were fixed before any run; the others were added after their "
            "results (see Protocol), and the details below use all seeds."
            if added_seeds
            else ""
        )
    )
    return titled("Verdicts", table + ["", rule])


def discussion_section(
    discussion_path: Path, heading: str = "Discussion (written after the runs)"
) -> list[str]:
    """A discussion beside the report (``DISCUSSION.md``), written by hand after the runs; nothing
    without it."""
    if not discussion_path.exists():
        return []
    return titled(heading, [discussion_path.read_text().strip()])


def results_sections(protocol: Protocol, outputs: dict[str, RunOutputs]) -> list[str]:
    """The language-modelling, retrieval and router-recall tables."""
    tasks, lengths = protocol.evaluation.tasks, protocol.evaluation.lengths
    language_modelling = titled(
        "Language modelling (the shape of Table 1)",
        language_modelling_table(protocol, outputs),
        "Held-out text: the validation split of the corpus, at the training length. The paper's "
        "commonsense tasks are left out (a byte-level model of this size scores at chance on them). "
        "Cells: seed mean (min-max, seeds).",
    )
    retrieval = titled(
        "Retrieval (the shape of Table 3)",
        retrieval_table_by_configuration(protocol, outputs)
        + ["", "Per run:", ""]
        + retrieval_table_by_run(protocol, outputs),
        f"S-NIAH accuracy (%) by task (N1, N2, N3 = S-NIAH-1/2/3) and context length, trained at "
        f"{protocol.training.seq_len}; Avg is the mean of the {len(tasks) * len(lengths)} "
        "cells, with its seed range. Cells are seed means.",
    )
    recall = titled(
        "Router recall of the needle block",
        router_recall_table(protocol, outputs),
        "Share (%) of (sample, query head) pairs whose selected blocks for the last prompt token include a "
        "block holding the needle's value; mean over MoBA layers, heads and tasks, then over seeds.",
    )
    return language_modelling + retrieval + recall


def figures_section(figures: list[Path], report_dir: Path) -> list[str]:
    links = [f"![{path.stem}]({path.relative_to(report_dir).as_posix()})" for path in figures]
    return titled("Figures", links or ["None: no run is complete."])


def claim_details(protocol: Protocol, verdict: Verdict) -> list[str]:
    """A claim's statement, evidence, rule, checks with their numbers, missing runs and notes."""
    claim = verdict.claim
    lines = [
        f"### Claim {claim.number}: {verdict.verdict}",
        "",
        claim.statement,
        "",
        f"- Paper: {claim.paper_evidence}",
        f"- Deciding configurations: {', '.join(protocol.configuration(n).title for n in claim.deciding)}.",
        f"- Rule: {verdict.rule}",
    ]
    lines += [
        f"- Check {check.description}: **{check.outcome}**. {check.numbers}" for check in verdict.checks
    ]
    if verdict.missing_runs:
        lines.append(f"- Missing runs: {', '.join(verdict.missing_runs)}.")
    lines += [f"- Not used by the verdict: {note}." for note in verdict.notes]
    return lines


def claims_section(protocol: Protocol, verdicts: list[Verdict]) -> list[str]:
    body = []
    for index, verdict in enumerate(verdicts):
        body += ([""] if index else []) + claim_details(protocol, verdict)
    return titled("Claims in detail", body)


def cost_section(outputs: dict[str, RunOutputs]) -> list[str]:
    return titled(
        "Cost of every run",
        cost_table(outputs),
        "Wall-clock minutes of `flashmoba train` and `flashmoba eval` as measured by `run.py` (cost.json), "
        "the card they ran on, and the tokens trained.",
    )


def reruns_report_section(protocol: Protocol, outputs: dict[str, RunOutputs], reruns_dir: Path) -> list[str]:
    """The reruns table under its heading; nothing without reruns."""
    reruns = reruns_section(protocol, outputs, reruns_dir)
    if not reruns:
        return []
    return titled(
        "Reruns",
        reruns,
        "A run made again later, possibly on another card, against the seed ranges of its configuration "
        "(all seeds). The same seed gives the same initialisation and batches; what differs is the "
        "arithmetic: the card's kernels and the order of floating-point atomics in the backward.",
    )


def differences_section(protocol: Protocol) -> list[str]:
    """How the GPU protocol differs from the paper (the pilot's report shows the GPU protocol's too)."""
    gpu_protocol = protocol_module.PROTOCOL
    return titled(
        "Differences from the paper" + (" (of the GPU protocol)" if protocol.pilot else ""),
        [
            scale_difference(gpu_protocol),
            (
                "- Data: Python's own sources and help text instead of FineWeb-Edu (no network on the GPU "
                "machine); the retrieval task format is part of the training mixture (answers weighted "
                f"{gpu_protocol.training.answer_loss_weight:g}x in the loss), while the paper tests "
                "zero-shot."
            ),
            (
                "- Evaluation: S-NIAH at half to 8x the training length, 100 samples per cell (paper: 1000); "
                "no commonsense tasks, no LongBench; held-out perplexity of the corpus instead of WikiText."
            ),
            "- Router recall is measured here; the paper does not report it.",
        ],
    )


def build_report(
    protocol: Protocol, runs_dir: Path, report_path: Path, figures_dir: Path, runs19_dir: Path | None = None
) -> str:
    """Write the report of ``protocol``'s runs under ``runs_dir`` to ``report_path`` (figures into
    ``figures_dir``); returns its text. With ``runs19_dir``, the issue-19 part follows (its design's runs
    there, paired with ``protocol``'s)."""
    outputs = load_runs(protocol, runs_dir)
    verdicts = [evaluate_claim(claim, protocol, outputs) for claim in CLAIMS]
    figures = make_figures(protocol, outputs, figures_dir)
    report_dir = report_path.parent
    lines = (
        opening_lines(protocol, outputs)
        + verdicts_section(protocol, outputs, verdicts)
        + discussion_section(report_dir / "DISCUSSION.md")
        + titled("Protocol", protocol_section(protocol))
        + titled("Commands", commands_section(protocol))
        + results_sections(protocol, outputs)
        + figures_section(figures, report_dir)
        + claims_section(protocol, verdicts)
        + cost_section(outputs)
        + reruns_report_section(protocol, outputs, report_dir / "reruns")
        + differences_section(protocol)
    )
    if runs19_dir is not None:
        from experiments import report19

        protocol19 = protocol_for(protocol.pilot, "issue19")
        pool = report19.load_pool(protocol, runs_dir, protocol19, runs19_dir)
        pointer = (
            "Issue 19 (a RoPE dense baseline, the router SNR inside trained layers, paired verdicts) follows "
            "the issue-6 report below: see its section at the end."
        )
        first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
        lines = lines[:first_section] + [pointer, ""] + lines[first_section:]
        lines = lines + [""] + report19.issue19_sections(pool, runs19_dir, figures_dir, report_dir)
    text = "\n".join(lines)
    report_dir.mkdir(parents=True, exist_ok=True)
    report_path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pilot", action="store_true", help="the CPU pipeline check (experiments/pilot/)")
    parser.add_argument("--runs", help="runs directory (default: the protocol's)")
    parser.add_argument("--out", help="report path (default: the protocol's)")
    parser.add_argument("--figures", help="figures directory (default: the protocol's)")
    parser.add_argument("--runs19", help="issue-19 runs directory (default: PROTOCOL_19's)")
    args = parser.parse_args(argv)
    protocol = protocol_for(args.pilot)
    report_path = Path(args.out) if args.out else REPO_ROOT / protocol.report_path
    build_report(
        protocol,
        Path(args.runs) if args.runs else REPO_ROOT / protocol.runs_dir,
        report_path,
        Path(args.figures) if args.figures else REPO_ROOT / protocol.figures_dir,
        Path(args.runs19) if args.runs19 else REPO_ROOT / protocol_for(args.pilot, "issue19").runs_dir,
    )
    print(f"wrote {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
