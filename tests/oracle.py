"""An independent brute-force MoBA: a per-query float64 loop written straight from the contract.

Deliberately naive and separate from ``flashmoba.reference`` (no chunking, no sorting tricks), so that a
shared misreading of the rules is unlikely to hide in both. Routing scores are exact rationals, so the
tie rule is tested on ties of real arithmetic, not on ties that rounding happens to produce.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def exact_centroids(keys, block_size):
    """Block means as exact rationals: keys [S, D] float64 -> list over blocks of lists of Fractions."""
    seqlen = keys.shape[0]
    centroids = []
    for start in range(0, seqlen, block_size):
        rows = keys[start : start + block_size].tolist()
        centroids.append([sum(Fraction(row[d]) for row in rows) / len(rows) for d in range(keys.shape[1])])
    return centroids


def select_blocks(q_row, centroids, position, num_blocks, block_size, topk, causal):
    """The set of selected block ids for one query row.

    Scores are exact rationals, so a tie in real arithmetic is a tie here, and goes to the later block.
    """
    q_exact = [Fraction(x) for x in q_row.tolist()]
    scores = [sum(a * b for a, b in zip(q_exact, centroids[j])) for j in range(num_blocks)]
    by_score = lambda j: (scores[j], j)  # noqa: E731  (later block wins a tie)
    if causal:
        if position < 0:
            return set()
        own = position // block_size
        earlier = sorted(range(own), key=by_score, reverse=True)[: topk - 1]
        return set(earlier) | {own}
    return set(sorted(range(num_blocks), key=by_score, reverse=True)[:topk])


def brute_force_sequence(q, k, v, block_size, topk, causal, softmax_scale=None):
    """q [T, Hq, D], k/v [S, Hkv, D] (any float dtype, used as float64).

    Returns o [T, Hq, D] float64, lse [Hq, T] float64, selections: list over (i, h) of block-id sets.
    """
    q, k, v = q.double(), k.double(), v.double()
    seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv, _ = k.shape
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    group = heads_q // heads_kv
    num_blocks = -(-seqlen_k // block_size)
    out = torch.zeros(seqlen_q, heads_q, head_dim, dtype=torch.float64)
    lse = torch.full((heads_q, seqlen_q), -math.inf, dtype=torch.float64)
    selections = {}
    for h in range(heads_q):
        keys, values = k[:, h // group], v[:, h // group]
        centroids = exact_centroids(keys, block_size)
        for i in range(seqlen_q):
            position = i + seqlen_k - seqlen_q
            chosen = select_blocks(q[i, h], centroids, position, num_blocks, block_size, topk, causal)
            selections[(i, h)] = chosen
            visible = [
                s for s in range(seqlen_k) if s // block_size in chosen and (not causal or s <= position)
            ]
            if not visible:
                continue
            logits = torch.stack([q[i, h] @ keys[s] for s in visible]) * scale
            out[i, h] = torch.softmax(logits, dim=0) @ values[visible]
            lse[h, i] = torch.logsumexp(logits, dim=0)
    return out, lse, selections


def selection_tensor(selections, seqlen_q, heads_q, topk):
    """Selection sets -> int32 [T, Hq, topk], ascending, -1 padded (the moba_select layout)."""
    result = torch.full((seqlen_q, heads_q, topk), -1, dtype=torch.int32)
    for (i, h), chosen in selections.items():
        ordered = sorted(chosen)[:topk]
        result[i, h, : len(ordered)] = torch.tensor(ordered, dtype=torch.int32)
    return result
