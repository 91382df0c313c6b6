"""experiments/report.py: its verdict rules, and the report built from synthetic run outputs (in the formats
of flashmoba train / eval and of experiments.run), reruns included."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from experiments import protocol as protocol_module
from experiments import report
from experiments.protocol import PROTOCOL

TRAIN_LENGTH = PROTOCOL.training.seq_len


# ----------------------------------------------------------------------------------------------------
# Synthetic outputs, in the formats train.py, evaluate.py and run.py write
# ----------------------------------------------------------------------------------------------------


def write_metrics(directory: Path, steps: int, final_loss: float) -> None:
    """metrics.jsonl as flashmoba train writes it: one row per logged step, val_loss at evaluations."""
    tokens_per_step = PROTOCOL.training.tokens_per_step
    rows = []
    for step in range(100, steps + 1, 100):
        row = {
            "step": step,
            "loss": final_loss + 1.0 / step,
            "lr": 6e-4,
            "tokens_per_s": 250000.0,
            "grad_norm": 0.5,
            "tokens": step * tokens_per_step,
            "elapsed_s": step * 0.25,
        }
        if step % 500 == 0 or step == steps:
            row["val_loss"] = final_loss + 0.01
        rows.append(row)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_results(
    directory: Path, configuration, loss: float, accuracy_by_task_length, recall: float
) -> None:
    """eval/results.json as flashmoba eval writes it."""
    evaluation = PROTOCOL.evaluation
    layers = ["1", "3", "5", "7", "9", "11"] if configuration.attention == "moba" else []
    retrieval = [
        {
            "task": task,
            "length": length,
            "samples": evaluation.samples,
            "accuracy": accuracy_by_task_length(task, length) / 100,
            "token_accuracy": min(1.0, accuracy_by_task_length(task, length) / 100 + 0.1),
            "router_recall": {layer: recall for layer in layers},
        }
        for task in evaluation.tasks
        for length in evaluation.lengths
    ]
    summary = {
        "checkpoint": str(directory / "checkpoints" / f"step_{PROTOCOL.training.max_steps:07d}.pt"),
        "model": {"global_attention": configuration.attention},
        "lengths": list(evaluation.lengths),
        "tasks": list(evaluation.tasks),
        "samples": evaluation.samples,
        "distractors": 0,
        "heldout": {
            "loss": loss,
            "perplexity": 2.718281828**loss,
            "bits_per_token": loss / 0.693147,
            "tokens": 1_000_000,
        },
        "retrieval": retrieval,
    }
    (directory / "eval").mkdir(parents=True, exist_ok=True)
    (directory / "eval" / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


def write_cost(directory: Path, minutes: float) -> None:
    call = {
        "started_utc": "2026-11-27T10:00:00+00:00",
        "device": "cuda",
        "python": "3.12.3",
        "train_minutes": minutes,
        "eval_minutes": 1.0,
        "steps_before": 0,
        "card": "NVIDIA H100 80GB HBM3",
        "torch": "2.11.0",
        "steps_after": PROTOCOL.training.max_steps,
        "training": "finished",
        "evaluation": "finished",
    }
    cost = {
        "run": directory.name,
        "calls": [call],
        "cards": [call["card"]],
        "train_minutes": minutes,
        "eval_minutes": 1.0,
        "total_minutes": minutes + 1.0,
        "trained_tokens": PROTOCOL.training.token_budget,
        "trained_steps": PROTOCOL.training.max_steps,
    }
    (directory / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")


# Per configuration and seed: (held-out loss, S-NIAH accuracy at or below the training length, beyond it).
SYNTHETIC = {
    "dense": [(1.000, 90, 0), (1.004, 88, 4)],
    "moba-128": [(1.060, 40, 30), (1.064, 44, 26)],
    "moba-64": [(1.040, 60, 50), (1.045, 58, 52)],
    "moba-32": [(1.020, 80, 70), (1.026, 76, 72)],
    "moba-32-kconv5": [(1.021, 70, 60), (1.024, 72, 58)],  # below moba-32: claim 2 reversed
    "moba-32-kconv3": [(1.022, 79, 70), None],  # seed 1 missing
}


# The synthetic outputs have the pre-registered seeds 0-1; the protocol's added seeds get their own test.
TWO_SEEDS = replace(
    PROTOCOL, seeds_by_configuration={name: (0, 1) for name in PROTOCOL.seeds_by_configuration}
)


def write_synthetic_runs(runs_dir: Path, skip: set[str] = frozenset(), synthetic: dict = SYNTHETIC) -> None:
    for run in PROTOCOL.runs:
        if run.seed >= len(synthetic[run.configuration.name]):
            continue
        values = synthetic[run.configuration.name][run.seed]
        if values is None or run.name in skip:
            continue
        loss, within, beyond = values
        directory = runs_dir / run.name
        directory.mkdir(parents=True)
        write_metrics(directory, PROTOCOL.training.max_steps, loss)
        write_results(
            directory,
            run.configuration,
            loss,
            lambda task, length, w=within, b=beyond: w if length <= TRAIN_LENGTH else b,
            recall=0.5,
        )
        write_cost(directory, minutes=6.0)


def niah_average(within: float, beyond: float) -> float:
    lengths = PROTOCOL.evaluation.lengths
    return sum(within if n <= TRAIN_LENGTH else beyond for n in lengths) / len(lengths)


# ----------------------------------------------------------------------------------------------------
# Verdict rules
# ----------------------------------------------------------------------------------------------------


def test_seed_comparison_needs_non_overlapping_ranges():
    assert report.compare_seeds([60, 62], [50, 55], higher_is_better=True) == report.HOLDS
    assert report.compare_seeds([50, 55], [60, 62], higher_is_better=True) == report.REVERSED
    assert report.compare_seeds([50, 61], [60, 62], higher_is_better=True) == report.UNRESOLVED
    assert report.compare_seeds([1.0, 1.01], [1.02, 1.03], higher_is_better=False) == report.HOLDS


def test_retention_and_closeness_rules():
    # keeps >= half of its accuracy at the training length, on every seed
    assert report.compare_retention([90, 100], [60, 55], expect_retained=True) == report.HOLDS
    assert report.compare_retention([90, 100], [0, 4], expect_retained=False) == report.HOLDS
    assert report.compare_retention([90, 100], [0, 4], expect_retained=True) == report.REVERSED
    assert report.compare_retention([90, 100], [40, 60], expect_retained=True) == report.UNRESOLVED
    assert (
        report.compare_retention([10, 100], [0, 0], expect_retained=False) == report.UNRESOLVED
    )  # never learned
    tolerance = protocol_module.LM_CLOSENESS
    assert report.compare_closeness([1.005, 1.009], [1.0, 1.001], tolerance) == report.HOLDS
    assert report.compare_closeness([1.03, 1.04], [1.0, 1.001], tolerance) == report.REVERSED
    assert report.compare_closeness([1.005, 1.03], [1.0, 1.001], tolerance) == report.UNRESOLVED


# ----------------------------------------------------------------------------------------------------
# The report from synthetic outputs
# ----------------------------------------------------------------------------------------------------


def test_report_from_synthetic_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    write_synthetic_runs(runs_dir)
    text = report.build_report(TWO_SEEDS, runs_dir, tmp_path / "REPORT.md", tmp_path / "figures")
    assert (tmp_path / "REPORT.md").read_text() == text

    outputs = report.load_runs(TWO_SEEDS, runs_dir)
    verdicts = {
        v.claim.number: v
        for v in (report.evaluate_claim(c, TWO_SEEDS, outputs) for c in protocol_module.CLAIMS)
    }
    assert verdicts[1].verdict == report.REPRODUCED  # moba-32 beats moba-128 on every seed, both measures
    assert verdicts[2].verdict == report.NOT_REPRODUCED  # kconv5 below moba-32 on every seed
    assert verdicts[3].verdict == report.REPRODUCED  # dense 90 -> 0/4, moba-32-kconv5 70 -> 60
    assert verdicts[4].verdict == report.NOT_REPRODUCED  # moba-32 2.0-2.6% above dense: beyond 1%
    assert [c.outcome for c in verdicts[3].checks] == [report.HOLDS] * 3
    assert "moba-32-kconv3-seed1" not in verdicts[2].missing_runs  # kconv3 only informs claim 2

    # Table 3's shape: per-run average, seed mean of the cells, the missing run shown as missing
    expected = niah_average(80, 70)
    assert "| moba-32-seed0 | 80 | 80 | 70 | 70 | 70 |" in text
    assert f"| {expected:.1f} |" in text
    assert "| moba-32-kconv3-seed1 | " + " | ".join(["missing"] * 16) + " |" in text
    assert "| MoBA-32 + kconv3 | 79 | 79 |" in text and "(1 seed)" in text
    assert "| moba-32-kconv3-seed1 | missing | - |" in text  # cost table
    assert "NVIDIA H100 80GB HBM3" in text and "| all runs | | | 66.0 | 11.0 | 77.0 |" in text
    assert "| MoBA-32 (k=8) | 50 | 50 | 50 | 50 | 50 | layer 1 (50) |" in text  # router recall
    assert "No run of this protocol has been made yet" not in text
    for name in ("niah_by_length", "block_size", "router_recall", "training_loss"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0
        assert f"(figures/{name}.png)" in text


def test_missing_deciding_runs_make_claims_inconclusive_or_not_run(tmp_path):
    runs_dir = tmp_path / "runs"
    write_synthetic_runs(runs_dir, skip={"moba-32-seed1", "dense-seed0", "dense-seed1"})
    outputs = report.load_runs(TWO_SEEDS, runs_dir)
    verdicts = [report.evaluate_claim(c, TWO_SEEDS, outputs).verdict for c in protocol_module.CLAIMS]
    assert verdicts == [report.INCONCLUSIVE, report.INCONCLUSIVE, report.INCONCLUSIVE, report.INCONCLUSIVE]

    # a run whose training stopped early does not count, and says where it stopped
    partial = runs_dir / "dense-seed0"
    partial.mkdir()
    write_metrics(partial, 300, 1.0)
    assert (
        report.load_runs(TWO_SEEDS, runs_dir)["dense-seed0"].status
        == f"training stopped at step 300 of {PROTOCOL.training.max_steps}"
    )

    empty = tmp_path / "empty"
    text = report.build_report(TWO_SEEDS, empty, tmp_path / "EMPTY.md", tmp_path / "no-figures")
    assert text.count("**not run**") == len(protocol_module.CLAIMS)
    assert "No run of this protocol has been made yet" in text
    assert "None: no run is complete." in text and not (tmp_path / "no-figures").exists()
    assert "1.0" not in text.split("## Language modelling")[1].split("## Figures")[0]  # no number is made up


def test_added_seeds_are_judged_beside_the_preregistered_ones(tmp_path):
    # Seeds 2-3 copy seeds 0-1, except that MoBA-32's seed 2 falls into MoBA-128's range on both measures.
    synthetic = {name: values + values for name, values in SYNTHETIC.items()}
    synthetic["moba-32"] = synthetic["moba-32"][:2] + [(1.062, 42, 30), synthetic["moba-32"][3]]
    runs_dir = tmp_path / "runs"
    write_synthetic_runs(runs_dir, synthetic=synthetic)
    text = report.build_report(PROTOCOL, runs_dir, tmp_path / "REPORT.md", tmp_path / "figures")
    preregistered_seeds = ", ".join(map(str, protocol_module.PREREGISTERED_SEEDS))
    assert f"| claim | verdict, all seeds | verdict, pre-registered seeds ({preregistered_seeds}) |" in text
    claim_1 = next(line for line in text.splitlines() if line.startswith("| 1. "))
    assert f"| **{report.INCONCLUSIVE}** | {report.REPRODUCED} |" in claim_1
    claim_2 = next(
        line for line in text.splitlines() if line.startswith("| 2. ")
    )  # its range now overlaps too
    assert f"| **{report.INCONCLUSIVE}** | {report.NOT_REPRODUCED} |" in claim_2
    claim_4 = next(line for line in text.splitlines() if line.startswith("| 4. "))  # still > 1% above dense
    assert f"| **{report.NOT_REPRODUCED}** | {report.NOT_REPRODUCED} |" in claim_4


def test_reruns_are_checked_against_the_seed_ranges(tmp_path):
    write_synthetic_runs(tmp_path / "runs")
    configuration = TWO_SEEDS.configuration("moba-32")
    # moba-32's seeds: losses 1.020 / 1.026, S-NIAH 80 / 76 within the training length, 70 / 72 beyond.
    for name, loss, within, beyond in (("inside", 1.023, 78, 71), ("outside", 1.030, 90, 90)):
        directory = tmp_path / "reruns" / f"moba-32-seed0-{name}"
        directory.mkdir(parents=True)
        write_metrics(directory, PROTOCOL.training.max_steps, loss)
        write_results(
            directory,
            configuration,
            loss,
            lambda task, length, w=within, b=beyond: w if length <= TRAIN_LENGTH else b,
            recall=0.5,
        )
        write_cost(directory, minutes=2.0)
        cost = json.loads((directory / "cost.json").read_text())
        (directory / "cost.json").write_text(json.dumps(dict(cost, run="moba-32-seed0")))
    text = report.build_report(TWO_SEEDS, tmp_path / "runs", tmp_path / "REPORT.md", tmp_path / "figures")
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in text.split("## Reruns")[1].splitlines()
        if "seed0-" in line
    }
    assert rows["moba-32-seed0-inside"].endswith("| yes | 1.0230 | 1.0200-1.0260 | yes |")
    assert rows["moba-32-seed0-outside"].endswith("| no | 1.0300 | 1.0200-1.0260 | no |")
