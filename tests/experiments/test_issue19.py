"""Issue 19's design: the protocol object, the paired rule, the report's pending state, the run's SNR step."""

from dataclasses import replace

import pytest

from experiments import report19
from experiments.protocol import (
    CLAIMS_19,
    PILOT_PROTOCOL_19,
    PROTOCOL,
    PROTOCOL_19,
    PairedCheck,
    protocol_for,
)


def test_issue19_runs_train_exactly_as_issue6_except_the_rope_baseline():
    assert len(PROTOCOL_19.runs) == len(set(r.name for r in PROTOCOL_19.runs)) == 16
    assert [r.name for r in PROTOCOL_19.runs] == list(PROTOCOL_19.run_order)
    old = PROTOCOL.run("moba-32-seed0")
    for run in PROTOCOL_19.runs:
        config = PROTOCOL_19.train_config(run)
        model = dict(config["model"])
        if run.configuration.name == "dense-rope":
            assert model.pop("global_rope") is True
            reference = PROTOCOL.train_config(replace(PROTOCOL.run("dense-seed0"), seed=run.seed))
        else:
            assert "global_rope" not in model
            reference = PROTOCOL.train_config(replace(old, configuration=run.configuration, seed=run.seed))
        assert {**config, "model": model} == reference
    # The issue-6 protocol and its configs are unchanged by the new field.
    assert all("global_rope" not in PROTOCOL.train_config(r)["model"] for r in PROTOCOL.runs)
    assert protocol_for(False) is PROTOCOL and protocol_for(True, "issue19") is PILOT_PROTOCOL_19
    with pytest.raises(ValueError):
        protocol_for(False, "issue7")


def test_claim3_is_judged_under_both_baselines():
    baselines = {claim.baseline for claim in CLAIMS_19 if claim.number == 3}
    assert baselines == {"NoPE", "RoPE"}
    for claim in CLAIMS_19:
        for name in claim.deciding:
            PROTOCOL_19.configuration(name)  # every deciding configuration exists


def check(claimed="higher", threshold=0.0, paper=None):
    return PairedCheck("x", "niah_average", "a", "b", claimed, threshold, paper)


def test_paired_rule():
    assert report19.judge(check(), {0: 10.0, 1: 12.0, 2: 11.0}).verdict == "holds"
    assert report19.judge(check(), {0: -10.0, 1: -12.0, 2: -11.0}).verdict == "reversed"
    # Spread too wide for either side, but the paper's effect (+30) is excluded.
    assert report19.judge(check(paper=30.0), {0: -5.0, 1: 6.0, 2: 1.0}).verdict == report19.BELOW_PAPER
    assert report19.judge(check(paper=3.0), {0: -5.0, 1: 6.0, 2: 1.0}).verdict == "unresolved"
    assert report19.judge(check(), {0: 10.0, 1: 12.0}).verdict == "unresolved"  # fewer than MIN_PAIRS
    # No value at all: pending while runs are missing, unresolved once every run is made (e.g. no seed
    # learned the task that a retention check needs).
    assert report19.judge(check(), {}, runs_missing=True).verdict == report19.PENDING
    assert report19.judge(check(), {}).verdict == "unresolved"
    lower = check("lower", 1.0)
    assert report19.judge(lower, {0: 7.5, 1: 5.8, 2: 6.0, 3: 8.8}).verdict == "reversed"
    assert report19.judge(lower, {0: 0.1, 1: -0.2, 2: 0.0}).verdict == "holds"
    result = report19.judge(check(), {0: 1.0, 1: 2.0, 2: 3.0})
    assert result.mean == 2.0 and result.low == pytest.approx(2.0 - 2.920 / 3**0.5)


def test_snr_of_an_earlier_training_is_recognised_from_the_cost_records():
    def call(before, after, snr):
        return {"steps_before": before, "steps_after": after, "snr": snr}

    one_training = {"calls": [call(0, 600, "skipped"), call(600, 1000, "finished")]}
    assert not report19.snr_from_earlier_training(one_training)
    # Measured, then the checkpoints were lost and the run was trained again from step 0.
    retrained = {"calls": [call(0, 1000, "finished"), call(0, 990, "skipped"), call(900, 1000, "skipped")]}
    assert report19.snr_from_earlier_training(retrained)
    # Trained again and measured again: the SNR belongs to the last training.
    remeasured = {"calls": [call(0, 1000, "finished"), call(0, 1000, "finished")]}
    assert not report19.snr_from_earlier_training(remeasured)
    assert not report19.snr_from_earlier_training({"calls": [call(0, 1000, "skipped")]})


def test_report_is_pending_without_issue19_runs(tmp_path):
    from experiments.report import build_report

    text = build_report(
        PROTOCOL, tmp_path / "runs", tmp_path / "REPORT.md", tmp_path / "figures", tmp_path / "runs19"
    )
    assert "# Issue 19" in text
    assert "0 of 16 issue-19 runs complete" in text
    section = text[text.index("## Verdicts (issue 19)") :]
    table = section[: section.index("Rule:")]
    assert table.count("**pending**") == len(CLAIMS_19)
    assert "Pending: no issue-19 run has measured it yet." in text


def test_a_tiny_issue19_run_measures_the_router_snr_and_resumes(tmp_path):
    from experiments import run as run_module
    from experiments.protocol import EvaluationSettings, SnrSettings

    tiny = replace(
        PILOT_PROTOCOL_19,
        training=replace(PILOT_PROTOCOL_19.training, max_steps=2, batch_size=1, eval_every=2, save_every=2),
        evaluation=EvaluationSettings(lengths=(512,), tasks=("niah1",), samples=1, ppl_batches=1),
        seeds_by_configuration={"moba-32": (4,)},
        run_order=(),
        snr=SnrSettings(lengths=(512,), tasks=("niah1",), samples=1),
        runs_dir=str(tmp_path / "runs"),
    )
    run = tiny.run("moba-32-seed4")
    cost = run_module.make_run(tiny, run, "cpu", max_minutes=None)
    assert cost["calls"][-1]["snr"] == "finished" and "snr_minutes" in cost
    import json

    snr = json.loads((tmp_path / "runs" / "moba-32-seed4" / "eval" / "snr.json").read_text())
    assert [row["layer"] for row in snr["layers"]] == [1, 3] and snr["samples"] == 1
    again = run_module.make_run(tiny, run, "cpu", max_minutes=None)
    assert again["calls"][-1]["snr"].startswith("skipped")
    assert again["calls"][-1]["steps_before"] == 2  # resumed from its checkpoint, nothing to train

    # A fresh machine: the outputs arrive without checkpoints. The complete run is left as it is.
    import shutil

    directory = tmp_path / "runs" / "moba-32-seed4"
    metrics_before = (directory / "metrics.jsonl").read_text()
    shutil.rmtree(directory / "checkpoints")
    elsewhere = run_module.make_run(tiny, run, "cpu", max_minutes=None)
    assert elsewhere == again and len(elsewhere["calls"]) == 2
    assert (directory / "metrics.jsonl").read_text() == metrics_before
    assert not (directory / "checkpoints").exists()

    # A fresh machine again, now with a run whose earlier training was measured (router SNR) but not
    # finished evaluating when its checkpoints were lost: it trains again from step 0, and the earlier
    # training's outputs move aside instead of counting as this training's measurements.
    snr_before = (directory / "eval" / "snr.json").read_text()
    (directory / "eval" / "results.json").unlink()
    retrained = run_module.make_run(tiny, run, "cpu", max_minutes=None)
    assert retrained["calls"][-1]["steps_before"] == 0
    assert retrained["calls"][-1]["snr"] == "finished" and retrained["calls"][-1]["evaluation"] == "finished"
    (earlier,) = (directory / "earlier_training").iterdir()
    assert (earlier / "metrics.jsonl").read_text() == metrics_before
    assert (earlier / "eval" / "snr.json").read_text() == snr_before
    assert not (earlier / "eval" / "results.json").exists()
    assert (directory / "eval" / "results.json").exists() and (directory / "checkpoints").exists()
