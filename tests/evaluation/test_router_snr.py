"""The router SNR measured inside a model's MoBA layers (flashmoba.evaluation.router_snr)."""

import torch

from flashmoba.evaluation.router_snr import markdown_table, measure_trained_router_snr
from flashmoba.models import HybridLM, model_config_from_preset


def tiny(global_attention="moba") -> HybridLM:
    torch.manual_seed(0)
    config = model_config_from_preset(
        "tiny", moba_block_size=16, moba_topk=2, backend="reference", global_attention=global_attention
    )
    return HybridLM(config).eval()


def test_rows_per_layer_and_length_with_consistent_quantities():
    model = tiny()
    rows = measure_trained_router_snr(model, ["niah1", "niah2"], [512], 3, torch.device("cpu"))
    assert [row["layer"] for row in rows] == [index for index, _ in model.moba_layers()]
    for row in rows:
        assert row["length"] == 512 and row["samples"] > 0
        assert abs(row["sigma"] ** 2 - row["sigma2"]) < 1e-9
        assert 0 <= row["predicted_recall"] <= 1 and 0 <= row["measured_recall"] <= 1
        low, high = row["measured_recall_interval"]
        assert low <= row["measured_recall"] <= high
        assert abs(row["delta_mu"] - (row["mu_signal"] - row["mu_noise"])) < 1e-6
        assert 0 <= row["failure_probability"] <= 1
    assert "| layer |" in markdown_table(rows)


def test_dense_model_has_no_rows():
    assert measure_trained_router_snr(tiny("dense"), ["niah1"], [512], 2, torch.device("cpu")) == []
