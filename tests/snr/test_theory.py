"""flashmoba.snr.theory: the formulas at hand-computed points, argument checks, the exact unit-vector law."""

import math
import statistics

import numpy as np
import pytest

from flashmoba import snr as model

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


def test_exact_sphere_law_tends_to_phi_minus_snr_for_large_blocks():
    gaps = np.array([1.0, 4.0, 10.0])
    exact = model.sphere_failure_probability(gaps, 256, 512)
    np.testing.assert_allclose(exact, model.failure_probability(gaps, 256, 512), rtol=2e-3)
    # d = 3: cosines are uniform on [-1, 1]; two of them: P(y - x > t) = (2 - t)^2 / 8 for 0 <= t <= 2
    assert model.sphere_failure_probability(0.5, 3, 1) == pytest.approx(1.5**2 / 8, abs=1e-4)
