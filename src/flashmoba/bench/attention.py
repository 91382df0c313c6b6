"""One attention implementation timed on one configuration: a row of ``benchmarks/results/<card>.json``.

Implementations (field ``impl``):

- ``flashmoba``: ``moba_attn`` on the Triton backend; its forward includes routing;
- ``sdpa_flash``: PyTorch SDPA with the flash backend (FlashAttention-2 code), dense causal;
- ``sdpa_cudnn``: PyTorch SDPA with the cuDNN backend, dense causal;
- ``flex``: FlexAttention with a MoBA ``BlockMask`` from flashmoba's own router indices; mask
  construction is not timed.

Each is warmed up first (autotuning and compilation excluded), then timed with CUDA events as the median
over repeats. Peak memory is measured above the inputs during forward + backward.
"""

from __future__ import annotations

import torch

from flashmoba.api import moba_attn, moba_select
from flashmoba.bench.baselines import flex_moba_attention, sdpa_attention
from flashmoba.bench.timing import card_name, peak_memory_gib, time_cuda_ms

IMPLEMENTATIONS = ("flashmoba", "sdpa_flash", "sdpa_cudnn", "flex")
DEFAULT_SEQLENS = (8192, 16384, 32768, 65536, 131072, 262144, 524288)
# The implementations that route: their rows carry block_size and topk.
_SPARSE = ("flashmoba", "flex")


def measure(impl: str, config: dict, repeats: int) -> dict:
    """Time one implementation on one configuration; returns a results row."""
    batch, seqlen, heads, head_dim = config["batch"], config["seqlen"], config["heads"], config["head_dim"]
    block_size, topk, causal = config["block_size"], config["topk"], config["causal"]
    dtype = getattr(torch, config["dtype"])
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=generator)

    q = randn(batch, seqlen, heads, head_dim).requires_grad_()
    k = randn(batch, seqlen, heads, head_dim).requires_grad_()
    v = randn(batch, seqlen, heads, head_dim).requires_grad_()
    grad_out = randn(batch, seqlen, heads, head_dim)
    row = dict(
        card=card_name(),
        impl=impl,
        seqlen=seqlen,
        batch=batch,
        heads=heads,
        head_dim=head_dim,
        block_size=block_size if impl in _SPARSE else None,
        topk=topk if impl in _SPARSE else None,
        causal=causal,
        route_ms=None,
        fwd_ms=None,
        fwd_bwd_ms=None,
        peak_mem_gib=None,
    )
    if impl == "flashmoba":

        def attention(q_, k_, v_):
            return moba_attn(q_, k_, v_, block_size, topk, causal=causal, backend="triton")

        with torch.no_grad():
            row["route_ms"] = time_cuda_ms(
                lambda: moba_select(q, k, block_size, topk, causal=causal, backend="triton"), repeats
            )
    elif impl == "flex":
        attention = flex_moba_attention(block_size, topk, causal)
    else:
        attention = sdpa_attention(impl)

    with torch.no_grad():
        row["fwd_ms"] = time_cuda_ms(lambda: attention(q, k, v), repeats)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        attention(q, k, v).backward(grad_out)

    row["fwd_bwd_ms"] = time_cuda_ms(forward_backward, repeats)
    row["peak_mem_gib"] = peak_memory_gib(forward_backward)
    return row


def router_tflops(row: dict) -> float | None:
    """Router scoring rate: 2*d FLOPs per (query, candidate block), causal half of the blocks."""
    if row.get("route_ms") is None:
        return None
    num_blocks = row["seqlen"] / row["block_size"]
    candidates = num_blocks / 2 if row["causal"] else num_blocks
    flops = 2 * row["head_dim"] * candidates * row["seqlen"] * row["heads"] * row["batch"]
    return flops / (row["route_ms"] * 1e-3) / 1e12
