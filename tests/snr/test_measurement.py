"""flashmoba.snr.measurement and flashmoba.snr.capture: the model's quantities on q and k, the hook."""

import numpy as np
import pytest
import torch

from flashmoba import snr as model

NEEDLES = [163, 164, 165]  # inside block 5 of 32-key blocks
QUERIES = [1000, 1021, 1022, 1023]


def test_measurement_recovers_the_planted_needle_and_predicts_recall():
    d, cosine = 64, 0.3
    q, k = model.planted_needle_qk(
        24, 1024, 4, d, needle_positions=NEEDLES, query_positions=QUERIES, cosine=cosine, seed=3
    )
    result = model.measure_router_snr(q, k, 32, 4, needle_positions=NEEDLES, query_positions=QUERIES)
    assert np.all(result.samples == 24 * len(QUERIES))
    np.testing.assert_allclose(result.delta_mu, cosine, atol=0.01)
    np.testing.assert_allclose(result.mu_cluster - result.mu_noise, cosine, atol=0.01)
    np.testing.assert_allclose(result.m, 3)
    np.testing.assert_allclose(result.sigma2, 1 / d, rtol=0.05)
    np.testing.assert_allclose(result.delta_mu_eff, 3 * cosine, atol=0.03)
    np.testing.assert_allclose(result.block_variance_ratio, 1.0, atol=0.25)
    np.testing.assert_allclose(result.snr, model.snr(3 * cosine, d, 32), rtol=0.1)
    summary = result.overall()
    # 96 independent sequences over the 4 heads; queries of one sequence share q, so allow ~3 sigma
    assert abs(summary["predicted_recall"] - summary["measured_recall"]) < 0.15
    assert 0.2 < summary["measured_recall"] < 0.8
    assert "recall predicted" in result.table()


def test_measured_recall_is_moba_select_and_handles_gqa_and_shorter_q():
    from flashmoba import moba_select

    q, k = model.planted_needle_qk(
        4, 1024, 4, 32, needle_positions=NEEDLES, query_positions=QUERIES, cosine=0.5, seed=4
    )
    k = k[:, :, :2]  # GQA: 4 query heads on 2 kv heads
    q = q[:, 14:]  # seqlen_q < seqlen_k: query i sits at key position i + 14
    queries = [position - 14 for position in QUERIES]
    result = model.measure_router_snr(q, k, 32, 3, needle_positions=NEEDLES, query_positions=queries)
    selected = moba_select(q, k, 32, 3, backend="reference")
    hits = (selected[:, queries] == 5).any(-1).double().mean(dim=(0, 1)).numpy()
    np.testing.assert_allclose(result.measured_recall, hits)


def test_measurement_extremes_and_per_sequence_positions():
    # a block full of needle keys aligned with the query is always found (3-D q/k: one sequence)
    needle_block = list(range(64, 80))
    q, k = model.planted_needle_qk(
        1, 512, 2, 32, needle_positions=needle_block, query_positions=[511], cosine=1.0
    )
    sure = model.measure_router_snr(q[0], k[0], 16, 2, needle_positions=needle_block, query_positions=[511])
    assert sure.measured_recall.tolist() == [1.0, 1.0]
    np.testing.assert_allclose(sure.m, 16)
    assert sure.predicted_recall.min() > 0.999
    # a single needle key equal to q is one key of 32: the model gives it a modest chance
    q, k = model.planted_needle_qk(1, 512, 2, 32, needle_positions=[70], query_positions=[511], cosine=1.0)
    single = model.measure_router_snr(q, k, 32, 2, needle_positions=[70], query_positions=[511])
    np.testing.assert_allclose(single.delta_mu, 1.0, atol=0.05)
    np.testing.assert_allclose(
        single.predicted_recall,
        model.retrieval_probability(single.delta_mu_eff, 1 / single.sigma2, 32, 1, 15),
    )
    # without signal, recall is the chance (topk - 1) / candidates
    q, k = model.planted_needle_qk(
        2, 512, 2, 32, needle_positions=[[70], [300]], query_positions=[511], cosine=0.0
    )
    result = model.measure_router_snr(
        q, k, 32, 2, needle_positions=[[70], [300]], query_positions=[[511], [511]]
    )
    np.testing.assert_allclose(result.predicted_recall, 1 / 15, atol=0.05)  # 15 candidate blocks, 1 free slot
    own_block = model.measure_router_snr(q, k, 32, 2, needle_positions=[500], query_positions=[511])
    assert own_block.samples.sum() == 0
    assert own_block.skipped["signal block not a candidate (own or later block)"] == 4


def test_measurement_bad_inputs():
    q, k = model.planted_needle_qk(1, 128, 2, 16, needle_positions=[3], query_positions=[127], cosine=0.5)
    with pytest.raises(ValueError, match="needle_positions"):
        model.measure_router_snr(q, k, 16, 2, needle_positions=[128], query_positions=[127])
    with pytest.raises(TypeError, match="query_positions"):
        model.measure_router_snr(q, k, 16, 2, needle_positions=[3], query_positions=[1.5])
    with pytest.raises(ValueError, match="heads"):
        model.measure_router_snr(
            q[:, :, :, :], k.repeat(1, 1, 2, 1)[:, :, :3], 16, 2, needle_positions=[3], query_positions=[127]
        )
    with pytest.raises(ValueError, match="q"):
        model.measure_router_snr(q[0, 0], k[0, 0], 16, 2, needle_positions=[3], query_positions=[127])
    with pytest.raises(TypeError, match="topk"):
        model.measure_router_snr(q, k, 16, 2.0, needle_positions=[3], query_positions=[127])


class _TinyAttention(torch.nn.Module):
    """Stands in for flashmoba.nn.MoBAAttention: a project(x) -> (q, k, v) method and a forward."""

    def __init__(self, hidden: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(hidden, 3 * heads * head_dim, bias=False)

    def project(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        return q, k, v

    def forward(self, x, packed=None):
        return x + self.project(x)[2].flatten(-2)[..., : x.shape[-1]]


class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList([_TinyAttention(16, 2, 8) for _ in range(2)])

    def moba_layers(self):
        return list(enumerate(self.layers))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, packed=None)
        return x


def test_capture_qk_hooks_the_moba_layers():
    torch.manual_seed(0)
    net = _TinyModel()
    ids = torch.randint(0, 50, (2, 40))
    captured = model.capture_qk(net, ids)
    assert sorted(captured) == ["layer0", "layer1"]
    q, k = captured["layer0"]
    expected_q, expected_k, _ = net.layers[0].project(net.embed(ids))
    torch.testing.assert_close(q, expected_q)
    torch.testing.assert_close(k, expected_k)
    assert q.shape == (2, 40, 2, 8)
    assert not net.layers[0]._forward_pre_hooks  # hooks removed
    result = model.measure_router_snr(q, k, 8, 2, needle_positions=[5], query_positions=[39])
    assert result.samples.sum() == 4
