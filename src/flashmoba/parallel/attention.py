"""Context-parallel MoBA: each rank holds one contiguous slice of every sequence.

Layout: the process group has ``W`` ranks; the sequences (``batch`` of them, padded layout) are cut into
``W`` contiguous slices of ``L = seqlen_local`` tokens in rank order, so rank ``r`` holds q, k and v of
positions ``[r*L, (r+1)*L)``. Every rank passes the same ``batch``, ``L``, heads and head_dim (not checked
across ranks: that would cost a collective per call; with mismatched shapes the all-gather fails or, on
NCCL, gives garbage). ``L`` must be a multiple of ``block_size``.

Scheme (first version, as torchtitan's context parallelism does for FlexAttention): all-gather K and V
over the group (one collective, K and V stacked) with ``torch.distributed.nn.functional.all_gather``,
whose backward sums the key and value gradients of all ranks and hands each rank those of its own slice
(reduce-scatter on NCCL, all-to-all elsewhere); then compute the local rows with ``flashmoba.moba_attn``.

Why it is exact:

- Blocks sit at absolute positions ``[j*B, (j+1)*B)`` and ``L`` is a multiple of ``B``, so the gathered
  keys ``[0, S)`` are cut into the same blocks as the whole sequence (for ``S`` a multiple of ``L``), with
  the same centroids; no block straddles two ranks.
- ``causal=True``: rank ``r`` passes its ``L`` queries against the gathered keys ``[0, (r+1)*L)``.
  ``moba_attn`` aligns bottom-right, so local query ``i`` sits at ``i + S - T = i + r*L``: its true
  position. Its own block and every block ending before it lie inside ``[0, (r+1)*L)``, so it scores the
  same candidates with the same centroids as in the whole sequence, selects the same blocks (ties to the
  later block either way) and attends to the same keys. Keys after ``(r+1)*L`` are never visible to these
  queries and are not passed.
- ``causal=False``: the local queries against all gathered keys, which is the whole sequence.

Cost: every rank receives and holds the whole K and V, ``W`` times the local K/V bytes
(``2 * batch * W*L * heads_kv * head_dim`` elements per rank), and the backward moves the same amount of
gradient. The attention itself computes only the local rows.

Future work (the issue's second version): a selective fetch. Gather only the block centroids (``B``
times fewer bytes than the keys), route the local queries against them, then fetch from their owners only
the K/V blocks some local query routed to: at most ``topk`` blocks of ``B`` keys per query and kv head,
so the bytes moved are bounded by the union of the routed blocks instead of the whole sequence, a large
saving when ``topk * B`` is far below ``W * L``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather

from flashmoba.api import _check_options, _check_qkv, moba_attn


def _check_local_inputs(q, k, v, block_size, topk, causal, softmax_scale, backend) -> tuple[int, int]:
    """The checks that need no process group; returns block_size and topk as Python ints."""
    _check_qkv(
        q,
        k,
        v,
        4,
        "[batch, seqlen_local, heads_q, head_dim]",
        "[batch, seqlen_local, heads_kv, head_dim]",
    )
    block_size, topk = _check_options(block_size, topk, softmax_scale, backend, causal=causal)
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(
            "k and v must have q's batch and seqlen_local (the same slice of the same sequences), got "
            f"q of shape {tuple(q.shape)} and k of shape {tuple(k.shape)}"
        )
    seqlen_local = q.shape[1]
    if seqlen_local % block_size != 0:
        raise ValueError(
            f"seqlen_local must be a multiple of block_size so that no block straddles two ranks, got "
            f"seqlen_local={seqlen_local} and block_size={block_size}"
        )
    return block_size, topk


def _group_rank_and_size(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "moba_attn_context_parallel needs an initialised process group "
            "(torch.distributed.init_process_group) to gather K and V over"
        )
    rank = dist.get_rank(group=group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group {group!r}")
    return rank, dist.get_world_size(group=group)


def _gather_kv(k: torch.Tensor, v: torch.Tensor, group, num_slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first ``num_slices`` ranks' slices, in rank order along the sequence, with autograd.
    One collective for both (k and v have the same shape), so forward and backward each issue one."""
    slices = all_gather(torch.stack((k, v)), group=group)  # W tensors [2, batch, L, heads_kv, head_dim]
    kv = torch.cat(slices[:num_slices], dim=2)
    return kv[0], kv[1]


def moba_attn_context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    topk: int,
    *,
    group=None,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """This rank's slice of ``flashmoba.moba_attn`` on sequences split contiguously over ``group``.

    Args:
        q: ``[batch, seqlen_local, Hq, D]``, this rank's queries (positions ``[r*L, (r+1)*L)`` of every
            sequence, ``r`` the rank in ``group``, ``L = seqlen_local``).
        k, v: ``[batch, seqlen_local, Hkv, D]``, the same slice of the keys and values; ``Hq`` a multiple
            of ``Hkv`` (GQA/MQA).
        block_size, topk, causal, softmax_scale, backend: as in ``flashmoba.moba_attn``; ``seqlen_local``
            must be a multiple of ``block_size``.
        group: the process group the sequences are split over (default: the whole world). Every rank of
            it must call this function with tensors of the same shapes.

    Returns:
        o ``[batch, seqlen_local, Hq, D]``: the rows of this rank's queries. Gradients flow to the local
        q, k and v (those of k and v summed over every rank's queries).
    """
    # Shapes and options only (no tensor values are read), before any rank waits in a collective.
    block_size, topk = _check_local_inputs(q, k, v, block_size, topk, causal, softmax_scale, backend)
    rank, world_size = _group_rank_and_size(group)
    # Causal queries of rank r see no key after (r+1)*L; non-causal ones see every slice.
    k_seen, v_seen = _gather_kv(k, v, group, rank + 1 if causal else world_size)
    return moba_attn(
        q, k_seen, v_seen, block_size, topk, causal=causal, softmax_scale=softmax_scale, backend=backend
    )
