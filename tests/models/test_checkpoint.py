"""The checkpoint format: save and load round-trip model and optimizer, only the newest are kept, a run
directory finds its latest, and load_model rebuilds the model with an optional top-k or backend. Every
read verifies the checksum, the format and finite values; a corrupt, truncated or foreign file is refused
naming it, and one without a checksum (written before them) loads with a warning."""

import hashlib
import warnings
from dataclasses import asdict

import pytest
import torch

from flashmoba.models import HybridLM, model_config_from_preset
from flashmoba.models.checkpoint import (
    CheckpointError,
    UnverifiedCheckpointWarning,
    checkpoint_config,
    checkpoint_step,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    read_checkpoint,
    save_checkpoint,
    write_checksum,
)
from flashmoba.training.config import config_from_preset
from flashmoba.training.loop import make_optimizer


def trained_pair(seed: int):
    config = config_from_preset("tiny")
    config.model = model_config_from_preset("tiny", backend="reference")
    config.keep_checkpoints = 2
    torch.manual_seed(seed)
    model = HybridLM(config.model)
    optimizer = make_optimizer(model, config)
    ids = torch.randint(0, 257, (2, 40))
    model(ids, ids)[1].backward()
    optimizer.step()
    return config, model, optimizer


def test_save_load_round_trip_and_pruning(tmp_path):
    config, model, optimizer = trained_pair(seed=0)
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint(run / "checkpoints" / f"step_{step:07d}.pt", model, optimizer, step, config, rank=0)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000002.pt",
        "step_0000002.pt.sha256",
        "step_0000003.pt",
        "step_0000003.pt.sha256",
    ]
    latest = latest_checkpoint(run)
    assert latest == find_checkpoint(str(run)) == run / "checkpoints" / "step_0000003.pt"
    assert checkpoint_step(latest) == 3 and checkpoint_config(latest) == asdict(config)

    _, other, other_optimizer = trained_pair(seed=1)
    assert load_checkpoint(latest, other, other_optimizer) == 3
    for (name, expected), actual in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(expected, actual), name
    assert torch.equal(
        optimizer.state_dict()["state"][0]["exp_avg"], other_optimizer.state_dict()["state"][0]["exp_avg"]
    )

    loaded, stored = load_model(latest, torch.device("cpu"), topk=2)
    assert not loaded.training and stored == asdict(config)
    assert loaded.config.moba_topk == 2 and loaded.config.backend == "reference"
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_find_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="no checkpoints/step_"):
        find_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        find_checkpoint(str(tmp_path / "missing.pt"))
    assert latest_checkpoint(tmp_path) is None


@pytest.fixture
def saved(tmp_path):
    """(model, path) of one checkpoint written by save_checkpoint."""
    config, model, optimizer = trained_pair(seed=0)
    path = tmp_path / "run" / "checkpoints" / "step_0000007.pt"
    save_checkpoint(path, model, optimizer, 7, config, rank=0)
    return model, path


def test_a_checkpoint_carries_its_sha256_and_is_written_atomically(saved):
    _, path = saved
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.with_name("step_0000007.pt.sha256").read_text() == f"{digest}  step_0000007.pt\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_0000007.pt", "step_0000007.pt.sha256"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified checkpoint loads without a warning
        assert read_checkpoint(path)["step"] == 7


def test_flipped_bytes_are_found_by_every_reader(saved):
    """Today's failure: 64 flipped bytes in the tensor data loaded and evaluated silently."""
    _, path = saved
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 64):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    message = f"checkpoint {path} is corrupt or truncated: its SHA-256 is [0-9a-f]{{64}}, but step_0000007.pt"
    _, model, optimizer = trained_pair(seed=1)
    for read in (
        lambda: load_model(path, torch.device("cpu")),
        lambda: load_checkpoint(path, model, optimizer),
        lambda: checkpoint_config(path),
        lambda: checkpoint_step(path),
    ):
        with pytest.raises(CheckpointError, match=message):
            read()


def test_truncated_and_foreign_files_are_refused_naming_the_file(saved, tmp_path):
    _, path = saved
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt or truncated"):
        read_checkpoint(path)
    path.with_name("step_0000007.pt.sha256").unlink()  # without a checksum, torch cannot read it either
    with (
        pytest.warns(UnverifiedCheckpointWarning),
        pytest.raises(
            CheckpointError,
            match=f"checkpoint {path} is not readable \\(truncated, corrupt or not a torch.save file\\)",
        ),
    ):
        read_checkpoint(path)

    foreign = tmp_path / "foreign.pt"
    cases = [
        (
            {"weights": torch.ones(2)},
            r" is not a flashmoba train checkpoint: it lacks \['step', 'config', 'model'",
        ),
        (torch.ones(2), " is not a flashmoba train checkpoint: it holds a Tensor"),
        (
            {"step": -1, "config": {"model": {}}, "model": {}, "optimizer": {}},
            ": 'step' must be a non-negative int, got -1",
        ),
        (
            {"step": 1, "config": {}, "model": {}, "optimizer": {}},
            ": 'config' must be a dict with a 'model' dict",
        ),
    ]
    for payload, message in cases:
        torch.save(payload, foreign)
        write_checksum(foreign)
        with pytest.raises(CheckpointError, match=f"checkpoint {foreign}{message}"):
            read_checkpoint(foreign)
    foreign.write_text("not a checkpoint")
    write_checksum(foreign)
    with pytest.raises(CheckpointError, match=f"checkpoint {foreign} is not readable"):
        read_checkpoint(foreign)
    foreign.with_name("foreign.pt.sha256").write_text("not a digest\n")
    with pytest.raises(CheckpointError, match="its checksum file foreign.pt.sha256 holds no SHA-256 digest"):
        read_checkpoint(foreign)


def test_a_checkpoint_without_a_checksum_loads_with_a_warning(saved):
    """Checkpoints written before checksums still load, identically, but say they cannot be verified."""
    model, path = saved
    path.with_name("step_0000007.pt.sha256").unlink()
    with pytest.warns(
        UnverifiedCheckpointWarning, match=f"checkpoint {path} has no checksum file .* cannot be verified"
    ):
        loaded, _ = load_model(path, torch.device("cpu"))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_non_finite_values_are_refused(saved):
    _, path = saved
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["optimizer"]["state"]["embed.weight"]["exp_avg_sq"][0, 0] = float("inf")
    torch.save(checkpoint, path)
    write_checksum(path)
    with pytest.raises(
        CheckpointError,
        match=f"checkpoint {path} holds non-finite values .* optimizer.state.embed.weight.exp_avg_sq",
    ):
        read_checkpoint(path)
    assert checkpoint_step(path) == 7  # reading the step or settings does not need finite values
