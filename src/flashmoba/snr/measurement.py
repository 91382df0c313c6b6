"""The model's quantities measured on the q and k of a real attention layer, against the router's recall.

``measure_router_snr`` takes q, k and where a needle was planted, estimates per query head what the SNR
model needs (mean dot products, their variance, the effective gap), predicts the router's recall from them
and counts how often the router (``moba_select``) picked the signal block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from flashmoba._checks import check_int, is_integer
from flashmoba.api import moba_select
from flashmoba.snr.theory import retrieval_probability, wilson_interval


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
            if not is_integer(position):
                raise TypeError(f"{name} must hold int positions, got {position!r}")
            if not 0 <= position < length:
                raise ValueError(f"{name} must lie in [0, {length}), got {position}")
        result.append(torch.tensor(sorted({int(p) for p in row}), dtype=torch.long))
    return result


def _default_select_blocks(causal: bool) -> Callable:
    def select(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
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
    accumulator = RouterSnrAccumulator(block_size, topk, causal=causal, select_blocks=select_blocks)
    accumulator.add(
        q,
        k,
        needle_positions=needle_positions,
        query_positions=query_positions,
        signal_positions=signal_positions,
    )
    return accumulator.result()


class RouterSnrAccumulator:
    """``measure_router_snr`` over several calls: ``add`` batches of sequences (of any lengths, e.g. samples
    too long to hold all at once), then ``result()`` summarises every sample added, as one call would.

    ``add`` takes what ``measure_router_snr`` takes besides the router's settings; every batch must have the
    same query heads and head_dim.
    """

    def __init__(
        self, block_size: int, topk: int, *, causal: bool = True, select_blocks: Callable | None = None
    ):
        self.block_size = check_int("block_size", block_size, minimum=1)
        self.topk = check_int("topk", topk, minimum=1)
        self.causal = bool(causal)
        self.select_blocks = select_blocks or _default_select_blocks(self.causal)
        self.samples = _Samples()
        self.heads_q: int | None = None
        self.head_dim: int | None = None

    def add(self, q, k, *, needle_positions, query_positions, signal_positions=None) -> None:
        q, k = _check_qk(q, k)
        batch, seqlen_q, heads_q, head_dim = q.shape
        if self.heads_q is None:
            self.heads_q, self.head_dim = heads_q, head_dim
        elif (heads_q, head_dim) != (self.heads_q, self.head_dim):
            raise ValueError(
                f"q has {heads_q} heads of {head_dim}; earlier batches had {self.heads_q} of {self.head_dim}"
            )
        seqlen_k = k.shape[1]
        needles = _positions_per_sequence("needle_positions", needle_positions, batch, seqlen_k)
        queries = _positions_per_sequence("query_positions", query_positions, batch, seqlen_q)
        signals = _signal_keys(signal_positions, batch, seqlen_k)
        if signals is not None:
            # The signal key is a needle key: its block must not count as noise.
            needles = [torch.unique(torch.cat([n, s])) for n, s in zip(needles, signals)]
        blocks = _KeyBlocks.of(seqlen_k, self.block_size)
        for b in range(batch):
            selected = _select_for_queries(
                self.select_blocks, q[b], k[b], queries[b], self.block_size, self.topk, self.causal
            )
            signal = None if signals is None else int(signals[b][0])
            _record_sequence(
                self.samples, q[b], k[b], needles[b], queries[b], signal, selected, blocks, self.causal
            )

    def result(self) -> RouterMeasurement:
        if self.heads_q is None:
            raise ValueError("no batch was added")
        topk_free = self.topk - 1 if self.causal else self.topk
        return _summarise_measurement(
            self.samples.records,
            self.samples.skipped,
            self.heads_q,
            self.head_dim,
            self.block_size,
            self.topk,
            topk_free,
            self.causal,
        )


def _signal_keys(signal_positions, batch: int, seqlen_k: int) -> list[torch.Tensor] | None:
    if signal_positions is None:
        return None
    signals = _positions_per_sequence("signal_positions", signal_positions, batch, seqlen_k)
    if any(s.numel() != 1 for s in signals):
        raise ValueError("signal_positions must give one position per sequence")
    return signals


@dataclass(frozen=True)
class _KeyBlocks:
    """How S keys split into blocks of ``block_size`` (the last block may be shorter)."""

    block_size: int
    num_blocks: int
    block_of_key: torch.Tensor  # [S] int64
    block_sizes: torch.Tensor  # [n] float64: keys per block

    @classmethod
    def of(cls, seqlen_k: int, block_size: int) -> _KeyBlocks:
        num_blocks = -(-seqlen_k // block_size)
        block_of_key = torch.arange(seqlen_k) // block_size
        block_sizes = torch.bincount(block_of_key, minlength=num_blocks).double()
        return cls(block_size, num_blocks, block_of_key, block_sizes)


class _Samples:
    """The measured quantities, one entry per usable (sequence, query, head), and why others were left out."""

    FIELDS = (
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

    def __init__(self):
        self.records: dict[str, list] = {name: [] for name in self.FIELDS}
        self.skipped = {"signal block not a candidate (own or later block)": 0, "no candidate noise block": 0}

    def add(self, **values) -> None:
        for name, value in values.items():
            self.records[name].append(value)


@dataclass(frozen=True)
class _CandidateBlocks:
    """Per query of one sequence: the blocks the router may pick and which of them hold no needle key."""

    candidate: torch.Tensor  # [Q, n] bool; causal: the blocks that end before the query's own block starts
    noise_block: torch.Tensor  # [Q, n] bool: candidate and free of needle keys
    noise_key: torch.Tensor  # [Q, S] float64: 1 for each key of a noise block
    key_count: torch.Tensor  # [Q] noise keys
    block_count: torch.Tensor  # [Q] noise blocks (float64)

    @classmethod
    def of(cls, positions: torch.Tensor, needles: torch.Tensor, blocks: _KeyBlocks, causal: bool):
        block_ids = torch.arange(blocks.num_blocks)
        if causal:
            candidate = (block_ids[None, :] < (positions // blocks.block_size)[:, None]) & (positions >= 0)[
                :, None
            ]
        else:
            candidate = torch.ones(len(positions), blocks.num_blocks, dtype=torch.bool)
        needle_block = torch.zeros(blocks.num_blocks, dtype=torch.bool)
        needle_block[needles // blocks.block_size] = True
        noise_block = candidate & ~needle_block[None, :]
        noise_key = noise_block[:, blocks.block_of_key].double()
        return cls(candidate, noise_block, noise_key, noise_key.sum(-1), noise_block.sum(-1).double())


@dataclass(frozen=True)
class _HeadScores:
    """One head's raw dot products with every key, its block scores, and their noise statistics."""

    dots: torch.Tensor  # [Q, S] q . k
    scores: torch.Tensor  # [Q, n] q . centroid
    noise_mean: torch.Tensor  # [Q] mean noise dot product
    noise_var: torch.Tensor  # [Q] variance of the noise dot products
    block_mean: torch.Tensor  # [Q] mean noise block score
    block_var: torch.Tensor  # [Q] variance of the noise block scores (NaN below two noise blocks)

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, blocks: _KeyBlocks, where: _CandidateBlocks):
        """q ``[Q, D]``, k ``[S, D]``."""
        dots = q.double() @ k.double().T
        padded = dots.new_zeros(dots.shape[0], blocks.num_blocks * blocks.block_size)
        padded[:, : k.shape[0]] = dots
        scores = padded.view(-1, blocks.num_blocks, blocks.block_size).sum(-1) / blocks.block_sizes
        noise_key, key_count = where.noise_key, where.key_count
        noise_mean = (dots * noise_key).sum(-1) / key_count.clamp(min=1)
        noise_var = (((dots - noise_mean[:, None]) ** 2) * noise_key).sum(-1) / (key_count - 1).clamp(min=1)
        noise_block, block_count = where.noise_block, where.block_count
        block_mean = (scores * noise_block).sum(-1) / block_count.clamp(min=1)
        block_var = (((scores - block_mean[:, None]) ** 2) * noise_block).sum(-1) / (block_count - 1)
        block_var = torch.where(block_count >= 2, block_var, torch.full_like(block_var, float("nan")))
        return cls(dots, scores, noise_mean, noise_var, block_mean, block_var)


def _record_sequence(
    samples: _Samples,
    q: torch.Tensor,
    k: torch.Tensor,
    needles: torch.Tensor,
    queries: torch.Tensor,
    signal_key: int | None,
    selected: torch.Tensor,
    blocks: _KeyBlocks,
    causal: bool,
) -> None:
    """The samples of one sequence: q ``[T, Hq, D]``, k ``[S, Hkv, D]``, selected ``[Q, Hq, topk]``."""
    positions = queries + (k.shape[0] - q.shape[0])  # key position of each query
    where = _CandidateBlocks.of(positions, needles, blocks, causal)
    group = q.shape[1] // k.shape[1]
    for h in range(q.shape[1]):  # one head at a time bounds memory to [Q, S]
        head = _HeadScores.of(q[queries, h], k[:, h // group], blocks, where)
        if signal_key is None:
            head_signal = int(needles[head.dots[:, needles].mean(dim=0).argmax()])
        else:
            head_signal = signal_key
        _record_head(samples, h, head, where, needles, head_signal, selected[:, h], blocks)


def _record_head(
    samples: _Samples,
    h: int,
    head: _HeadScores,
    where: _CandidateBlocks,
    needles: torch.Tensor,
    signal_key: int,
    selected: torch.Tensor,
    blocks: _KeyBlocks,
) -> None:
    """One sample per query whose signal block is a candidate, dot products centred on its noise mean."""
    signal_block = signal_key // blocks.block_size
    cluster_keys = needles[(needles // blocks.block_size == signal_block) & (needles != signal_key)]
    for i in range(head.dots.shape[0]):
        if not where.candidate[i, signal_block]:
            samples.skipped["signal block not a candidate (own or later block)"] += 1
            continue
        if not where.noise_block[i].any():
            samples.skipped["no candidate noise block"] += 1
            continue
        centre = head.noise_mean[i]
        samples.add(
            head=h,
            mu_noise=float(centre),
            signal=float(head.dots[i, signal_key] - centre),
            cluster_sum=float((head.dots[i, cluster_keys] - centre).sum()),
            cluster_count=len(cluster_keys),
            sigma2=float(head.noise_var[i]),
            block_gap=float(
                blocks.block_sizes[signal_block] * (head.scores[i, signal_block] - head.block_mean[i])
            ),
            block_var=float(head.block_var[i]),
            candidates=int(where.candidate[i].sum()),
            hit=bool((selected[i] == signal_block).any()),
        )


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
    samples = np.bincount(heads, minlength=heads_q)
    means = _per_head_means(data, heads, heads_q)
    gap, sigma2 = means["delta_mu_eff"], means["sigma2"]
    gap_block, block_variance = means["delta_mu_eff_block"], means["block_variance"]
    recall = _recall_per_head(data, heads, heads_q, means, block_size, topk_free)
    with np.errstate(invalid="ignore", divide="ignore"):
        interval = wilson_interval(recall["hits"], np.maximum(samples, 1))
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
        mu_noise=means["mu_noise"],
        mu_signal=means["mu_noise"] + means["delta_mu"],
        mu_cluster=means["mu_noise"] + means["cluster_excess"],
        m=means["m"],
        sigma2=sigma2,
        delta_mu=means["delta_mu"],
        delta_mu_eff=gap,
        snr=snr_values,
        predicted_recall=recall["predicted"],
        delta_mu_eff_block=gap_block,
        block_variance=block_variance,
        block_variance_ratio=ratio,
        snr_block=snr_block,
        predicted_recall_block=recall["predicted_block"],
        measured_recall=recall["measured"],
        measured_recall_interval=(low, high),
        skipped=skipped,
    )


def _per_head_means(data: dict, heads: np.ndarray, heads_q: int) -> dict:
    """The sample means of each head (NaN samples left out; NaN for a head without samples)."""

    def per_head(values: np.ndarray) -> np.ndarray:
        out = np.full(heads_q, np.nan)
        for h in range(heads_q):
            chosen = values[heads == h]
            chosen = chosen[~np.isnan(chosen)]
            if chosen.size:
                out[h] = chosen.mean()
        return out

    has_cluster = data["cluster_count"] > 0
    cluster_excess = np.where(has_cluster, data["cluster_sum"] / np.maximum(data["cluster_count"], 1), np.nan)
    return {
        "mu_noise": per_head(data["mu_noise"]),
        "delta_mu": per_head(data["signal"]),
        "m": 1.0 + per_head(data["cluster_count"]),
        "cluster_excess": per_head(cluster_excess),
        "sigma2": per_head(data["sigma2"]),
        "delta_mu_eff": per_head(data["signal"] + data["cluster_sum"]),
        "delta_mu_eff_block": per_head(data["block_gap"]),
        "block_variance": per_head(data["block_var"]),
    }


def _recall_per_head(
    data: dict, heads: np.ndarray, heads_q: int, means: dict, block_size: int, topk_free: int
) -> dict:
    """Measured recall and hits per head, and the two predictions over the head's own candidate counts."""
    gap, sigma2 = means["delta_mu_eff"], means["sigma2"]
    gap_block, block_variance = means["delta_mu_eff_block"], means["block_variance"]
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
    return {"predicted": predicted, "predicted_block": predicted_block, "measured": measured, "hits": hits}


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
