"""Monte-Carlo simulation of the paper's router setup: one query, a few key blocks, many trials."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flashmoba._checks import check_choice, check_int, check_real
from flashmoba.snr.theory import (
    _check_confidence,
    delta_mu_eff,
    failure_probability,
    retrieval_probability,
    snr,
    wilson_interval,
)

DOT_PRODUCT_LAWS = ("sphere", "gaussian")


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
    head_dim = check_int("head_dim", head_dim, minimum=2 if law == "sphere" else 1)
    block_size = check_int("block_size", block_size, minimum=1)
    m = check_int("m", m, minimum=1)
    num_blocks = check_int("num_blocks", num_blocks, minimum=2)
    topk = check_int("topk", topk, minimum=1)
    trials = check_int("trials", trials, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    check_choice("law", law, DOT_PRODUCT_LAWS)
    mu_signal, mu_noise, mu_cluster = _check_means(mu_signal, mu_noise, mu_cluster, m, block_size)
    setup = _TrialSetup(
        law=law,
        head_dim=head_dim,
        block_size=block_size,
        m=m,
        num_blocks=num_blocks,
        mu_signal=mu_signal,
        mu_noise=mu_noise,
        mu_cluster=mu_cluster,
        planted_scale=_planted_scale(planted_std, head_dim),
    )
    confidence = _check_confidence(confidence)
    failures, hits, clipped = _count_outcomes(setup, topk, trials, np.random.default_rng(seed))

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


def _check_means(mu_signal, mu_noise, mu_cluster, m: int, block_size: int) -> tuple:
    """The three mean dot products as floats (mu_cluster stays None when no key is clustered)."""
    if m > block_size:
        raise ValueError(f"m must be <= block_size ({block_size}), got {m}")
    if m > 1 and mu_cluster is None:
        raise ValueError("mu_cluster is required when m > 1")
    mu_signal = check_real("mu_signal", mu_signal)
    mu_noise = check_real("mu_noise", mu_noise)
    if mu_cluster is not None:
        mu_cluster = check_real("mu_cluster", mu_cluster)
    return mu_signal, mu_noise, mu_cluster


def _planted_scale(planted_std, head_dim: int) -> float:
    """The planted keys' spread relative to the noise keys' (whose standard deviation is 1/sqrt(d))."""
    if planted_std is None:
        return 1.0
    return check_real("planted_std", planted_std, minimum=0.0) * math.sqrt(head_dim)


@dataclass(frozen=True)
class _TrialSetup:
    """What one trial draws: the law, the sizes and the means of the dot products."""

    law: str
    head_dim: int
    block_size: int
    m: int
    num_blocks: int
    mu_signal: float
    mu_noise: float
    mu_cluster: float | None
    planted_scale: float


def _count_outcomes(setup: _TrialSetup, topk: int, trials: int, rng: np.random.Generator) -> tuple:
    """(pairwise failures, top-k hits, clipped dot products) over ``trials`` trials, drawn in chunks."""
    failures = hits = clipped = 0
    chunk = max(1, _SIMULATION_CHUNK_ELEMENTS // (setup.num_blocks * setup.block_size))
    for start in range(0, trials, chunk):
        dots, chunk_clipped = _draw_dot_products(setup, min(chunk, trials - start), rng)
        clipped += chunk_clipped
        scores = dots.mean(axis=2)
        signal = scores[:, :1]
        failures += int(np.count_nonzero(scores[:, 1] > signal[:, 0]))
        hits += int(np.count_nonzero((scores[:, 1:] > signal).sum(axis=1) < topk))
    return failures, hits, clipped


def _draw_dot_products(setup: _TrialSetup, count: int, rng: np.random.Generator) -> tuple:
    """Dot products ``[count, num_blocks, block_size]`` with the m planted keys first in block 0, and how
    many of them were clipped to [-1, 1] (sphere law)."""
    shape = (count, setup.num_blocks, setup.block_size)
    mu_noise, m = setup.mu_noise, setup.m
    if setup.law == "sphere":
        half = (setup.head_dim - 1) / 2.0
        dots = rng.beta(half, half, size=shape)
        dots *= 2.0
        dots -= 1.0 - mu_noise
    else:
        dots = rng.standard_normal(shape)
        dots *= 1.0 / math.sqrt(setup.head_dim)
        dots += mu_noise
    planted = (dots[:, 0, :m] - mu_noise) * setup.planted_scale
    planted[:, 0] += setup.mu_signal
    if m > 1:
        planted[:, 1:] += setup.mu_cluster
    dots[:, 0, :m] = planted
    clipped = 0
    # A cosine lies in [-1, 1]; noise keys can leave it only when mu_noise != 0 (skip the pass otherwise).
    if setup.law == "sphere":
        region = dots if mu_noise != 0 else dots[:, 0, :m]
        clipped = int(np.count_nonzero(np.abs(region) > 1.0))
        np.clip(region, -1.0, 1.0, out=region)
    return dots, clipped
