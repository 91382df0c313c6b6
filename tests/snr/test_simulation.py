"""flashmoba.snr.simulation: the Monte-Carlo simulator against the model and the exact unit-vector law."""

import numpy as np
import pytest
import torch

from flashmoba import snr as model


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
    def run(seed):
        return model.simulate_router(32, 16, mu_signal=0.3, num_blocks=8, topk=2, trials=2000, seed=seed)

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


def test_planted_keys_at_a_fixed_angle_break_the_model_for_small_blocks():
    result = model.simulate_router(
        64, 16, mu_signal=0.5, mu_cluster=0.1, m=8, planted_std=0.0, trials=20000, seed=2
    )
    assert result.failure_interval[1] < 0.8 * result.predicted_failure
