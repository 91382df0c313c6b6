"""flashmoba train refuses what would waste or destroy a run (issue 14): bad settings before anything is
written, non-finite steps before their checkpoint, another run's directory, silent config changes on
resume, corrupt checkpoints (``--resume auto`` falls back), and partial metrics lines.

One small run (``base_run``: 4 steps, checkpoints at 2 and 4) is trained once; each test works on a copy
and, where the command must refuse, checks that the copy is left byte for byte as it was."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from flashmoba.cli import train as train_command
from flashmoba.cli.train import build_parser, parse_config
from flashmoba.models.checkpoint import CheckpointError, write_checksum
from flashmoba.training import loop
from flashmoba.training.config import train_config_from_dict
from flashmoba.training.run_directory import plan_run, trim_metrics, write_run_config
from flashmoba.training.runtime import resolve_device


def run_args(out: Path, corpus: str, *extra: str) -> list[str]:
    """The smallest run the tiny preset makes: rows of 64 tokens, one per step, one validation batch."""
    return [
        *("--preset", "tiny", "--corpus", corpus, "--seq-len", "64", "--batch-size", "1"),
        *("--eval-batches", "1", "--device", "cpu", "--out", str(out), "--no-progress"),
        *extra,
    ]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    assert train_command.main(run_args(out, corpus, "--max-steps", "4", "--save-every", "2")) == 0
    return out


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def resume_auto(run: Path, corpus: str, *extra: str) -> list[str]:
    return run_args(run, corpus, "--max-steps", "4", "--save-every", "2", "--resume", "auto", *extra)


# ----------------------------------------------------------------------------------------------------
# Class 8: settings checked before the first step, the field named
# ----------------------------------------------------------------------------------------------------

BAD_FLAGS = [
    (["--lr", "nan"], ValueError, "lr must be finite, got nan"),
    (["--lr", "inf"], ValueError, "lr must be finite, got inf"),
    (["--lr", "0"], ValueError, "lr must be > 0"),
    (["--lr=-1e-3"], ValueError, "lr must be > 0"),
    (["--grad-clip", "-1"], ValueError, "grad_clip must be > 0, got -1.0"),
    (["--weight-decay", "-0.1"], ValueError, "weight_decay must be >= 0, got -0.1"),
    (["--seed", "-1"], ValueError, "seed must be >= 0, got -1"),
    (["--device", "gpu"], ValueError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["--device", "cuda:x"], ValueError, "device must be .* got 'cuda:x'"),
    (["--out", ""], ValueError, "out must be a non-empty path, got ''"),
    (["--resume", ""], ValueError, "resume must be a non-empty path, got ''"),
    (["--beta2", "1"], ValueError, r"beta2 must be in \[0, 1\), got 1.0"),
    (["--data.val-fraction", "0"], ValueError, r"data.val_fraction must be in \(0, 1\)"),
]

BAD_FILE_VALUES = [
    ({"lr": "1e-3"}, TypeError, "lr must be a real number, got str '1e-3'"),
    ({"seq_len": "128"}, TypeError, "seq_len must be an int, got str '128'"),
    ({"seed": 1.5}, TypeError, "seed must be an int, got float"),
    ({"activation_checkpointing": "no"}, TypeError, "activation_checkpointing must be a bool, got str 'no'"),
    ({"overwrite": "yes"}, TypeError, "overwrite must be a bool, got str 'yes'"),
    ({"data": {"tasks": "niah1"}}, TypeError, "data.tasks must be a list, got str 'niah1'"),
    ({"grad_clip": -1}, ValueError, "grad_clip must be > 0"),
    ({"weight_decay": -1}, ValueError, "weight_decay must be >= 0"),
    ({"seed": -2}, ValueError, "seed must be >= 0"),
    ({"device": "tpu"}, ValueError, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ({"out": ""}, ValueError, "out must be a non-empty path"),
    ({"compile_mode": "fast"}, ValueError, "compile_mode must be one of .* got 'fast'"),
    ({"compile_blocks": "off"}, TypeError, "compile_blocks must be a bool, got str 'off'"),
]


@pytest.mark.parametrize("flags, error, message", BAD_FLAGS, ids=[" ".join(f) for f, _, _ in BAD_FLAGS])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, corpus, flags, error, message):
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train_command.main(run_args(out, corpus, "--max-steps", "2", *flags))
    assert not out.exists()


@pytest.mark.parametrize(
    "values, error, message", BAD_FILE_VALUES, ids=[str(v) for v, _, _ in BAD_FILE_VALUES]
)
def test_bad_config_file_values_are_refused_with_the_field_named(tmp_path, corpus, values, error, message):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(values))
    out = tmp_path / "run"
    argv = ["--config", str(config_file), *run_args(out, corpus, "--max-steps", "2")]
    for name in {"out", "device"} & set(values):  # the file's value, not run_args' flag
        index = argv.index(f"--{name}")
        del argv[index : index + 2]
    with pytest.raises(error, match=message):
        train_command.main(argv)
    assert not out.exists()


def test_a_flag_of_the_wrong_type_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--lr", "fast"])
    assert exit_info.value.code == 2
    assert "argument --lr: invalid float value: 'fast'" in capsys.readouterr().err


def test_train_validates_a_config_built_in_code_and_the_data(tmp_path, corpus):
    """``train(config)`` checks settings itself (not only the command), and the corpus against the
    model's vocabulary and the row length, before writing anything."""
    config = parse_config(run_args(tmp_path / "a", corpus))
    config.grad_clip = -0.5
    with pytest.raises(ValueError, match="grad_clip must be > 0, got -0.5"):
        loop.train(config)
    config = parse_config(run_args(tmp_path / "b", corpus, "--seq-len", "100000"))
    with pytest.raises(ValueError, match="too short to cut one row of seq_len"):
        loop.train(config)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        resolve_device("gpu", 0, setting="--device")


# ----------------------------------------------------------------------------------------------------
# Class 9: a non-finite step writes no checkpoint and stops the run, naming the step
# ----------------------------------------------------------------------------------------------------


def test_an_overflowing_learning_rate_stops_the_command_at_the_first_non_finite_step(tmp_path, corpus):
    """lr 1e30 is finite, so it passes validation; the first update overflows the weights, and step 2's
    gradient norm is NaN. The command exits non-zero naming step 2; step 1's checkpoint stays the last."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "flashmoba", "train"]
    command += run_args(out, corpus, "--max-steps", "4", "--save-every", "1", "--lr", "1e30")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "FloatingPointError: step 2: the loss or gradient norm is not finite" in result.stderr
    assert (
        "without writing a checkpoint of step 2 or later (the newest checkpoint is of step 1)"
        in result.stderr
    )
    assert checkpoint_names(out) == ["step_0000001.pt", "step_0000001.pt.sha256"]
    assert metrics_steps(out) == [1]


@pytest.mark.parametrize(
    "quantity, bad_step, stopped_at, kept", [("loss", 1, 2, []), ("grad_norm", 3, 4, [2])]
)
def test_a_non_finite_step_is_caught_before_the_next_checkpoint(
    tmp_path, corpus, monkeypatch, quantity, bad_step, stopped_at, kept
):
    """With no log row in between (``--log-every 100``), the check before each checkpoint still stops
    the run, naming the first non-finite step, not the step it was found at."""
    real_train_step = loop.train_step

    def train_step(model, optimizer, corpus_, config, rank, step, device):
        lr, loss, grad_norm = real_train_step(model, optimizer, corpus_, config, rank, step, device)
        if step == bad_step:
            loss, grad_norm = (
                (loss * float("nan"), grad_norm) if quantity == "loss" else (loss, grad_norm * float("inf"))
            )
        return lr, loss, grad_norm

    monkeypatch.setattr(loop, "train_step", train_step)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=f"^step {bad_step}: .* stopped at step {stopped_at} "):
        train_command.main(
            run_args(out, corpus, "--max-steps", "4", "--save-every", "2", "--log-every", "100")
        )
    saved = (
        sorted(p.name for p in (out / "checkpoints").glob("*.pt")) if (out / "checkpoints").exists() else []
    )
    assert saved == [f"step_{step:07d}.pt" for step in kept]


def test_resume_refuses_a_checkpoint_with_non_finite_weights(run_copy, corpus):
    path = run_copy / "checkpoints" / "step_0000004.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["lm_head.weight"][0, 0] = float("nan")
    torch.save(checkpoint, path)
    write_checksum(path)  # intact bytes, so only the values can be refused
    before = snapshot(run_copy)
    argv = run_args(run_copy, corpus, "--max-steps", "6", "--resume", str(path))
    with pytest.raises(
        CheckpointError, match=f"checkpoint {path} holds non-finite values .* in model.lm_head.weight"
    ):
        train_command.main(argv)
    assert snapshot(run_copy) == before


# ----------------------------------------------------------------------------------------------------
# Class 10: another run in --out is never replaced without --overwrite
# ----------------------------------------------------------------------------------------------------


def test_a_new_run_is_refused_where_another_run_is(run_copy, corpus, base_run, tmp_path):
    before = snapshot(run_copy)
    with pytest.raises(
        ValueError,
        match=f"--out {run_copy} holds another run \\(config.json, metrics.jsonl, "
        "checkpoints/step_0000002.pt",
    ):
        train_command.main(run_args(run_copy, corpus, "--max-steps", "2"))
    # A checkpoint of another directory is another run too.
    other = tmp_path / "other"
    shutil.copytree(base_run, other)
    with pytest.raises(ValueError, match="holds another run .* resuming .*other.* would replace it"):
        train_command.main(
            run_args(
                run_copy,
                corpus,
                "--max-steps",
                "6",
                "--resume",
                str(other / "checkpoints" / "step_0000004.pt"),
            )
        )
    # Continuing the run from an older checkpoint would replace its newer ones.
    with pytest.raises(ValueError, match="holds checkpoints after step 2 \\(checkpoints/step_0000004.pt\\)"):
        train_command.main(
            run_args(
                run_copy,
                corpus,
                "--max-steps",
                "6",
                "--resume",
                str(run_copy / "checkpoints" / "step_0000002.pt"),
            )
        )
    assert snapshot(run_copy) == before
    help_text = build_parser().format_help()
    assert (
        "--out holds a run when it has a config.json, a metrics.jsonl or a checkpoints/step_*.pt" in help_text
    )
    assert "--overwrite" in help_text and "--allow-config-change" in help_text


def test_overwrite_replaces_the_run_and_says_what_it_deletes(run_copy, corpus, capsys):
    (run_copy / "notes.txt").write_text("not part of the run")
    train_command.main(run_args(run_copy, corpus, "--max-steps", "1", "--overwrite"))
    said = capsys.readouterr().out
    assert (
        f"--overwrite: deleting the run in {run_copy}: config.json, metrics.jsonl, "
        "checkpoints/step_0000002.pt" in said
    )
    assert metrics_steps(run_copy) == [1]
    assert checkpoint_names(run_copy) == ["step_0000001.pt", "step_0000001.pt.sha256"]
    assert (run_copy / "notes.txt").read_text() == "not part of the run"


def test_resume_auto_without_a_checkpoint_restarts_only_the_same_run(tmp_path, corpus):
    """A run stopped before its first checkpoint starts over under --resume auto; a directory with only
    other files (an experiment's train_config.json) holds no run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text("{}")
    config = parse_config(run_args(out, corpus, "--resume", "auto"))
    assert plan_run(config, out).replaced == []
    write_run_config(out, config, history=[])
    plan = plan_run(config, out)
    assert (plan.start_step, plan.keep_metrics) == (0, True)
    assert "no checkpoint in" in plan.notes[0] and "starts over from step 0" in plan.notes[0]
    other = parse_config(run_args(out, corpus, "--resume", "auto", "--seed", "7"))
    with pytest.raises(ValueError, match="holds another run .* other settings: seed 0 -> 7"):
        plan_run(other, out)


# ----------------------------------------------------------------------------------------------------
# Class 11: resume with other settings only when allowed, and recorded
# ----------------------------------------------------------------------------------------------------


def test_resume_with_other_settings_is_refused_with_the_fields_listed(run_copy, corpus):
    before = snapshot(run_copy)
    changed = ("--lr", "1e-3", "--seed", "1", "--seq-len", "32")
    with pytest.raises(
        ValueError,
        match="differ from the checkpoint's: seq_len 64 -> 32, lr 0.0006 -> 0.001, seed 0 -> 1. "
        "Pass --allow-config-change",
    ):
        train_command.main(resume_auto(run_copy, corpus, "--max-steps", "6", *changed))
    with pytest.raises(ValueError, match="different model config: model.kconv_size 0 -> 3"):
        train_command.main(
            resume_auto(run_copy, corpus, "--max-steps", "6", "--kconv", "3", "--allow-config-change")
        )
    for max_steps in ("4", "3"):
        with pytest.raises(
            ValueError, match=f"--max-steps {max_steps} is at or below step 4 of checkpoint .*step_0000004.pt"
        ):
            train_command.main(resume_auto(run_copy, corpus, "--max-steps", max_steps))
    assert snapshot(run_copy) == before


def test_an_allowed_change_is_recorded_and_a_partial_metrics_line_is_dropped(run_copy, corpus, capsys):
    """Class 11 and 14 in one resume: the change lands in config.json's history and the next checkpoint;
    the backend may change without being a change; a half-written last metrics row is dropped."""
    with (run_copy / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss": 4.9')  # a process killed while writing
    argv = resume_auto(run_copy, corpus, "--max-steps", "5", "--lr", "1e-3", "--backend", "reference")
    train_command.main([*argv, "--allow-config-change"])
    said = capsys.readouterr().out
    assert "resuming with changed settings (recorded in config.json's history): lr 0.0006 -> 0.001" in said
    assert "metrics.jsonl: dropped a partial last line (line 5" in said
    assert metrics_steps(run_copy) == [1, 2, 3, 4, 5]
    entry = {
        "step": 4,
        "checkpoint": str(run_copy / "checkpoints" / "step_0000004.pt"),
        "changes": {"lr": [6e-4, 1e-3]},
    }
    stored = json.loads((run_copy / "config.json").read_text())
    assert stored["history"] == [entry] and stored["lr"] == 1e-3
    assert torch.load(run_copy / "checkpoints" / "step_0000005.pt", weights_only=True)["history"] == [entry]
    # Resuming again with the new settings is no change, and keeps the history.
    plan = plan_run(parse_config(resume_auto(run_copy, corpus, "--max-steps", "6", "--lr", "1e-3")), run_copy)
    assert (plan.start_step, plan.history) == (5, [entry])
    del stored["history"]
    assert train_config_from_dict(stored).lr == 1e-3


def test_a_broken_metrics_line_other_than_the_last_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not a metrics row"):
        trim_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 2}\n'


# ----------------------------------------------------------------------------------------------------
# Class 12: corrupt checkpoints are found; --resume auto falls back to the newest intact one
# ----------------------------------------------------------------------------------------------------


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + count):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint_and_resumes_exactly(
    run_copy, corpus, base_run, capsys
):
    newest = run_copy / "checkpoints" / "step_0000004.pt"
    flip_bytes(newest)
    with pytest.raises(CheckpointError, match=f"checkpoint {newest} is corrupt or truncated: its SHA-256 is"):
        train_command.main(run_args(run_copy, corpus, "--max-steps", "6", "--resume", str(newest)))
    train_command.main(resume_auto(run_copy, corpus))
    said = capsys.readouterr().out
    assert f"--resume auto: checkpoint {newest} is corrupt or truncated" in said
    assert "set aside as step_0000004.pt.corrupt" in said
    assert "resuming from the newest intact checkpoint, step_0000002.pt" in said
    assert "step_0000004.pt.corrupt" in checkpoint_names(run_copy)
    # Steps 3 and 4 trained again from step 2 are those of the uninterrupted run.
    expected = [json.loads(line) for line in (base_run / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in got] == [1, 2, 3, 4]
    for row, reference in zip(got[2:], expected[2:]):
        assert row["loss"] == pytest.approx(reference["loss"], rel=1e-6, abs=1e-6)


def test_resume_auto_with_no_intact_checkpoint_names_each(run_copy, corpus):
    checkpoints = run_copy / "checkpoints"
    flip_bytes(checkpoints / "step_0000004.pt")
    oldest = checkpoints / "step_0000002.pt"
    oldest.write_bytes(oldest.read_bytes()[: oldest.stat().st_size // 2])  # truncated, and unverifiable:
    (checkpoints / "step_0000002.pt.sha256").unlink()
    before = snapshot(run_copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="no intact checkpoint in") as error:
            train_command.main(resume_auto(run_copy, corpus, "--max-steps", "6"))
    assert "step_0000004.pt is corrupt or truncated" in str(error.value)
    assert "step_0000002.pt is not readable (truncated, corrupt or not a torch.save file)" in str(error.value)
    assert any("step_0000002.pt has no checksum file" in str(w.message) for w in caught)
    assert snapshot(run_copy) == before
