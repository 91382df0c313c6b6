"""experiments/protocol.py: every run's training config shares the budget, schedule and data mixture."""

from __future__ import annotations

import json

from experiments.protocol import PROTOCOL

TRAIN_LENGTH = PROTOCOL.training.seq_len


def test_train_configs_share_budget_and_data_and_keep_sparsity():
    configs = [PROTOCOL.train_config(run) for run in PROTOCOL.runs]
    shared = {
        json.dumps({k: v for k, v in c.items() if k not in ("model", "seed")}, sort_keys=True)
        for c in configs
    }
    assert len(shared) == 1  # same budget, schedule and data mixture everywhere
    for config in configs:
        model = config["model"]
        if model["global_attention"] == "moba":
            assert model["moba_block_size"] * model["moba_topk"] == TRAIN_LENGTH // 8  # 7/8 sparsity
        assert model["head_dim"] == 64
