"""The checkpoint format: save and load round-trip model and optimizer, only the newest are kept, a run
directory finds its latest, and load_model rebuilds the model with an optional top-k or backend."""

from dataclasses import asdict

import pytest
import torch

from flashmoba.models import HybridLM, model_config_from_preset
from flashmoba.models.checkpoint import (
    checkpoint_config,
    checkpoint_step,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    save_checkpoint,
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
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002.pt", "step_0000003.pt"]
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
