"""Context-parallel MoBA: each rank holds one contiguous slice of every sequence.

Layout: the process group has ``W`` ranks; the sequences (``batch`` of them, padded layout) are cut into
``W`` contiguous slices of ``L = seqlen_local`` tokens in rank order, so rank ``r`` holds q, k and v of
positions ``[r*L, (r+1)*L)``. Every rank passes the same ``batch``, ``L``, heads, head_dim, dtype and
options (not checked across ranks: that would cost a collective per call; with mismatched shapes a
collective fails or, on NCCL, gives garbage). ``L`` must be a multiple of ``block_size``, so blocks sit at
the same absolute positions ``[j*B, (j+1)*B)`` as in the whole sequence and no block straddles two ranks:
the block sums, centroids and routing of a slice's blocks are those of the whole sequence. Block ``j``
lives on rank ``j // (L/B)``.

Two schemes (``scheme=``), both exact (the local rows of ``moba_attn`` on the whole sequences):

``"selective"`` (the default): all-gather only the block sums (``B`` times fewer elements than the keys,
in float32), route the local queries against every block as ``moba_attn`` does (own block forced in, ties to
the later block, causal candidates), and fetch from their owners only the K/V blocks some local query head
selected (per sequence and block, all kv heads together): one ``all_to_all_single`` of the request counts,
one of the requested block ids, one of the blocks (K and V stacked). The local rows are then
``moba_attn_varlen`` over a *compact* key sequence per batch row: the needed blocks in ascending order,
always including every block of this rank. This gives the same result because selection over a subset of
blocks that contains a query's selected blocks selects the same blocks (each is among the best of the
subset, and the order, so the tie rule, is kept), and the compact sequence ends with this rank's slice
(causal: no block after it is ever needed), so bottom-right alignment puts each query at its own offset
of its own block. The backward runs the block exchange reversed: the K/V gradients of fetched blocks go
back to their owners and are summed into their slices' gradients.

``"allgather"`` (the first version, as torchtitan's context parallelism does for FlexAttention):
all-gather K and V (one collective, stacked), then ``moba_attn`` of the local queries against the keys
``[0, (r+1)*L)`` (causal; bottom-right alignment puts local query ``i`` at its true position ``r*L + i``)
or all keys (non-causal); its backward sums every rank's K/V gradients into each slice's owner.

Why "selective" is the default: it never moves more K/V bytes than "allgather" and never holds more
(at most the remote blocks the local queries can select, and causal never fetches a later slice, which
"allgather" always sends), so causal training moves at most half of "allgather"'s K/V bytes over the group
(rank ``r`` fetches at most ``r`` slices, not ``W - 1``). On top come the block sums, ``1/(2B)`` of the
K/V bytes in float32 (``1/B`` for 16-bit K/V), and the block ids. The fetch saves more only when the
local queries' selections leave remote blocks out: with unconcentrated routing and many queries per slice
(``L * Hq * (topk - 1)`` far above the number of remote blocks) the union is every candidate block, and
non-causal "selective" then moves slightly more than "allgather" (measure with ``communication_report``).
Its price is latency: three small collectives before the block exchange, a host read of the request
counts (a synchronisation on CUDA; not capturable in a CUDA graph), and a second routing pass (the varlen
call routes again over the compact blocks); "allgather" is the better choice under CUDA graphs.

On the Triton backend the fetch is decided by the reference router on the gathered sums; a score tie
broken differently by the kernel's router (rounding-level) can only change the choice among fetched
blocks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashmoba import reference
from flashmoba._checks import check_choice
from flashmoba.api import _check_options, _check_qkv, moba_attn, moba_attn_varlen
from flashmoba.parallel.communication import SCHEMES, AllGather, AllToAll, CommunicationLog, all_to_all


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


def group_rank_and_size(group) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; errors name what is missing."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "moba_attn_context_parallel needs an initialised process group "
            "(torch.distributed.init_process_group) to exchange keys and values over"
        )
    rank = dist.get_rank(group=group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group {group!r}")
    return rank, dist.get_world_size(group=group)


# ----------------------------------------------------------------------------------------------------
# "allgather"
# ----------------------------------------------------------------------------------------------------


def _allgather_attention(q, k, v, block_size, topk, causal, scale, backend, group, rank, world, log):
    """K and V of every slice gathered (one collective for both), then the local rows of moba_attn."""
    gathered = AllGather.apply(torch.stack((k, v)), group, rank, world, log, ("allgather", "kv"))
    seen = rank + 1 if causal else world  # causal queries of rank r see no key after (r+1)*L
    # [W, 2, batch, L, Hkv, D] -> [2, batch, seen*L, Hkv, D]
    kv = gathered[:seen].permute(1, 2, 0, 3, 4, 5).flatten(2, 3)
    return moba_attn(q, kv[0], kv[1], block_size, topk, causal=causal, softmax_scale=scale, backend=backend)


# ----------------------------------------------------------------------------------------------------
# "selective"
# ----------------------------------------------------------------------------------------------------


def _gathered_block_sums(k, block_size, group, world, log) -> torch.Tensor:
    """Block sums of every slice, ``[batch, W*L/B, Hkv, D]`` in the reference's routing dtype (float32,
    float64 for float64 keys), computed by the reference's own ``_block_sums`` on each local row."""
    with torch.no_grad():
        local = torch.stack([reference._block_sums(row, block_size)[0] for row in k.detach()])
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
    if log is not None:
        moved = (world - 1) * local.numel() * local.element_size()
        log.add("selective", "forward", "block sums", moved, moved)
    return torch.cat(parts, dim=1)


def _needed_blocks(q, sums, block_size, topk, causal, rank, dtype) -> torch.Tensor:
    """``[batch, W*L/B]`` bool: the blocks some local query head selects, as ``moba_attn`` routes on the
    whole sequences, plus every block of this rank (kept in the compact sequence, see module docstring)."""
    batch, seqlen_local, heads_q, head_dim = q.shape
    blocks_local = seqlen_local // block_size
    num_blocks = sums.shape[1]
    # Causal queries never select a block after their own slice: route against the blocks up to it.
    routed = (rank + 1) * blocks_local if causal else num_blocks
    needed = torch.zeros(batch, num_blocks, dtype=torch.bool, device=q.device)
    needed[:, rank * blocks_local : (rank + 1) * blocks_local] = True
    counts = torch.full((routed,), block_size, dtype=sums.dtype, device=q.device)
    total_k = (rank + 1) * seqlen_local if causal else num_blocks * block_size
    topk = min(topk, num_blocks)  # as the reference clamps it to the whole sequence
    step = reference._chunk_size(heads_q, max(total_k, routed * head_dim))
    with torch.no_grad():
        for row in range(batch):
            routing_keys = reference._routing_keys_from_sums(sums[row, :routed], counts, dtype)
            for start in range(0, seqlen_local, step):
                stop = min(seqlen_local, start + step)
                query_pos = torch.arange(start, stop, device=q.device) + rank * seqlen_local
                q_chunk = q[row, start:stop].detach()
                selected = reference._route_chunk(q_chunk, routing_keys, query_pos, block_size, topk, causal)
                needed[row, :routed] |= selected.any(dim=1).any(dim=0)
    return needed


def _fetch_blocks(k, v, needed, block_size, group, rank, world, log):
    """The blocks ``needed`` marks, K and V stacked, in a pool ``[units, 2, B, Hkv, D]``, and the pool index
    of every needed block ``[batch, W*L/B]`` (-1 elsewhere). The pool is this rank's blocks (sequence-major)
    followed by the fetched ones; both parts keep autograd to their owners' k and v."""
    batch, seqlen_local, heads_kv, head_dim = k.shape
    blocks_local = seqlen_local // block_size
    # [batch, L, Hkv, D] x2 -> [batch * L/B, 2, B, Hkv, D]: one unit per (sequence, block).
    kv = torch.stack((k, v), dim=1).view(batch, 2, blocks_local, block_size, heads_kv, head_dim)
    local_pool = kv.transpose(1, 2).reshape(batch * blocks_local, 2, block_size, heads_kv, head_dim)
    pool_index = torch.full(needed.shape, -1, dtype=torch.long, device=k.device)
    own = torch.arange(batch * blocks_local, device=k.device).view(batch, blocks_local)
    pool_index[:, rank * blocks_local : (rank + 1) * blocks_local] = own
    # Requests to each owner: (sequence, local block) of its needed blocks, sequence-major, as units.
    requests, wanted_counts = [], []
    next_unit = batch * blocks_local
    for owner in range(world):
        if owner == rank:
            requests.append(own.new_empty(0))
            wanted_counts.append(0)
            continue
        columns = slice(owner * blocks_local, (owner + 1) * blocks_local)
        rows, blocks = needed[:, columns].nonzero(as_tuple=True)
        requests.append(rows * blocks_local + blocks)
        wanted_counts.append(rows.numel())
        units = torch.arange(next_unit, next_unit + rows.numel(), device=k.device)
        pool_index[:, columns][rows, blocks] = units
        next_unit += rows.numel()
    counts = torch.tensor(wanted_counts, dtype=torch.long, device=k.device)
    asked = all_to_all(counts, [1] * world, [1] * world, group, rank, log, ("selective", "counts"))
    asked_counts = [int(n) for n in asked.tolist()]  # one host read: the split sizes of the next two
    label = ("selective", "block ids")
    asked_units = all_to_all(torch.cat(requests), wanted_counts, asked_counts, group, rank, log, label)
    sent = local_pool.index_select(0, asked_units)
    label = ("selective", "kv blocks")
    fetched = AllToAll.apply(sent, asked_counts, wanted_counts, group, rank, log, label)
    return torch.cat((local_pool, fetched)), pool_index


def _selective_attention(q, k, v, block_size, topk, causal, scale, backend, group, rank, world, log):
    batch, seqlen_local, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    sums = _gathered_block_sums(k, block_size, group, world, log)
    needed = _needed_blocks(q, sums, block_size, topk, causal, rank, k.dtype)
    pool, pool_index = _fetch_blocks(k, v, needed, block_size, group, rank, world, log)
    # The compact key sequence of each batch row: its needed blocks in ascending order (row-major nonzero).
    compact = pool_index[needed]
    per_row = needed.sum(dim=1)
    cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = torch.cumsum(per_row * block_size, dim=0)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device) * seqlen_local
    kv = pool.index_select(0, compact)  # [blocks, 2, B, Hkv, D]
    keys = kv[:, 0].reshape(-1, heads_kv, head_dim)
    values = kv[:, 1].reshape(-1, heads_kv, head_dim)
    out = moba_attn_varlen(
        q.reshape(batch * seqlen_local, heads_q, head_dim),
        keys,
        values,
        cu_q,
        cu_k,
        seqlen_local,
        int(per_row.max()) * block_size,
        block_size,
        topk,
        causal=causal,
        softmax_scale=scale,
        backend=backend,
        check_cu_seqlens=False,  # built here, from counts already on the host
    )
    return out.view(batch, seqlen_local, heads_q, head_dim)


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


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
    scheme: str = "selective",
    comm_log: CommunicationLog | None = None,
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
            it must call this function with tensors of the same shapes and the same options.
        scheme: ``"selective"`` (fetch only the selected K/V blocks) or ``"allgather"`` (gather all K
            and V); see the module docstring for the trade-off.
        comm_log: a ``CommunicationLog`` that receives one record per collective (forward now, backward
            when it runs), with the bytes this rank sent and received.

    Returns:
        o ``[batch, seqlen_local, Hq, D]``: the rows of this rank's queries. Gradients flow to the local
        q, k and v (those of k and v summed over every rank's queries).
    """
    # Shapes and options only (no tensor values are read), before any rank waits in a collective.
    block_size, topk = _check_local_inputs(q, k, v, block_size, topk, causal, softmax_scale, backend)
    scheme = check_choice("scheme", scheme, SCHEMES)
    if comm_log is not None and not isinstance(comm_log, CommunicationLog):
        raise TypeError(f"comm_log must be a CommunicationLog or None, got {type(comm_log).__name__}")
    rank, world = group_rank_and_size(group)
    attention = _selective_attention if scheme == "selective" else _allgather_attention
    return attention(q, k, v, block_size, topk, causal, softmax_scale, backend, group, rank, world, comm_log)
