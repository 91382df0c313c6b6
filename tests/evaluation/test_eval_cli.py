"""flashmoba eval refuses what it cannot trust before measuring anything: a corrupt checkpoint (named),
an unknown device (the flag named), and held-out text too short for the run's rows."""

import pytest
import torch

from flashmoba.cli import eval as eval_command
from flashmoba.models import HybridLM
from flashmoba.models.checkpoint import CheckpointError, save_checkpoint
from flashmoba.training.config import config_from_preset
from flashmoba.training.loop import make_optimizer


@pytest.fixture
def run(tmp_path):
    """A run directory with one checkpoint of the tiny model (trained at 512 tokens)."""
    config = config_from_preset("tiny")
    config.model.backend = "reference"
    torch.manual_seed(0)
    model = HybridLM(config.model)
    directory = tmp_path / "run"
    save_checkpoint(
        directory / "checkpoints" / "step_0000001.pt", model, make_optimizer(model, config), 1, config, 0
    )
    return directory


def eval_args(run, *extra: str) -> list[str]:
    return [
        "--checkpoint",
        str(run),
        "--device",
        "cpu",
        "--lengths",
        "512",
        "--samples",
        "1",
        "--no-progress",
        *extra,
    ]


def test_a_corrupt_checkpoint_is_refused_before_anything_is_written(run):
    path = run / "checkpoints" / "step_0000001.pt"
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 64):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt or truncated"):
        eval_command.main(eval_args(run))
    assert not (run / "eval").exists()


def test_an_unknown_device_names_the_flag(run):
    with pytest.raises(ValueError, match="--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        eval_command.main([*eval_args(run), "--device", "gpu"])


def test_heldout_text_is_checked_against_the_run_s_row_length(run, tmp_path):
    """The perplexity corpus is loaded with the run's vocabulary and sequence length, so text shorter than
    one row of 512 tokens is refused instead of sampled from."""
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n" * 10)
    with pytest.raises(ValueError, match="too short to cut one row of seq_len \\+ 1 = 513 tokens"):
        eval_command.main(eval_args(run, "--corpus", str(short), "--ppl-batches", "1"))


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lengths", "-128", "must be >= 1, got -128"),
        ("--lengths", "512,0", "must be >= 1, got 0"),
        ("--lengths", ",", "expected comma-separated ints"),
        ("--topk", "0", "must be >= 1, got 0"),
        ("--samples", "0", "must be >= 1, got 0"),
        ("--distractors", "-1", "must be >= 0, got -1"),
        ("--max-tokens-per-batch", "0", "must be >= 1, got 0"),
        ("--ppl-batches", "-2", "must be >= 0, got -2"),
        ("--seed", "-1", "must be >= 0, got -1"),
        ("--tasks", "niah9", "must be among"),
        ("--tasks", "", "must be among"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag_before_any_work(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_command.main(["--checkpoint", "no/such/run", flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}" in error and message in error, error
