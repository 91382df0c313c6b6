"""Bytes moved per call by each context-parallel scheme, measured, beside the analytic estimate."""

from __future__ import annotations

import torch

from flashmoba.parallel.attention import group_rank_and_size, moba_attn_context_parallel
from flashmoba.parallel.communication import SCHEMES, CommunicationLog, estimate_communication


def communication_report(
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
    schemes: tuple[str, ...] = SCHEMES,
) -> dict[str, dict[str, int]]:
    """Run one forward and backward of each scheme on this rank's slice and report what it moved.

    Every rank of ``group`` must call it with the same shapes (it runs the collectives of each scheme).
    The backward uses a gradient of ones; q, k and v are detached copies (their own gradients untouched).

    Returns, per scheme: ``forward`` / ``backward`` bytes received by this rank and ``forward_sent`` /
    ``backward_sent`` bytes sent by it (measured, ``flashmoba.parallel.communication``), and
    ``estimate_forward`` / ``estimate_backward``, the analytic bytes received (exact for ``"allgather"``,
    an upper bound for ``"selective"``).
    """
    rank, world = group_rank_and_size(group)
    report = {}
    for scheme in schemes:
        log = CommunicationLog()
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = moba_attn_context_parallel(
            *inputs,
            block_size,
            topk,
            group=group,
            causal=causal,
            softmax_scale=softmax_scale,
            backend=backend,
            scheme=scheme,
            comm_log=log,
        )
        out.backward(torch.ones_like(out))
        estimate = estimate_communication(
            scheme,
            batch=q.shape[0],
            seqlen_local=q.shape[1],
            heads_q=q.shape[2],
            heads_kv=k.shape[2],
            head_dim=q.shape[3],
            block_size=block_size,
            topk=topk,
            world_size=world,
            rank=rank,
            causal=causal,
            dtype=q.dtype,
        )
        report[scheme] = {
            "forward": log.total(phase="forward", key="bytes_received"),
            "backward": log.total(phase="backward", key="bytes_received"),
            "forward_sent": log.total(phase="forward"),
            "backward_sent": log.total(phase="backward"),
            "estimate_forward": estimate["forward"],
            "estimate_backward": estimate["backward"],
        }
    return report
