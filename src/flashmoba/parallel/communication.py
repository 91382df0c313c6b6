"""Communication of context-parallel MoBA: the collectives it issues (with autograd), what they move, and
the analytic estimate of what they should move.

Bytes moved are counted from the tensors actually handed to each collective: for every collective, the
part of this rank's send buffer addressed to another rank (``bytes_sent``) and the part of its receive
buffer that came from another rank (``bytes_received``); what a rank sends to itself is a local copy and
is not counted. An all-gather of a tensor of ``n`` bytes over ``W`` ranks therefore sends ``(W-1)*n`` and
receives ``(W-1)*n`` per rank whatever algorithm the backend runs underneath (ring, tree): this is the
payload, not the wire traffic of one implementation. Summed over the group, sent equals received.

Pass a ``CommunicationLog`` as ``comm_log=`` to ``moba_attn_context_parallel``: the forward appends its
records at once, the backward when it runs.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from flashmoba._checks import check_bool, check_choice, check_int, check_positive_int

SCHEMES = ("allgather", "selective")
PHASES = ("forward", "backward")


@dataclasses.dataclass(frozen=True)
class CommRecord:
    """One collective of one call on this rank."""

    scheme: str  # "allgather" or "selective"
    phase: str  # "forward" or "backward"
    what: str  # "kv", "kv grad", "block sums", "counts", "block ids", "kv blocks", "kv blocks grad", ...
    bytes_sent: int
    bytes_received: int


@dataclasses.dataclass
class CommunicationLog:
    """The records of the calls made with this log (this rank only)."""

    records: list[CommRecord] = dataclasses.field(default_factory=list)

    def add(self, scheme: str, phase: str, what: str, bytes_sent: int, bytes_received: int) -> None:
        self.records.append(CommRecord(scheme, phase, what, int(bytes_sent), int(bytes_received)))

    def total(self, *, scheme: str | None = None, phase: str | None = None, key: str = "bytes_sent") -> int:
        """Bytes sent (or received, ``key="bytes_received"``) over the records matching the filters."""
        if key not in ("bytes_sent", "bytes_received"):
            raise ValueError(f"key must be 'bytes_sent' or 'bytes_received', got {key!r}")
        return sum(
            getattr(record, key)
            for record in self.records
            if (scheme is None or record.scheme == scheme) and (phase is None or record.phase == phase)
        )

    def clear(self) -> None:
        self.records.clear()


def _row_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one index of dimension 0 (what the split sizes count)."""
    return math.prod(tensor.shape[1:]) * tensor.element_size()


def all_to_all(
    tensor: torch.Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group,
    rank: int,
    log: CommunicationLog | None = None,
    label: tuple[str, str] | None = None,
) -> torch.Tensor:
    """``dist.all_to_all_single`` along dimension 0 without autograd, counted in ``log`` (label = scheme,
    what)."""
    out = tensor.new_empty((sum(recv_splits), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), recv_splits, send_splits, group=group)
    if log is not None and label is not None:
        row = _row_bytes(tensor)
        sent = (sum(send_splits) - send_splits[rank]) * row
        log.add(label[0], "forward", label[1], sent, (sum(recv_splits) - recv_splits[rank]) * row)
    return out


class AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` along dimension 0 with its backward (the same exchange reversed: each
    received row's gradient goes back to the rank that sent the row), counted in a log."""

    @staticmethod
    def forward(ctx, tensor, send_splits, recv_splits, group, rank, log, label):
        ctx.splits = (list(send_splits), list(recv_splits))
        ctx.group, ctx.rank, ctx.log, ctx.label = group, rank, log, label
        return all_to_all(tensor, send_splits, recv_splits, group, rank, log, label)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        grad_in = all_to_all(grad, recv_splits, send_splits, ctx.group, ctx.rank)
        if ctx.log is not None:
            row = _row_bytes(grad)
            sent = (sum(recv_splits) - recv_splits[ctx.rank]) * row
            received = (sum(send_splits) - send_splits[ctx.rank]) * row
            ctx.log.add(ctx.label[0], "backward", ctx.label[1] + " grad", sent, received)
        return grad_in, None, None, None, None, None, None


class AllGather(torch.autograd.Function):
    """``dist.all_gather`` stacked into ``[W, *shape]``, with its backward: each rank gets the sum over
    ranks of the gradients of its own slice (an all-to-all of the gradient slices, then a sum, which every
    backend supports), counted in a log."""

    @staticmethod
    def forward(ctx, tensor, group, rank, world_size, log, label):
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor, group=group)
        ctx.group, ctx.rank, ctx.world_size, ctx.log, ctx.label = group, rank, world_size, log, label
        if log is not None:
            moved = (world_size - 1) * tensor.numel() * tensor.element_size()
            log.add(label[0], "forward", label[1], moved, moved)
        return torch.stack(parts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        ones = [1] * ctx.world_size
        received = all_to_all(grad, ones, ones, ctx.group, ctx.rank)
        if ctx.log is not None:
            moved = (ctx.world_size - 1) * _row_bytes(grad)
            ctx.log.add(ctx.label[0], "backward", ctx.label[1] + " grad", moved, moved)
        return received.sum(dim=0), None, None, None, None, None


def _element_size(dtype) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def estimate_communication(
    scheme: str,
    *,
    batch: int,
    seqlen_local: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    block_size: int,
    topk: int,
    world_size: int,
    rank: int,
    causal: bool,
    dtype: torch.dtype,
) -> dict[str, int]:
    """The analytic bytes one call moves into ``rank`` (received), forward and backward.

    ``"allgather"``: exact. Forward: K and V of the ``W-1`` other slices; backward: the gradients of this
    rank's K and V slice from the ``W-1`` others.

    ``"selective"``: an upper bound, since the fetch depends on the routing. Forward: the block sums of
    the other slices (float32, float64 for float64 keys), one int64 count per other rank, and per fetched
    block one int64 block id sent out plus its K and V rows coming in; the blocks fetched are at most every
    remote block the local queries can select (causal: those of the ``rank`` earlier slices;
    non-causal: all ``W-1`` other slices), and at most ``topk`` (causal ``topk-1``) per query head.
    Backward: the gradients this rank's blocks receive, bounded the same way by what the other ranks can
    fetch from it (non-causal: every other rank fetches at most every block; causal: the ``W-1-rank``
    later ranks).
    """
    check_choice("scheme", scheme, SCHEMES)
    for name, value in (
        ("batch", batch),
        ("seqlen_local", seqlen_local),
        ("heads_q", heads_q),
        ("heads_kv", heads_kv),
        ("head_dim", head_dim),
        ("block_size", block_size),
        ("topk", topk),
        ("world_size", world_size),
    ):
        check_positive_int(name, value)
    check_int("rank", rank, minimum=0, maximum=world_size - 1)
    check_bool("causal", causal)
    if seqlen_local % block_size != 0:
        raise ValueError(f"seqlen_local ({seqlen_local}) must be a multiple of block_size ({block_size})")
    element = _element_size(dtype)
    sums_element = 8 if dtype == torch.float64 else 4
    blocks_local = seqlen_local // block_size
    kv_block = 2 * block_size * heads_kv * head_dim * element
    others = world_size - 1
    if scheme == "allgather":
        slice_bytes = batch * blocks_local * kv_block
        return {"forward": others * slice_bytes, "backward": others * slice_bytes}
    per_query = topk - 1 if causal else topk
    cap = seqlen_local * heads_q * max(per_query, 0)  # selections of one sequence's local queries
    fetch_ranks = rank if causal else others
    fetched = batch * min(fetch_ranks * blocks_local, cap)
    fetching_me = (others - rank) if causal else others  # ranks that may fetch from this one
    sent_back = batch * min(blocks_local, cap) * fetching_me
    forward = (
        others * batch * blocks_local * heads_kv * head_dim * sums_element  # block sums gathered
        + others * 8  # the counts
        + fetching_me * batch * blocks_local * 8  # block ids requested from this rank (bounded)
        + fetched * kv_block
    )
    return {"forward": forward, "backward": sent_back * kv_block}


def estimate_halo_communication(
    *, batch: int, width: int, heads_kv: int, head_dim: int, world_size: int, rank: int, dtype: torch.dtype
) -> dict[str, int]:
    """The bytes one sliding-window layer's halo exchange moves into ``rank`` (exact): forward, the last
    ``width`` keys and values of the previous rank (none on rank 0); backward, their gradients from the
    next rank (none on the last)."""
    check_int("width", width, minimum=0)
    for name, value in (("batch", batch), ("heads_kv", heads_kv), ("head_dim", head_dim)):
        check_positive_int(name, value)
    check_positive_int("world_size", world_size)
    check_int("rank", rank, minimum=0, maximum=world_size - 1)
    halo = 2 * batch * width * heads_kv * head_dim * _element_size(dtype)
    return {"forward": halo if rank > 0 else 0, "backward": halo if rank < world_size - 1 else 0}
