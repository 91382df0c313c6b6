"""Context parallelism: MoBA over sequences split across the ranks of a process group.

- ``moba_attn_context_parallel(q, k, v, block_size, topk, *, group=None, scheme="selective", ...)``: this
  rank's slice of ``flashmoba.moba_attn`` on the whole sequences, with autograd
  (see ``flashmoba.parallel.attention``).
- ``CommunicationLog``, ``estimate_communication``, ``estimate_halo_communication``: the bytes each
  call moves, measured from the tensors handed to the collectives, and the analytic estimate
  (``flashmoba.parallel.communication``); ``communication_report`` runs each scheme once and puts the
  two side by side.
- ``ContextParallel``: the hook the model's layers take (``context_parallel=``): MoBA across the group,
  the sliding-window halo, the RoPE offset of the slice (``flashmoba.parallel.context``).
"""

from flashmoba.parallel.attention import moba_attn_context_parallel
from flashmoba.parallel.communication import (
    CommRecord,
    CommunicationLog,
    estimate_communication,
    estimate_halo_communication,
)
from flashmoba.parallel.context import ContextParallel
from flashmoba.parallel.report import communication_report

__all__ = [
    "CommRecord",
    "CommunicationLog",
    "ContextParallel",
    "communication_report",
    "estimate_communication",
    "estimate_halo_communication",
    "moba_attn_context_parallel",
]
