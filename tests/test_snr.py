"""flashmoba.snr and flashmoba.snr_cli: formulas, simulator, exact unit-vector law, measurement, CLI."""

import contextlib
import io
import math
import statistics
import time

import numpy as np
import pytest
import torch

from flashmoba import snr as model
from flashmoba import snr_cli

NORMAL = statistics.NormalDist()


def phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


# ----------------------------------------------------------------------------------------------------
# Formulas at hand-computed points
# ----------------------------------------------------------------------------------------------------


def test_delta_mu_eff_by_hand():
    assert model.delta_mu_eff(0.5) == pytest.approx(0.5)
    # 0.3 + (4 - 1) * (0.2 - 0.05) = 0.75
    assert model.delta_mu_eff(0.3, m=4, mu_cluster=0.2, mu_noise=0.05) == pytest.approx(0.75)
    # m = 1: mu_cluster is not needed and does not matter
    assert model.delta_mu_eff(0.3, m=1, mu_cluster=0.9) == pytest.approx(0.3)
    values = model.delta_mu_eff(np.array([0.1, 0.2]), m=np.array([[1], [3]]), mu_cluster=0.3)
    np.testing.assert_allclose(values, [[0.1, 0.2], [0.7, 0.8]])
    assert isinstance(model.delta_mu_eff(0.5, 2, 0.1), float)


def test_snr_and_failure_probability_by_hand():
    # d = 64, B = 128: sqrt(64 / 256) = 1/2
    assert model.snr(1.0, 64, 128) == pytest.approx(0.5)
    assert model.snr(2.0, 32, 16) == pytest.approx(2.0)
    assert model.snr(0.75, 128, 4) == pytest.approx(0.75 * 4)
    assert model.failure_probability(1.0, 64, 128) == pytest.approx(phi(-0.5), rel=1e-12)
    assert model.failure_probability(0.0, 64, 128) == pytest.approx(0.5)
    # deep tail stays accurate (torch's plain ndtr would give 0 here)
    assert model.failure_probability(10.0, 64, 32) == pytest.approx(phi(-10.0), rel=1e-9)
    np.testing.assert_allclose(model.failure_probability([1.0, 2.0], 64, [128, 32]), [phi(-0.5), phi(-2.0)])


def test_snr_doubles_when_block_size_is_divided_by_four():
    gaps = np.array([0.1, 0.5, 1.3])
    for d in (32, 64, 128, 256):
        for b in (16, 64, 512, 2048):
            np.testing.assert_allclose(model.snr(gaps, d, b // 4), 2 * model.snr(gaps, d, b), rtol=1e-14)
    # halving B multiplies the SNR by sqrt(2) (paper section 3.3)
    assert model.snr(1.0, 64, 64) / model.snr(1.0, 64, 128) == pytest.approx(math.sqrt(2))


def test_required_snr_by_hand():
    # the paper's threshold at 7/8 sparsity: Phi^-1(0.875) = 1.15
    assert model.required_snr(8, 64) == pytest.approx(NORMAL.inv_cdf(0.875), rel=1e-12)
    assert model.required_snr(2, 16) == pytest.approx(1.1503493803760079)
    assert model.required_snr(8, 512) == pytest.approx(NORMAL.inv_cdf(1 - 1 / 64), rel=1e-12)
    assert model.required_snr(1, 2) == pytest.approx(0.0, abs=1e-15)
    assert model.required_snr(4, 4) == -math.inf
    np.testing.assert_allclose(
        model.required_snr([1, 8], [64, 64]), [NORMAL.inv_cdf(63 / 64), NORMAL.inv_cdf(0.875)]
    )


def test_retrieval_probability_special_cases():
    # two blocks, top-1: the signal block is retrieved iff the single noise block does not win
    for gap, d, b in [(0.5, 64, 128), (1.0, 32, 16), (3.0, 128, 64), (-0.4, 64, 64)]:
        assert model.retrieval_probability(gap, d, b, 1, 2) == pytest.approx(
            1 - model.failure_probability(gap, d, b), abs=1e-6
        )
    # no signal: every block is equally likely to be in the top k
    np.testing.assert_allclose(
        model.retrieval_probability(0.0, 64, 128, [1, 3, 8, 5], [2, 10, 64, 1000]),
        [1 / 2, 3 / 10, 8 / 64, 5 / 1000],
        atol=1e-6,
    )
    assert model.retrieval_probability(0.2, 64, 128, 8, 8) == 1.0
    assert model.retrieval_probability(0.2, 64, 128, 9, 8) == 1.0
    values = model.retrieval_probability(np.linspace(0, 8, 9), 64, 128, 4, 32)
    assert np.all(np.diff(values) > 0)
    assert values[-1] > 0.99


def test_retrieval_probability_against_brute_force_integral():
    # P = sum over the number j < k of noise blocks that beat the signal, integrated over the signal's score
    gap, d, b, k, n = 0.8, 64, 64, 3, 12
    a = gap * math.sqrt(d / b)
    z = np.linspace(-10, 10, 20001)
    p_beat = np.array([phi(-(v + a)) for v in z])
    weights = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    retrieved = sum(math.comb(n - 1, j) * p_beat**j * (1 - p_beat) ** (n - 1 - j) for j in range(k))
    expected = np.trapezoid(weights * retrieved, z)
    assert model.retrieval_probability(gap, d, b, k, n) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: model.snr(1.0, 0, 128), "head_dim"),
        (lambda: model.snr(1.0, 64, -1), "block_size"),
        (lambda: model.snr(float("nan"), 64, 16), "delta_mu_eff"),
        (lambda: model.failure_probability(1.0, 64, 0), "block_size"),
        (lambda: model.required_snr(0, 8), "topk"),
        (lambda: model.required_snr(1.5, 8), "topk"),
        (lambda: model.required_snr(1, 0), "num_blocks"),
        (lambda: model.delta_mu_eff(0.5, m=3), "mu_cluster"),
        (lambda: model.delta_mu_eff(0.5, m=0, mu_cluster=0.1), "m"),
        (lambda: model.retrieval_probability(1.0, 64, 128, 0, 8), "topk"),
        (lambda: model.simulate_router(64, 16, mu_signal=0.5, m=17, mu_cluster=0.1), "m"),
        (lambda: model.simulate_router(64, 16, mu_signal=0.5, m=2), "mu_cluster"),
        (lambda: model.simulate_router(64, 16, mu_signal=0.5, law="cauchy"), "law"),
        (lambda: model.simulate_router(64, 16, mu_signal=0.5, trials=0), "trials"),
        (lambda: model.wilson_interval(5, 3), "successes"),
    ],
)
def test_bad_values_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_bad_types_raise_type_error_naming_the_argument():
    with pytest.raises(TypeError, match="head_dim"):
        model.snr(1.0, "64", 128)
    with pytest.raises(TypeError, match="block_size"):
        model.simulate_router(64, 16.0, mu_signal=0.5)
    with pytest.raises(TypeError, match="mu_signal"):
        model.simulate_router(64, 16, mu_signal="0.5")


def test_wilson_interval_by_hand():
    # 10 of 100 at 95%: the textbook interval (0.0552, 0.1744)
    low, high = model.wilson_interval(10, 100)
    assert (low, high) == pytest.approx((0.05522, 0.17436), abs=1e-4)
    low, high = model.wilson_interval(0, 50)
    assert low == 0.0 and high == pytest.approx(0.0714, abs=1e-3)


# ----------------------------------------------------------------------------------------------------
# Simulator and exact unit-vector law
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("law", ["gaussian", "sphere"])
@pytest.mark.parametrize("d, b, m", [(64, 256, 1), (128, 512, 4), (32, 128, 8)])
def test_simulator_matches_phi_minus_snr_for_large_blocks(law, d, b, m):
    result = model.simulate_router(
        d, b, mu_signal=0.5, mu_cluster=0.1, m=m, trials=3000, law=law, confidence=0.99, seed=11
    )
    low, high = result.failure_interval
    assert low <= model.failure_probability(result.delta_mu_eff, d, b) <= high
    assert result.predicted_failure == model.failure_probability(result.delta_mu_eff, d, b)
    assert result.delta_mu_eff == pytest.approx(0.5 + (m - 1) * 0.1)


@pytest.mark.parametrize("law", ["gaussian", "sphere"])
def test_simulator_top_k_matches_the_order_statistic_prediction(law):
    result = model.simulate_router(
        64, 64, mu_signal=0.6, num_blocks=32, topk=4, trials=2000, law=law, confidence=0.99, seed=5
    )
    low, high = result.retrieval_interval
    assert low <= result.predicted_retrieval <= high
    assert 0.2 < result.retrieval_rate < 0.9  # informative: neither always nor never


def test_simulator_is_reproducible_with_a_seed():
    run = lambda seed: model.simulate_router(
        32, 16, mu_signal=0.3, num_blocks=8, topk=2, trials=2000, seed=seed
    )
    first, again, other = run(3), run(3), run(4)
    assert (first.failures, first.hits) == (again.failures, again.hits)
    assert (first.failures, first.hits) != (other.failures, other.hits)


def test_sphere_dot_products_have_the_law_of_random_unit_vectors():
    # The simulator draws cosines 2 Beta((d-1)/2, (d-1)/2) - 1 instead of building vectors; compare with
    # explicit random unit vectors: variance 1/d and the (negative) excess kurtosis -6/(d+2).
    d = 8
    vectors = torch.randn(200_000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cosines = (vectors[:, 0] / vectors.norm(dim=1)).numpy()
    half = (d - 1) / 2
    drawn = 2 * np.random.default_rng(0).beta(half, half, 200_000) - 1
    for sample in (cosines, drawn):
        assert sample.var() == pytest.approx(1 / d, rel=0.02)
        kurtosis = np.mean(sample**4) / sample.var() ** 2 - 3
        assert kurtosis == pytest.approx(-6 / (d + 2), abs=0.05)


def test_exact_sphere_law_agrees_with_simulation_where_the_gaussian_step_fails():
    # d = 8, B = 2: few dimensions and tiny blocks. The simulator's unit-vector failure rate agrees with the
    # exact (FFT) rate.
    result = model.simulate_router(
        8, 2, mu_signal=0.5, mu_cluster=0.5, m=2, trials=200_000, confidence=0.999, seed=1
    )
    low, high = result.failure_interval
    assert low <= model.sphere_failure_probability(result.delta_mu_eff, 8, 2) <= high
    # In the tail: W, a sum of 2B = 4 unit-vector cosines, exceeds delta_mu_eff = 2 less often than the
    # Gaussian step says (SNR = 2.83, Phi(-SNR) = 2.3e-3); the exact law matches a direct sample of W.
    half = (8 - 1) / 2
    sums = (2 * np.random.default_rng(7).beta(half, half, size=(1_000_000, 4)) - 1).sum(axis=1)
    exceed = int(np.count_nonzero(sums > 2.0))
    low, high = model.wilson_interval(exceed, sums.size, 0.999)
    exact = model.sphere_failure_probability(2.0, 8, 2)
    assert low <= exact <= high
    assert model.failure_probability(2.0, 8, 2) > 1.2 * high
    # deeper: Phi(-SNR) overstates the unit-vector failure rate more than ten-fold
    assert model.sphere_failure_probability(3.0, 8, 2) < 0.1 * model.failure_probability(3.0, 8, 2)


def test_exact_sphere_law_tends_to_phi_minus_snr_for_large_blocks():
    gaps = np.array([1.0, 4.0, 10.0])
    exact = model.sphere_failure_probability(gaps, 256, 512)
    np.testing.assert_allclose(exact, model.failure_probability(gaps, 256, 512), rtol=2e-3)
    # d = 3: cosines are uniform on [-1, 1]; two of them: P(y - x > t) = (2 - t)^2 / 8 for 0 <= t <= 2
    assert model.sphere_failure_probability(0.5, 3, 1) == pytest.approx(1.5**2 / 8, abs=1e-4)


def test_planted_keys_at_a_fixed_angle_break_the_model_for_small_blocks():
    result = model.simulate_router(
        64, 16, mu_signal=0.5, mu_cluster=0.1, m=8, planted_std=0.0, trials=20000, seed=2
    )
    assert result.failure_interval[1] < 0.8 * result.predicted_failure


# ----------------------------------------------------------------------------------------------------
# Measurement on q and k
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def _run_cli(argv):
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = snr_cli.main(argv)
    return code, output.getvalue()


def test_cli_simulate_runs_in_seconds(tmp_path):
    plot = tmp_path / "snr.png"
    started = time.perf_counter()
    code, text = _run_cli(
        [
            "--out",
            str(plot),
            "--trials",
            "2000",
            "--min-trials",
            "300",
            "--retrieval-trials",
            "100",
            "--seed",
            "1",
        ]
    )
    elapsed = time.perf_counter() - started
    assert code == 0
    assert elapsed < 30
    assert plot.stat().st_size > 10_000
    for expected in (
        "1. Pairwise failure",
        "cells agree with Phi(-SNR)",
        "2. Where the Gaussian approximation breaks",
        "Verdict",
        "3. Top-k retrieval",
        "4. Assumption 3 broken",
        f"plot written to {plot}",
    ):
        assert expected in text
    # the table covers head_dim x block_size x m
    rows = [
        line.split()
        for line in text.splitlines()
        if line.strip() and line.split()[0] in ("32", "64", "128", "256")
    ]
    cells = {(row[0], row[1], row[2]) for row in rows if len(row) >= 12}
    assert len(cells) == 4 * 6 * 4


def test_cli_measure_synthetic_and_file(tmp_path):
    code, text = _run_cli(["measure", "--synthetic", "--block-size", "16", "--topk", "3"])
    assert code == 0 and "recall predicted" in text
    q, k = model.planted_needle_qk(
        2, 256, 2, 16, needle_positions=[40, 41], query_positions=[250, 255], cosine=0.6
    )
    path = tmp_path / "qk.pt"
    torch.save(
        {
            "layer1": (q, k),
            "needle_positions": [40, 41],
            "query_positions": [250, 255],
            "block_size": 16,
            "topk": 3,
        },
        path,
    )
    code, text = _run_cli(["measure", str(path)])
    assert code == 0 and "layer layer1: block_size 16, topk 3" in text
    torch.save({"q": q, "k": k}, path)
    code, text = _run_cli(
        ["measure", str(path), "--needle", "40,41", "--queries", "250,255", "--block-size", "32"]
    )
    assert code == 0 and "block_size 32" in text
    with pytest.raises(SystemExit):
        _run_cli(["measure", str(path), "--block-size", "32"])  # no needle / query positions anywhere


def test_measure_on_a_training_checkpoint(tmp_path, capsys):
    """`flashmoba snr measure --checkpoint` reads a `flashmoba train` checkpoint and measures each MoBA layer."""
    from flashmoba.cli import main as cli_main

    run = tmp_path / "run"
    assert (
        cli_main(
            [
                "train",
                "--preset",
                "tiny",
                "--max-steps",
                "1",
                "--device",
                "cpu",
                "--out",
                str(run),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli_main(["snr", "measure", "--checkpoint", str(run), "--length", "512", "--samples", "2"]) == 0
    output = capsys.readouterr().out
    assert output.count("recall predicted") == 2  # the tiny preset has two MoBA layers
    assert "block_size 32, topk 4" in output
