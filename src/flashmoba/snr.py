"""The router's signal-to-noise model (paper section 2, App. B) as a tool, checked by simulation.

The paper's model of the parameter-free MoBA router (block score ``s_j = q . mean(keys of block j)``):

- dot products ``q . k`` are independent random variables with variance ``sigma^2 ~ 1/d`` (d = head_dim);
  the signal key has mean ``mu_signal``, ``m - 1`` more keys in its block ("clustered" keys) have mean
  ``mu_cluster``, every other key has mean ``mu_noise``;
- the signal block's expected advantage over a pure-noise block is ``delta_mu_eff / B`` (B = block_size) with
  ``delta_mu_eff = (mu_signal - mu_noise) + (m - 1)(mu_cluster - mu_noise)``;
- the score difference D is Gaussian (central limit theorem), ``Var D = 2 sigma^2 / B``, so
  ``SNR = delta_mu_eff * sqrt(d / (2B))`` and one noise block outscores the signal block with probability
  ``Phi(-SNR)``; the paper asks ``Phi(-SNR) < k / n``, i.e. ``SNR > Phi^-1(1 - k/n)``.

This module has the formulas (scalars or numpy arrays, broadcasting), the top-k retrieval probability
the model implies, an exact (numerical) failure probability for unit vectors, a Monte-Carlo simulator of
the setup, and the measurement of the model's quantities on the q and k of a real attention layer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

DOT_PRODUCT_LAWS = ("sphere", "gaussian")

# ----------------------------------------------------------------------------------------------------
# Normal distribution and input checks
# ----------------------------------------------------------------------------------------------------


def normal_cdf(x):
    """Phi(x), the standard normal CDF, accurate in both tails (exp of torch's log_ndtr; torch's ndtr
    underflows to 0 below about -8)."""
    values = torch.as_tensor(np.asarray(x, dtype=np.float64))
    # numpy's exp: torch's multi-threaded elementwise ops stall on a busy CPU.
    return _scalar_or_array(np.exp(torch.special.log_ndtr(values).numpy()))


def normal_ppf(p):
    """Phi^-1(p), the standard normal quantile; -inf at 0 and +inf at 1."""
    values = np.asarray(p, dtype=np.float64)
    if np.any((values < 0) | (values > 1)):
        raise ValueError(f"probabilities must lie in [0, 1], got {p!r}")
    return _scalar_or_array(torch.special.ndtri(torch.as_tensor(values)).numpy())


def _scalar_or_array(values: np.ndarray):
    """A Python float for 0-d results, the array otherwise."""
    values = np.asarray(values)
    return float(values) if values.ndim == 0 else values


def _float_array(name: str, value) -> np.ndarray:
    """value as a float64 array; TypeError naming the argument if it is not numeric, ValueError if NaN."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    raw = np.asarray(value)
    # numpy would turn "64" into 64.0 and True into 1.0; only ints and floats are accepted.
    if raw.dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must be a number or an array of numbers, got {type(value).__name__} {value!r}"
        )
    array = raw.astype(np.float64)
    if np.any(np.isnan(array)):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return array


def _positive_array(name: str, value) -> np.ndarray:
    array = _float_array(name, value)
    if np.any(array <= 0) or np.any(np.isinf(array)):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return array


def _count_array(name: str, value, minimum: int) -> np.ndarray:
    """Integer-valued counts >= minimum (as float64 for broadcasting)."""
    array = _float_array(name, value)
    if np.any(np.isinf(array)) or np.any(array != np.round(array)):
        raise ValueError(f"{name} must be a whole number (or an array of them), got {value!r}")
    if np.any(array < minimum):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return array


def _int_arg(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ----------------------------------------------------------------------------------------------------
# The paper's formulas
# ----------------------------------------------------------------------------------------------------


def delta_mu_eff(delta_mu, m=1, mu_cluster=None, mu_noise=0.0):
    """The signal block's effective advantage: ``delta_mu + (m - 1)(mu_cluster - mu_noise)`` (paper Eq. 8).

    Args:
        delta_mu: ``mu_signal - mu_noise``, the signal key's expected dot-product gap.
        m: keys in the signal block with a raised mean, the signal key included (m >= 1).
        mu_cluster: expected dot product of the m - 1 clustered keys; required when any m > 1.
        mu_noise: expected dot product of a noise key.

    All arguments broadcast (scalars or arrays); returns a float for scalar inputs.
    """
    delta_mu = _float_array("delta_mu", delta_mu)
    m_values = _float_array("m", m)
    if np.any(m_values < 1):
        raise ValueError(f"m must be >= 1 (it counts the signal key), got {m!r}")
    noise = _float_array("mu_noise", mu_noise)
    if mu_cluster is None:
        if np.any(m_values > 1):
            raise ValueError("mu_cluster is required when m > 1 (the mean dot product of the clustered keys)")
        # m == 1 everywhere: no clustered keys; broadcast like the general case.
        return _scalar_or_array(delta_mu + 0.0 * (m_values + noise))
    cluster = _float_array("mu_cluster", mu_cluster)
    return _scalar_or_array(delta_mu + (m_values - 1.0) * (cluster - noise))


def snr(delta_mu_eff, head_dim, block_size):
    """The router's signal-to-noise ratio ``delta_mu_eff * sqrt(head_dim / (2 * block_size))`` (paper Eq. 3).

    ``E[D] = delta_mu_eff / B`` over ``sqrt(Var D) = sqrt(2 / (d B))`` (dot-product variance 1/d). For
    measured dot products of variance sigma^2, pass ``head_dim = 1 / sigma^2``.
    """
    gap = _float_array("delta_mu_eff", delta_mu_eff)
    dims = _positive_array("head_dim", head_dim)
    blocks = _positive_array("block_size", block_size)
    return _scalar_or_array(gap * np.sqrt(dims / (2.0 * blocks)))


def failure_probability(delta_mu_eff, head_dim, block_size):
    """``Phi(-SNR)``: the model's chance that one pure-noise block outscores the signal block (Eq. 12)."""
    return normal_cdf(-np.asarray(snr(delta_mu_eff, head_dim, block_size)))


def required_snr(topk, num_blocks):
    """``Phi^-1(1 - topk / num_blocks)``: the SNR the paper asks for reliable top-k over num_blocks blocks.

    ``-inf`` when topk >= num_blocks (every block is selected).
    """
    k = _count_array("topk", topk, 1)
    n = _count_array("num_blocks", num_blocks, 1)
    return normal_ppf(np.clip(1.0 - k / n, 0.0, 1.0))


# Points of the quadrature grid of retrieval_probability, and how many order-statistic spreads it covers.
_RETRIEVAL_GRID_POINTS = 4001
_RETRIEVAL_GRID_HALF_WIDTH = 40.0


def retrieval_probability(delta_mu_eff, head_dim, block_size, topk, num_blocks):
    """The model's probability that the signal block is among the top ``topk`` of ``num_blocks`` blocks.

    The approximation: the paper's model taken at face value for all blocks at once. Block scores are
    independent Gaussians with variance ``1/(d B)``; the signal block's mean is higher by
    ``delta_mu_eff / B``; the other ``M = num_blocks - 1`` blocks are pure noise. In units of one block
    score's standard deviation the signal block is ahead by ``a = delta_mu_eff * sqrt(d / B) = sqrt(2) SNR``
    and it is selected iff it beats the topk-th largest of the M noise scores, X_(k):

        P = integral of f_k(x) * Phi(a - x) dx,
        f_k(x) = M! / ((k-1)! (M-k)!) * phi(x) Phi(x)^(M-k) (1 - Phi(x))^(k-1)

    computed by the trapezoid rule on a grid fitted to f_k (about 1e-6 accurate). Checks: num_blocks = 2,
    topk = 1 gives ``1 - Phi(-SNR)``; ``delta_mu_eff = 0`` gives ``topk / num_blocks``; topk >= num_blocks
    gives 1. Arguments broadcast; topk and num_blocks are whole numbers >= 1.
    """
    gap = _float_array("delta_mu_eff", delta_mu_eff)
    dims = _positive_array("head_dim", head_dim)
    blocks = _positive_array("block_size", block_size)
    k = _count_array("topk", topk, 1)
    n = _count_array("num_blocks", num_blocks, 1)
    gap, dims, blocks, k, n = np.broadcast_arrays(gap, dims, blocks, k, n)
    advantage = (gap * np.sqrt(dims / blocks)).ravel()
    k, competitors = k.ravel(), (n - 1).ravel()
    result = np.ones(advantage.shape)
    todo = np.nonzero(k <= competitors)[0]
    # Chunks keep the [elements, grid] arrays small.
    for start in range(0, todo.size, 256):
        index = todo[start : start + 256]
        result[index] = _order_statistic_integral(advantage[index], k[index], competitors[index])
    return _scalar_or_array(result.reshape(gap.shape))


def _order_statistic_integral(advantage: np.ndarray, k: np.ndarray, competitors: np.ndarray) -> np.ndarray:
    """P(a + Z > k-th largest of M iid N(0,1)) for 1-D arrays a, k, M (k <= M); see retrieval_probability."""
    # Centre and spread of X_(k): the (M-k+1)-th smallest of M uniforms has mean u and sd su; map by Phi^-1.
    u = (competitors - k + 1) / (competitors + 1)
    su = np.sqrt(u * (1 - u) / (competitors + 2))
    centre = np.asarray(normal_ppf(u), dtype=np.float64).reshape(u.shape)
    spread = su / (np.exp(-0.5 * centre**2) / math.sqrt(2 * math.pi))
    low = np.clip(centre - _RETRIEVAL_GRID_HALF_WIDTH * spread, -12.0, 12.0)
    high = np.clip(centre + _RETRIEVAL_GRID_HALF_WIDTH * spread, -12.0, 12.0)
    x = low[:, None] + (high - low)[:, None] * np.linspace(0.0, 1.0, _RETRIEVAL_GRID_POINTS)[None, :]
    xt = torch.as_tensor(x)
    log_cdf, log_sf = torch.special.log_ndtr(xt).numpy(), torch.special.log_ndtr(-xt).numpy()
    # log f_k(x) up to a constant; normalising numerically removes the constant and the grid's error.
    log_density = -0.5 * x**2 + (competitors - k)[:, None] * log_cdf + (k - 1)[:, None] * log_sf
    weights = np.exp(log_density - log_density.max(axis=1, keepdims=True))
    beaten = np.asarray(normal_cdf(advantage[:, None] - x))
    return np.trapezoid(weights * beaten, x, axis=1) / np.trapezoid(weights, x, axis=1)


# ----------------------------------------------------------------------------------------------------
# Unit vectors: the exact failure probability, without the central limit theorem
# ----------------------------------------------------------------------------------------------------


def sphere_failure_probability(delta_mu_eff, head_dim, block_size, *, points_per_std: int = 32):
    """The failure probability when q and the keys are unit vectors, computed without the Gaussian (CLT) step.

    The law ("sphere", as in ``simulate_router``): each dot product is its mean plus x, the cosine between
    two independent uniform unit vectors in d dimensions (density proportional to ``(1 - x^2)^((d-3)/2)``
    on [-1, 1], variance exactly 1/d, lighter tails than a Gaussian). Then
    ``B * D = delta_mu_eff + sum of B x's - sum of B x's``, and by symmetry the block loses iff W, a sum of
    2B independent x's, exceeds ``delta_mu_eff``. W's law is computed by numerical convolution (FFT) of x's
    density on a lattice of ``points_per_std`` points per standard deviation of x: no sampling noise, and a
    numerical error below 1e-4 relative in our checks (with a floor of about 1e-12 absolute). Compare
    with ``failure_probability`` (= Phi(-SNR)) to see how much the paper's Gaussian step costs.
    head_dim >= 3 (whole numbers); block_size >= 1; arguments broadcast.
    """
    gap = _float_array("delta_mu_eff", delta_mu_eff)
    dims = _count_array("head_dim", head_dim, 3)
    blocks = _count_array("block_size", block_size, 1)
    points_per_std = _int_arg("points_per_std", points_per_std, 4)
    gap, dims, blocks = np.broadcast_arrays(gap, dims, blocks)
    result = np.empty(gap.shape)
    pairs = np.stack([dims.ravel(), blocks.ravel()], axis=1)
    for d, b in np.unique(pairs, axis=0):
        where = (dims == d) & (blocks == b)
        result[where] = _sphere_sum_survival(int(d), 2 * int(b), gap[where], points_per_std)
    return _scalar_or_array(result)


def _sphere_sum_survival(
    head_dim: int, terms: int, thresholds: np.ndarray, points_per_std: int
) -> np.ndarray:
    """P(x_1 + ... + x_terms > t) for iid unit-sphere cosines x in head_dim dimensions."""
    upper_edges, survival = _sphere_sum_law(head_dim, terms, points_per_std)
    return np.clip(np.interp(thresholds, upper_edges, survival, left=1.0, right=0.0), 0.0, 1.0)


@functools.lru_cache(maxsize=128)
def _sphere_sum_law(head_dim: int, terms: int, points_per_std: int) -> tuple[np.ndarray, np.ndarray]:
    """The lattice law of a sum of iid unit-sphere cosines: (upper bin edges, survival at those edges)."""
    step = 1.0 / (points_per_std * math.sqrt(head_dim))
    # W's range that carries any mass: W is sub-Gaussian with variance proxy ~ terms / d, and |W| <= terms.
    half_span = min(float(terms), 40.0 * math.sqrt(terms / head_dim)) + 1.0
    size = 1 << math.ceil(math.log2(2 * half_span / step + 1))
    single = np.arange(-math.ceil(1.0 / step), math.ceil(1.0 / step) + 1) * step
    # Bin masses by a 16-point midpoint rule inside each bin: bins that cross +-1 get only their inside part.
    offsets = ((np.arange(16) + 0.5) / 16 - 0.5) * step
    inside = single[:, None] + offsets[None, :]
    density = np.where(np.abs(inside) < 1.0, np.clip(1.0 - inside**2, 0.0, None), 0.0) ** (
        (head_dim - 3) / 2.0
    )
    density = np.where(np.abs(inside) < 1.0, density, 0.0)  # 0 ** 0 would count outside points for d = 3
    mass = density.sum(axis=1)
    mass /= mass.sum()
    # Lattice index j (mod size) holds the value j * step; negative values wrap to the end.
    lattice = np.zeros(size)
    lattice[np.arange(single.size) - single.size // 2] = mass
    total = np.fft.irfft(np.fft.rfft(lattice) ** terms, n=size)
    total = np.clip(np.fft.fftshift(total), 0.0, None)
    values = (np.arange(size) - size // 2) * step
    # Survival at the upper edge of each lattice bin (its mass spread evenly over value +- step/2).
    upper_edges = values + step / 2
    survival = np.cumsum(total[::-1])[::-1] - total
    upper_edges.flags.writeable = survival.flags.writeable = False  # shared by the cache
    return upper_edges, survival


# ----------------------------------------------------------------------------------------------------
# Monte-Carlo simulation of the paper's setup
# ----------------------------------------------------------------------------------------------------


def wilson_interval(successes, trials, confidence: float = 0.95):
    """Wilson score interval for a binomial rate: ``(low, high)``; arrays broadcast."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    hits = _float_array("successes", successes)
    n = _positive_array("trials", trials)
    if np.any(hits < 0) or np.any(hits > n):
        raise ValueError(f"successes must lie in [0, trials], got {successes!r} of {trials!r}")
    z = float(normal_ppf(1 - (1 - confidence) / 2))
    rate = hits / n
    denominator = 1 + z**2 / n
    centre = (rate + z**2 / (2 * n)) / denominator
    half = z * np.sqrt(rate * (1 - rate) / n + z**2 / (4 * n**2)) / denominator
    # At 0 or all successes the bound is exactly 0 or 1 (rounding would leave 1e-17).
    low = np.where(hits == 0, 0.0, np.clip(centre - half, 0, 1))
    high = np.where(hits == n, 1.0, np.clip(centre + half, 0, 1))
    return _scalar_or_array(low), _scalar_or_array(high)


@dataclass
class RouterSimulation:
    """Result of ``simulate_router``: measured rates, their Wilson intervals, and the model's predictions."""

    head_dim: int
    block_size: int
    m: int
    num_blocks: int
    topk: int
    law: str
    trials: int
    delta_mu_eff: float
    snr: float
    predicted_failure: float  # Phi(-SNR)
    predicted_retrieval: float  # retrieval_probability(...)
    failures: int  # trials where the first noise block outscored the signal block
    failure_rate: float
    failure_interval: tuple[float, float]
    hits: int  # trials where the signal block was in the top-k
    retrieval_rate: float
    retrieval_interval: tuple[float, float]
    clipped_fraction: float  # sphere law: dot products clipped to [-1, 1] (0 for the Gaussian law)
    confidence: float


# Dot products drawn per chunk of trials; bounds the simulator's memory (16 MiB of float64).
_SIMULATION_CHUNK_ELEMENTS = 1 << 21


def simulate_router(
    head_dim: int,
    block_size: int,
    *,
    mu_signal: float,
    mu_noise: float = 0.0,
    mu_cluster: float | None = None,
    m: int = 1,
    num_blocks: int = 2,
    topk: int = 1,
    trials: int = 10_000,
    law: str = "sphere",
    planted_std: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> RouterSimulation:
    """Monte-Carlo simulation of the paper's setup: one query, ``num_blocks`` key blocks of ``block_size``.

    Each trial draws every dot product ``q . k`` of the query with the ``num_blocks * block_size`` keys.
    Block 0 holds the signal key (mean ``mu_signal``) and ``m - 1`` clustered keys (mean ``mu_cluster``);
    every other key has mean ``mu_noise``. The router scores a block by the mean dot product of its keys
    (``q . centroid``). Per trial it records whether block 1 (pure noise) outscores block 0 (the pairwise
    failure, predicted ``Phi(-SNR)``) and whether block 0 is among the ``topk`` best of all blocks.

    Laws of the dot products (``law``):

    - ``"sphere"``: q and the keys are unit vectors in ``head_dim`` dimensions. A noise key is uniform on
      the sphere, so ``q . k`` is the cosine between two independent uniform unit vectors (exact law:
      ``(1 + x) / 2 ~ Beta((d-1)/2, (d-1)/2)``; variance 1/d, bounded, lighter tails than Gaussian); by
      rotational invariance these cosines are iid given q, so they are drawn directly instead of building
      d-dimensional vectors. A planted key is a unit vector turned toward q: its cosine is its mean plus
      an independent draw of the same law, clipped to [-1, 1] (``clipped_fraction`` says how often).
    - ``"gaussian"``: every dot product is Gaussian with variance 1/d: the paper's assumptions exactly.

    ``planted_std``: standard deviation of the m planted dot products; None (default) = the noise keys'
    1/sqrt(d), as the paper assumes; 0 = planted keys at a fixed angle to q (breaks the paper's
    equal-variance assumption: the signal block varies less than the model says).

    Fixed ``seed`` gives identical results. Returns a ``RouterSimulation``.
    """
    head_dim = _int_arg("head_dim", head_dim, 2 if law == "sphere" else 1)
    block_size = _int_arg("block_size", block_size, 1)
    m = _int_arg("m", m, 1)
    num_blocks = _int_arg("num_blocks", num_blocks, 2)
    topk = _int_arg("topk", topk, 1)
    trials = _int_arg("trials", trials, 1)
    seed = _int_arg("seed", seed, 0)
    if law not in DOT_PRODUCT_LAWS:
        raise ValueError(f"law must be one of {DOT_PRODUCT_LAWS}, got {law!r}")
    if m > block_size:
        raise ValueError(f"m must be <= block_size ({block_size}), got {m}")
    if m > 1 and mu_cluster is None:
        raise ValueError("mu_cluster is required when m > 1")
    for name, value in [("mu_signal", mu_signal), ("mu_noise", mu_noise), ("mu_cluster", mu_cluster)]:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
        ):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if planted_std is not None and (
        isinstance(planted_std, bool) or not isinstance(planted_std, (int, float))
    ):
        raise TypeError(f"planted_std must be a float or None, got {type(planted_std).__name__}")
    if planted_std is not None and not planted_std >= 0:
        raise ValueError(f"planted_std must be >= 0 or None, got {planted_std!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    # The planted keys' spread relative to the noise keys' (whose standard deviation is 1/sqrt(d)).
    planted_scale = 1.0 if planted_std is None else planted_std * math.sqrt(head_dim)

    rng = np.random.default_rng(seed)
    failures = hits = clipped = 0
    chunk = max(1, _SIMULATION_CHUNK_ELEMENTS // (num_blocks * block_size))
    for start in range(0, trials, chunk):
        count = min(chunk, trials - start)
        shape = (count, num_blocks, block_size)
        if law == "sphere":
            half = (head_dim - 1) / 2.0
            dots = rng.beta(half, half, size=shape)
            dots *= 2.0
            dots -= 1.0 - mu_noise
        else:
            dots = rng.standard_normal(shape)
            dots *= 1.0 / math.sqrt(head_dim)
            dots += mu_noise
        planted = (dots[:, 0, :m] - mu_noise) * planted_scale
        planted[:, 0] += mu_signal
        if m > 1:
            planted[:, 1:] += mu_cluster
        dots[:, 0, :m] = planted
        # A cosine lies in [-1, 1]; noise keys can leave it only when mu_noise != 0 (skip the pass otherwise).
        if law == "sphere":
            region = dots if mu_noise != 0 else dots[:, 0, :m]
            clipped += int(np.count_nonzero(np.abs(region) > 1.0))
            np.clip(region, -1.0, 1.0, out=region)
        scores = dots.mean(axis=2)
        signal = scores[:, :1]
        failures += int(np.count_nonzero(scores[:, 1] > signal[:, 0]))
        hits += int(np.count_nonzero((scores[:, 1:] > signal).sum(axis=1) < topk))

    effective_gap = float(delta_mu_eff(mu_signal - mu_noise, m, mu_cluster, mu_noise))
    return RouterSimulation(
        head_dim=head_dim,
        block_size=block_size,
        m=m,
        num_blocks=num_blocks,
        topk=topk,
        law=law,
        trials=trials,
        delta_mu_eff=effective_gap,
        snr=float(snr(effective_gap, head_dim, block_size)),
        predicted_failure=float(failure_probability(effective_gap, head_dim, block_size)),
        predicted_retrieval=float(
            retrieval_probability(effective_gap, head_dim, block_size, topk, num_blocks)
        ),
        failures=failures,
        failure_rate=failures / trials,
        failure_interval=wilson_interval(failures, trials, confidence),
        hits=hits,
        retrieval_rate=hits / trials,
        retrieval_interval=wilson_interval(hits, trials, confidence),
        clipped_fraction=clipped / (trials * num_blocks * block_size),
        confidence=confidence,
    )


# ----------------------------------------------------------------------------------------------------
# The model's quantities in a real attention layer
# ----------------------------------------------------------------------------------------------------


@dataclass
class RouterMeasurement:
    """Result of ``measure_router_snr``: the model's quantities per query head, predicted and measured recall.

    Every per-head field is a float64 array ``[Hq]`` (NaN where a head has no usable sample). Dot products
    are raw ``q . k`` (no softmax scale), the router's own units. One sample is one (sequence, query
    position, head) whose signal block is a candidate of the router (causal: it ends before the query's own
    block starts) and that has at least one candidate noise block (no needle key in it).
    """

    block_size: int
    topk: int
    causal: bool
    head_dim: int
    samples: np.ndarray  # [Hq] usable samples
    mu_noise: np.ndarray  # mean dot product of a noise key
    mu_signal: np.ndarray  # mean dot product of the signal key
    mu_cluster: np.ndarray  # mean dot product of the other needle keys in the signal block (NaN if none)
    m: np.ndarray  # needle keys in the signal block, the signal key included (mean over samples)
    sigma2: np.ndarray  # variance of noise dot products (within one query, averaged)
    delta_mu: np.ndarray  # mu_signal - mu_noise
    delta_mu_eff: np.ndarray  # paper's Eq. 8 over the needle keys: delta_mu + (m-1)(mu_cluster - mu_noise)
    snr: np.ndarray  # delta_mu_eff / sqrt(2 sigma2 B): the paper's SNR with the measured sigma2
    predicted_recall: np.ndarray  # the paper's model: retrieval_probability(delta_mu_eff, 1/sigma2, B, ...)
    delta_mu_eff_block: np.ndarray  # B * E[s_signal_block - s_noise_block], over all keys of the signal block
    block_variance: np.ndarray  # variance of noise block scores (within one query, averaged)
    block_variance_ratio: np.ndarray  # block_variance / (sigma2 / B): 1 when keys are independent
    snr_block: np.ndarray  # (delta_mu_eff_block / B) / sqrt(2 block_variance)
    predicted_recall_block: np.ndarray  # the Gaussian ranking alone, with block-level measured quantities
    measured_recall: np.ndarray  # how often moba_select picked the signal block
    measured_recall_interval: tuple[np.ndarray, np.ndarray]  # 95% Wilson interval
    skipped: dict = field(default_factory=dict)  # why samples were left out: reason -> count

    def overall(self) -> dict:
        """Sample-weighted means over heads of the recall fields, and the total sample count."""
        weights = self.samples.astype(np.float64)
        total = float(weights.sum())
        summary = {"samples": int(total)}
        for name in ("predicted_recall", "predicted_recall_block", "measured_recall"):
            values = getattr(self, name)
            used = weights > 0
            summary[name] = float(np.sum(values[used] * weights[used]) / total) if total else float("nan")
        return summary

    def table(self) -> str:
        """A per-head text table and the overall recall."""
        header = (
            f"{'head':>4} {'n':>5} {'mu_noise':>9} {'dmu':>8} {'m':>4} {'sigma2':>9} {'1/sigma2':>8} "
            f"{'dmu_eff':>8} {'SNR':>6} {'pred':>6} | {'dmu_blk':>8} {'var_rt':>6} {'SNRblk':>6} "
            f"{'predblk':>7} | {'measured [95% CI]':>22}"
        )
        lines = [header]
        low, high = self.measured_recall_interval
        for h in range(self.samples.size):
            if self.samples[h] == 0:
                lines.append(f"{h:>4} {0:>5}  (no usable sample)")
                continue
            lines.append(
                f"{h:>4} {int(self.samples[h]):>5} {self.mu_noise[h]:>9.4f} {self.delta_mu[h]:>8.4f} "
                f"{self.m[h]:>4.1f} "
                f"{self.sigma2[h]:>9.3g} {1 / self.sigma2[h]:>8.1f} {self.delta_mu_eff[h]:>8.4f} "
                f"{self.snr[h]:>6.2f} {self.predicted_recall[h]:>6.3f} | {self.delta_mu_eff_block[h]:>8.4f} "
                f"{self.block_variance_ratio[h]:>6.2f} {self.snr_block[h]:>6.2f} "
                f"{self.predicted_recall_block[h]:>7.3f} | {self.measured_recall[h]:>6.3f} "
                f"[{low[h]:.3f}, {high[h]:.3f}]"
            )
        summary = self.overall()
        lines.append(
            f"all  {summary['samples']:>5}  recall predicted {summary['predicted_recall']:.3f} "
            f"(paper's model), {summary['predicted_recall_block']:.3f} (block-level); "
            f"measured {summary['measured_recall']:.3f}"
        )
        return "\n".join(lines)


def _positions_per_sequence(name: str, value, batch: int, length: int) -> list[torch.Tensor]:
    """Positions given once for all sequences (ints, 1-D) or per sequence (list of lists, 2-D) -> list of
    int64 tensors, one per sequence, each within [0, length)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = [int(value)]
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) == 0:
        raise TypeError(
            f"{name} must be a non-empty list of positions, or one list per sequence, got {value!r}"
        )
    per_sequence = all(isinstance(item, (list, tuple, np.ndarray)) for item in value)
    if per_sequence:
        if len(value) != batch:
            raise ValueError(
                f"{name} gives {len(value)} lists of positions, one per sequence; batch is {batch}"
            )
        rows = [list(item) for item in value]
    else:
        rows = [list(value)] * batch
    result = []
    for row in rows:
        if len(row) == 0:
            raise ValueError(f"{name} must list at least one position per sequence")
        for position in row:
            if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
                raise TypeError(f"{name} must hold int positions, got {position!r}")
            if not 0 <= position < length:
                raise ValueError(f"{name} must lie in [0, {length}), got {position}")
        result.append(torch.tensor(sorted({int(p) for p in row}), dtype=torch.long))
    return result


def _default_select_blocks(causal: bool) -> Callable:
    def select(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
        from flashmoba import moba_select

        return moba_select(q, k, block_size, topk, causal=causal, backend="reference")

    return select


def measure_router_snr(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    topk: int,
    *,
    needle_positions,
    query_positions,
    signal_positions=None,
    causal: bool = True,
    select_blocks: Callable | None = None,
) -> RouterMeasurement:
    """Estimate the SNR model's quantities on real q and k and compare predicted with measured router recall.

    Args:
        q: ``[T, Hq, D]`` or ``[batch, T, Hq, D]`` (flash-attn layout), the layer's queries as its router
            sees them.
        k: ``[S, Hkv, D]`` or ``[batch, S, Hkv, D]``; Hq a multiple of Hkv (GQA: head h reads kv head
            ``h // (Hq // Hkv)``).
        block_size, topk: the router's settings (topk counts the own block when causal, as flashmoba does).
        needle_positions: key positions of the planted needle's tokens: one list for every sequence, or one
            list per sequence.
        query_positions: positions on q's time axis of the queries that must retrieve the needle (the
            answer's tokens); same forms. Causal: query i sits at key position ``i + S - T``.
        signal_positions: the signal key k* per sequence (int or list of ints). Default: per sequence and
            head, the needle key with the largest mean ``q . k`` over the query positions. The needle keys in
            k*'s block count as clustered (m of them, k* included). Which needle key is called the signal
            does not change ``delta_mu_eff`` (a sum over the needle keys of the block).
        causal: the router's causality (as ``moba_select``).
        select_blocks: ``f(q, k, block_size, topk) -> int32 [batch, T, Hq, topk]`` selected block ids, -1
            unused (the contract of ``flashmoba.moba_select``); default ``flashmoba.moba_select(...,
            causal=causal, backend="reference")``. It is called per sequence on each run of consecutive
            query positions, with the key prefix those queries can see (the alignment S - T is kept).

    Per sample, dot products are centred on that query's mean noise dot product (an offset shared by all
    blocks cancels in the router), then averaged per head. Two predictions, each
    ``retrieval_probability(gap, head_dim_equivalent, B, topk', n')`` averaged over the head's samples (n':
    the query's candidate blocks; topk' = topk - 1 when causal, as the own block takes a slot):

    - ``predicted_recall``, the paper's model: gap = ``delta_mu_eff`` from the needle keys (Eq. 8) and
      independent keys of variance sigma2 (head_dim_equivalent = 1/sigma2).
    - ``predicted_recall_block``, the Gaussian ranking alone: gap = ``delta_mu_eff_block``, B times the
      signal block's measured mean advantage (it also counts raised neighbours of the needle, e.g. from key
      convolution), and the measured variance of noise block scores (which includes correlated keys).
      Note it uses the signal blocks' realised noise, so it tracks the measured recall more closely than an
      out-of-sample prediction would on few samples.
    """
    q, k = _check_qk(q, k)
    block_size = _int_arg("block_size", block_size, 1)
    topk = _int_arg("topk", topk, 1)
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    needles = _positions_per_sequence("needle_positions", needle_positions, batch, seqlen_k)
    queries = _positions_per_sequence("query_positions", query_positions, batch, seqlen_q)
    signals = None
    if signal_positions is not None:
        signals = _positions_per_sequence("signal_positions", signal_positions, batch, seqlen_k)
        if any(s.numel() != 1 for s in signals):
            raise ValueError("signal_positions must give one position per sequence")
        # The signal key is a needle key: its block must not count as noise.
        needles = [torch.unique(torch.cat([n, s])) for n, s in zip(needles, signals)]
    num_blocks = -(-seqlen_k // block_size)
    block_of_key = torch.arange(seqlen_k) // block_size
    block_sizes = torch.bincount(block_of_key, minlength=num_blocks).double()
    topk_free = topk - 1 if causal else topk

    select_blocks = select_blocks or _default_select_blocks(causal)

    records = {
        name: []
        for name in (
            "head",
            "mu_noise",
            "signal",
            "cluster_sum",
            "cluster_count",
            "sigma2",
            "block_gap",
            "block_var",
            "candidates",
            "hit",
        )
    }
    skipped = {"signal block not a candidate (own or later block)": 0, "no candidate noise block": 0}
    group = heads_q // heads_kv
    block_ids = torch.arange(num_blocks)
    for b in range(batch):
        query_index = queries[b]
        positions = query_index + (seqlen_k - seqlen_q)  # key position of each query
        selected = _select_for_queries(select_blocks, q[b], k[b], query_index, block_size, topk, causal)

        # Candidate blocks per query: causal, the blocks that end before the own block starts.
        if causal:
            candidate = (block_ids[None, :] < (positions // block_size)[:, None]) & (positions >= 0)[:, None]
        else:
            candidate = torch.ones(len(positions), num_blocks, dtype=torch.bool)  # [Q, n]
        needle_block = torch.zeros(num_blocks, dtype=torch.bool)
        needle_block[needles[b] // block_size] = True
        noise_block = candidate & ~needle_block[None, :]  # [Q, n]
        noise_key = noise_block[:, block_of_key].double()  # [Q, S]
        key_count = noise_key.sum(-1)  # [Q]
        block_count = noise_block.sum(-1).double()

        for h in range(heads_q):  # one head at a time bounds memory to [Q, S]
            dots = q[b, query_index, h].double() @ k[b, :, h // group].double().T  # [Q, S]
            padded = dots.new_zeros(dots.shape[0], num_blocks * block_size)
            padded[:, :seqlen_k] = dots
            scores = padded.view(-1, num_blocks, block_size).sum(-1) / block_sizes  # [Q, n]: q . centroid
            # Per query: mean and variance of noise dot products and of noise block scores.
            noise_mean = (dots * noise_key).sum(-1) / key_count.clamp(min=1)
            noise_var = (((dots - noise_mean[:, None]) ** 2) * noise_key).sum(-1) / (key_count - 1).clamp(
                min=1
            )
            block_mean = (scores * noise_block).sum(-1) / block_count.clamp(min=1)
            block_var = (((scores - block_mean[:, None]) ** 2) * noise_block).sum(-1) / (block_count - 1)
            block_var = torch.where(block_count >= 2, block_var, torch.full_like(block_var, float("nan")))

            if signals is None:
                signal_key = int(needles[b][dots[:, needles[b]].mean(dim=0).argmax()])
            else:
                signal_key = int(signals[b][0])
            signal_block = signal_key // block_size
            cluster_keys = needles[b][(needles[b] // block_size == signal_block) & (needles[b] != signal_key)]
            for i in range(len(query_index)):
                if not candidate[i, signal_block]:
                    skipped["signal block not a candidate (own or later block)"] += 1
                    continue
                if not noise_block[i].any():
                    skipped["no candidate noise block"] += 1
                    continue
                centre = noise_mean[i]
                records["head"].append(h)
                records["mu_noise"].append(float(centre))
                records["signal"].append(float(dots[i, signal_key] - centre))
                records["cluster_sum"].append(float((dots[i, cluster_keys] - centre).sum()))
                records["cluster_count"].append(len(cluster_keys))
                records["sigma2"].append(float(noise_var[i]))
                records["block_gap"].append(
                    float(block_sizes[signal_block] * (scores[i, signal_block] - block_mean[i]))
                )
                records["block_var"].append(float(block_var[i]))
                records["candidates"].append(int(candidate[i].sum()))
                records["hit"].append(bool((selected[i, h] == signal_block).any()))
    return _summarise_measurement(records, skipped, heads_q, head_dim, block_size, topk, topk_free, causal)


def _select_for_queries(select_blocks, q, k, query_index, block_size, topk, causal) -> torch.Tensor:
    """Blocks selected for the given queries of one sequence (q [T, Hq, D], k [S, Hkv, D]) -> [Q, Hq, topk].

    Causal routing only needs each query and the keys up to its position, so each run of consecutive
    queries goes alone with the key prefix it can see; the offset S - T (bottom-right alignment) is kept.
    """
    seqlen_q, seqlen_k = q.shape[0], k.shape[0]
    rows = []
    start = 0
    while start < len(query_index):
        end = start
        while end + 1 < len(query_index) and query_index[end + 1] == query_index[end] + 1:
            end += 1
        first, last = int(query_index[start]), int(query_index[end])
        if causal:
            key_end = last + 1 + seqlen_k - seqlen_q
            chosen = select_blocks(q[None, first : last + 1], k[None, : max(key_end, 1)], block_size, topk)
        else:
            chosen = select_blocks(q[None, first : last + 1], k[None], block_size, topk)
        rows.append(chosen[0].long().cpu())
        start = end + 1
    return torch.cat(rows)


def _check_qk(q, k) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k as [batch, T, H, D] (a 3-D pair gets a batch of one)."""
    for name, tensor in (("q", q), ("k", k)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor [T, H, D] or [batch, T, H, D], got {type(tensor).__name__}"
            )
        if tensor.ndim not in (3, 4):
            raise ValueError(f"{name} must be [T, H, D] or [batch, T, H, D], got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if q.ndim != k.ndim:
        raise ValueError(
            f"q and k must both be 3-D or both 4-D, got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.ndim == 3:
        q, k = q[None], k[None]
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"k must match q's batch and head_dim, got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q's heads ({q.shape[2]}) must be a multiple of k's heads ({k.shape[2]})")
    if k.dtype != q.dtype:
        k = k.to(q.dtype)  # moba_select wants one dtype
    return q.detach().cpu(), k.detach().cpu()


def _summarise_measurement(records, skipped, heads_q, head_dim, block_size, topk, topk_free, causal):
    data = {name: np.asarray(values, dtype=np.float64) for name, values in records.items()}
    heads = data["head"].astype(np.int64) if data["head"].size else np.zeros(0, dtype=np.int64)

    def per_head(values: np.ndarray) -> np.ndarray:
        out = np.full(heads_q, np.nan)
        for h in range(heads_q):
            chosen = values[heads == h]
            chosen = chosen[~np.isnan(chosen)]
            if chosen.size:
                out[h] = chosen.mean()
        return out

    samples = np.bincount(heads, minlength=heads_q)
    mu_noise = per_head(data["mu_noise"])
    delta_mu = per_head(data["signal"])
    m = 1.0 + per_head(data["cluster_count"])
    has_cluster = data["cluster_count"] > 0
    cluster_excess = per_head(
        np.where(has_cluster, data["cluster_sum"] / np.maximum(data["cluster_count"], 1), np.nan)
    )
    sigma2 = per_head(data["sigma2"])
    gap = per_head(data["signal"] + data["cluster_sum"])
    gap_block = per_head(data["block_gap"])
    block_variance = per_head(data["block_var"])

    predicted = np.full(heads_q, np.nan)
    predicted_block = np.full(heads_q, np.nan)
    measured = np.full(heads_q, np.nan)
    hits = np.zeros(heads_q)
    for h in range(heads_q):
        chosen = heads == h
        if not chosen.any():
            continue
        candidates = data["candidates"][chosen]
        measured[h] = data["hit"][chosen].mean()
        hits[h] = data["hit"][chosen].sum()
        predicted[h] = _mean_retrieval(gap[h], 1.0 / sigma2[h], block_size, topk_free, candidates)
        if np.isfinite(block_variance[h]) and block_variance[h] > 0:
            # Block-score variance v plays the model's sigma2 / B: the same formula with sigma2 = B v.
            predicted_block[h] = _mean_retrieval(
                gap_block[h], 1.0 / (block_size * block_variance[h]), block_size, topk_free, candidates
            )
    with np.errstate(invalid="ignore", divide="ignore"):
        interval = wilson_interval(hits, np.maximum(samples, 1))
        snr_values = gap / np.sqrt(2 * sigma2 * block_size)
        snr_block = gap_block / (block_size * np.sqrt(2 * block_variance))  # E[D] / sd(D), E[D] = gap / B
        ratio = block_variance / (sigma2 / block_size)
    low, high = (np.where(samples > 0, bound, np.nan) for bound in interval)
    return RouterMeasurement(
        block_size=block_size,
        topk=topk,
        causal=causal,
        head_dim=head_dim,
        samples=samples,
        mu_noise=mu_noise,
        mu_signal=mu_noise + delta_mu,
        mu_cluster=mu_noise + cluster_excess,
        m=m,
        sigma2=sigma2,
        delta_mu=delta_mu,
        delta_mu_eff=gap,
        snr=snr_values,
        predicted_recall=predicted,
        delta_mu_eff_block=gap_block,
        block_variance=block_variance,
        block_variance_ratio=ratio,
        snr_block=snr_block,
        predicted_recall_block=predicted_block,
        measured_recall=measured,
        measured_recall_interval=(low, high),
        skipped=skipped,
    )


def _mean_retrieval(
    gap: float, head_dim: float, block_size: int, topk_free: int, candidates: np.ndarray
) -> float:
    """Model recall averaged over samples with their own candidate counts; 0 when no free slot is left."""
    if topk_free < 1:
        return 0.0
    if not (np.isfinite(gap) and np.isfinite(head_dim) and head_dim > 0):
        return float("nan")
    counts, multiplicity = np.unique(candidates, return_counts=True)
    values = np.asarray(retrieval_probability(gap, head_dim, block_size, topk_free, counts), dtype=np.float64)
    return float(np.sum(values * multiplicity) / multiplicity.sum())


# ----------------------------------------------------------------------------------------------------
# Getting q and k: synthetic needles, and a hook on a model's MoBA layers
# ----------------------------------------------------------------------------------------------------


def planted_needle_qk(
    batch: int,
    seqlen: int,
    heads: int,
    head_dim: int,
    *,
    needle_positions,
    query_positions,
    cosine: float,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic q, k ``[batch, seqlen, heads, head_dim]`` (float32) with a planted needle.

    Every key and query is a uniform random unit vector, except: per (sequence, head) a random unit
    direction u; the queries at ``query_positions`` are u; the keys at ``needle_positions`` are unit
    vectors at cosine ``cosine`` to u (u turned by a random orthogonal direction). So the needle keys have
    ``mu_signal = mu_cluster = cosine``, noise keys ``mu_noise = 0`` and ``sigma2 = 1/head_dim``.
    Positions: one list for every sequence, or one list per sequence (as ``measure_router_snr``).
    """
    for name, value in (("batch", batch), ("seqlen", seqlen), ("heads", heads), ("head_dim", head_dim)):
        _int_arg(name, value, 2 if name == "head_dim" else 1)
    if not -1 <= cosine <= 1:
        raise ValueError(f"cosine must lie in [-1, 1], got {cosine}")
    generator = torch.Generator().manual_seed(int(seed))

    def unit(*shape):
        vectors = torch.randn(*shape, head_dim, generator=generator, dtype=torch.float64)
        return vectors / vectors.norm(dim=-1, keepdim=True)

    q, k = unit(batch, seqlen, heads), unit(batch, seqlen, heads)
    directions = unit(batch, heads)  # u per sequence and head
    needles = _positions_per_sequence("needle_positions", needle_positions, batch, seqlen)
    answers = _positions_per_sequence("query_positions", query_positions, batch, seqlen)
    for b in range(batch):
        u = directions[b]  # [heads, D]
        q[b, answers[b]] = u
        other = unit(len(needles[b]), heads)
        other -= (other * u).sum(-1, keepdim=True) * u  # orthogonal to u
        other /= other.norm(dim=-1, keepdim=True)
        k[b, needles[b]] = cosine * u + math.sqrt(1 - cosine**2) * other
    return q.float(), k.float()


def capture_qk(
    model: torch.nn.Module, *inputs, layers: Mapping[str, torch.nn.Module] | None = None, **kwargs
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model(*inputs, **kwargs)`` once without gradients and return each MoBA layer's q and k.

    ``layers``: name -> attention module; default ``{"layer{i}": module for i, module in
    model.moba_layers()}`` (``flashmoba.model.HybridLM``). Each module must expose
    ``project(x) -> (q, k, v)`` (as ``flashmoba.nn.MoBAAttention`` does); its input x is caught by a forward
    pre-hook and projected again, so q and k are exactly what its router sees (after key convolution).
    Batched inputs ``[batch, seqlen]`` only: q ``[batch, T, Hq, D]``, k ``[batch, T, Hkv, D]``. To use a
    training checkpoint, load the model with the model-side code (``flashmoba train`` / ``flashmoba eval``)
    and pass it here.
    """
    if layers is None:
        if not hasattr(model, "moba_layers"):
            raise TypeError("model has no moba_layers(); pass layers={name: attention module}")
        layers = {f"layer{index}": module for index, module in model.moba_layers()}
    if not layers:
        raise ValueError("no MoBA layer to capture (layers is empty)")
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def make_hook(name: str, module: torch.nn.Module):
        if not hasattr(module, "project"):
            raise TypeError(f"layer {name!r} has no project(x) method returning (q, k, v)")

        def hook(_module, args, hook_kwargs):
            if (
                hook_kwargs.get("packed") is not None
                or hook_kwargs.get("cu_seqlens") is not None
                or len(args) > 1
            ):
                raise NotImplementedError(
                    "capture_qk supports batched [batch, seqlen] inputs, not packed ones"
                )
            q, k, _ = module.project(args[0])
            captured[name] = (q.detach(), k.detach())

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(make_hook(name, module), with_kwargs=True))
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return captured
