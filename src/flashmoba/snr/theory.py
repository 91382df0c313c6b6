"""The paper's router signal-to-noise model (section 2, App. B): its formulas and their exact counterparts.

The model of the parameter-free MoBA router (block score ``s_j = q . mean(keys of block j)``):

- dot products ``q . k`` are independent random variables with variance ``sigma^2 ~ 1/d`` (d = head_dim);
  the signal key has mean ``mu_signal``, ``m - 1`` more keys in its block ("clustered" keys) have mean
  ``mu_cluster``, every other key has mean ``mu_noise``;
- the signal block's expected advantage over a pure-noise block is ``delta_mu_eff / B`` (B = block_size)
  with ``delta_mu_eff = (mu_signal - mu_noise) + (m - 1)(mu_cluster - mu_noise)``;
- the score difference D is Gaussian (central limit theorem), ``Var D = 2 sigma^2 / B``, so
  ``SNR = delta_mu_eff * sqrt(d / (2B))`` and one noise block outscores the signal block with probability
  ``Phi(-SNR)``; the paper asks ``Phi(-SNR) < k / n``, i.e. ``SNR > Phi^-1(1 - k/n)``.

Here: the normal distribution, the formulas (scalars or numpy arrays, broadcasting), the top-k retrieval
probability the model implies, the exact (numerical) failure probability for unit vectors, and the Wilson
interval of a measured rate. The array-argument checks here (``_float_array`` and friends) are shared by
the simulation and the measurement.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from flashmoba._checks import check_int, check_real

# ----------------------------------------------------------------------------------------------------
# Normal distribution and array checks
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
    points_per_std = check_int("points_per_std", points_per_std, minimum=4)
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
# The interval of a measured rate
# ----------------------------------------------------------------------------------------------------


def _check_confidence(confidence) -> float:
    confidence = check_real("confidence", confidence)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return confidence


def wilson_interval(successes, trials, confidence: float = 0.95):
    """Wilson score interval for a binomial rate: ``(low, high)``; arrays broadcast."""
    confidence = _check_confidence(confidence)
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
