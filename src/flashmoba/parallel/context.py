"""The context-parallel hook a model layer calls: MoBA across the group, the sliding-window halo, and the
position offset of this rank's slice.

A ``ContextParallel`` stands for one context-parallel group over which every row of a padded batch is cut
into contiguous equal slices in rank order (rank ``r`` holds positions ``[r*L, (r+1)*L)``). The layers
(``flashmoba.nn.attention.MoBAAttention``) take it as ``context_parallel=`` and call only its methods,
so ``flashmoba.nn`` does not import this package.
"""

from __future__ import annotations

import torch

from flashmoba._checks import check_choice, check_int
from flashmoba.parallel.attention import group_rank_and_size, moba_attn_context_parallel
from flashmoba.parallel.communication import SCHEMES, AllToAll, CommunicationLog


class ContextParallel:
    """Rows cut contiguously over ``group`` (default: the world); ``scheme`` as in
    ``moba_attn_context_parallel``; ``comm_log`` records every collective of the layers that use it."""

    def __init__(self, group=None, *, scheme: str = "selective", comm_log: CommunicationLog | None = None):
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.scheme = check_choice("scheme", scheme, SCHEMES)
        self.comm_log = comm_log

    def position_offset(self, seqlen_local: int) -> int:
        """The absolute position of this rank's first token."""
        return self.rank * check_int("seqlen_local", seqlen_local, minimum=0)

    def moba(self, q, k, v, block_size: int, topk: int, softmax_scale: float, backend: str) -> torch.Tensor:
        """Causal MoBA of the local rows against the whole rows (``moba_attn_context_parallel``)."""
        return moba_attn_context_parallel(
            q,
            k,
            v,
            block_size,
            topk,
            group=self.group,
            softmax_scale=softmax_scale,
            backend=backend,
            scheme=self.scheme,
            comm_log=self.comm_log,
        )

    def halo(self, k: torch.Tensor, v: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``width`` keys and values of the previous rank's slice, ``[batch, width, Hkv, D]``
        each (``[batch, 0, Hkv, D]`` on rank 0, which has no previous slice), with autograd: their
        gradients go back to the previous rank. One ``all_to_all_single`` (K and V stacked) in each
        direction; only ``width`` rows move. ``width`` must be at most ``seqlen_local``: a window reaching
        past the previous slice would need more than one neighbour."""
        width = check_int("width", width, minimum=0)
        seqlen_local = k.shape[1]
        if width > seqlen_local:
            raise ValueError(
                f"width must be at most seqlen_local ({seqlen_local}) for a halo from one neighbour, "
                f"got {width}"
            )
        world, rank = self.world_size, self.rank
        # [2, batch, L, Hkv, D] -> the last `width` rows first: [width, 2, batch, Hkv, D].
        tail = torch.stack((k, v))[:, :, seqlen_local - width :].permute(2, 0, 1, 3, 4)
        send = [0] * world
        recv = [0] * world
        if rank + 1 < world:
            send[rank + 1] = width
        if rank > 0:
            recv[rank - 1] = width
        outgoing = tail if rank + 1 < world else tail[:0]
        label = ("halo", "kv halo")
        received = AllToAll.apply(outgoing, send, recv, self.group, rank, self.comm_log, label)
        halo = received.permute(1, 2, 0, 3, 4)  # [2, batch, width or 0, Hkv, D]
        return halo[0], halo[1]
