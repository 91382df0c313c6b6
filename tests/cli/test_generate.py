"""flashmoba generate on a checkpoint of a freshly initialised tiny model: prints the prompt and its
greedy continuation (that of HybridLM.generate) and the speeds; refuses a non-byte vocabulary and bad
flags (exit 2 naming the flag)."""

from __future__ import annotations

import pytest
import torch

from flashmoba.cli import generate as generate_command
from flashmoba.cli import main as flashmoba_main
from flashmoba.data import ByteTokenizer
from flashmoba.models import HybridLM
from flashmoba.models.checkpoint import load_model, save_checkpoint
from flashmoba.training.config import config_from_preset
from flashmoba.training.loop import make_optimizer


def save_run(directory, **model_overrides):
    config = config_from_preset("tiny")
    config.model.backend = "reference"
    for name, value in model_overrides.items():
        setattr(config.model, name, value)
    torch.manual_seed(0)
    model = HybridLM(config.model)
    path = directory / "checkpoints" / "step_0000001.pt"
    save_checkpoint(path, model, make_optimizer(model, config), 1, config, 0)
    return directory


@pytest.fixture
def run(tmp_path):
    return save_run(tmp_path / "run", kconv_size=3)


def test_prints_the_greedy_continuation_and_the_speeds(run, capsys):
    assert (
        flashmoba_main(["generate", "--checkpoint", str(run), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    )
    text, speeds = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    model, _ = load_model(run / "checkpoints" / "step_0000001.pt", torch.device("cpu"))
    tokenizer = ByteTokenizer()
    ids = model.generate(torch.tensor([tokenizer.encode("hi", bos=True)]), 6, eos_token_id=tokenizer.bos_id)
    new = ids[0].tolist()
    new = new[: new.index(tokenizer.bos_id)] if tokenizer.bos_id in new else new
    assert text == "hi" + tokenizer.decode(new)
    assert "prefill 3 tokens in" in speeds and "decode" in speeds and "tokens/s" in speeds


def test_sampling_flags_run_and_the_seed_repeats(run, capsys):
    args = ["--checkpoint", str(run), "--prompt", "a", "--max-new-tokens", "5", "--temperature", "1.5"]
    args += ["--top-p", "0.9", "--seed", "7", "--device", "cpu"]
    outputs = []
    for _ in range(2):
        assert generate_command.main(args) == 0
        outputs.append(capsys.readouterr().out.split("\nflashmoba generate:")[0])
    assert outputs[0] == outputs[1] and outputs[0].startswith("a")


def test_a_vocabulary_other_than_the_byte_tokenizer_s_is_refused(tmp_path):
    run = save_run(tmp_path / "other", vocab_size=300)
    with pytest.raises(ValueError, match="byte tokenizer .vocabulary 257.*a vocabulary of 300"):
        generate_command.main(["--checkpoint", str(run), "--prompt", "x", "--max-new-tokens", "1"])


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-new-tokens", "0", "must be >= 1, got 0"),
        ("--temperature", "-0.5", "must be >= 0.0"),
        ("--top-p", "0", "must be > 0.0"),
        ("--top-p", "1.5", "must be <= 1.0"),
        ("--seed", "-1", "must be >= 0, got -1"),
        ("--device", "gpu", "must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate_command.main(["--checkpoint", "no/such/run", "--prompt", "x", flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}" in error and message in error, error
