"""Time the pieces of the Triton path on a GPU: python benchmarks/profile_attention.py [N ...]

Prints per configuration: router, index build, forward (index + partial + merge), backward, and SDPA-flash
for comparison, all medians of CUDA-event timings in ms, plus peak memory above the inputs in GiB.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from flashmoba.bench.timing import peak_memory_gib as peak_gib
from flashmoba.bench.timing import time_cuda_ms
from flashmoba.ops import autograd as triton_autograd
from flashmoba.ops.backward import backward_tiles
from flashmoba.ops.config import KernelConfig
from flashmoba.ops.forward import forward_tiles
from flashmoba.ops.index import build_block_index, num_block_slots
from flashmoba.ops.partials import chunking


def median_ms(fn, repeats=5):
    return time_cuda_ms(fn, repeats)


def profile(seqlen, block_size, topk, batch=2, heads=16, head_dim=128, dtype=torch.bfloat16):
    q, k, v, grad_out = (
        torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=dtype) for _ in range(4)
    )
    packed = [t.view(batch * seqlen, heads, head_dim) for t in (q, k, v)]
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * seqlen
    scale = head_dim**-0.5

    def route():
        return triton_autograd.moba_select_varlen_triton(
            packed[0], packed[1], cu, cu, seqlen, seqlen, block_size, topk, True
        )

    selected = route()
    split = chunking(batch * seqlen, heads, topk, head_dim, torch.bfloat16)

    def index():
        block_slots = num_block_slots(batch * seqlen, batch, block_size)
        return build_block_index(
            selected, cu, cu, block_size, block_slots, split.row_chunks, split.rows_per_chunk
        )

    def forward():
        return triton_autograd.sparse_attention_varlen(*packed, selected, cu, cu, block_size, True, scale)

    leaves = [t.detach().clone().requires_grad_() for t in packed]
    grad_packed = grad_out.view(batch * seqlen, heads, head_dim)

    def forward_backward(deterministic=False):
        out, _ = triton_autograd.sparse_attention_varlen(
            *leaves, route(), cu, cu, block_size, True, scale, deterministic
        )
        out.backward(grad_packed)

    dense = [t.transpose(1, 2).detach().clone().requires_grad_() for t in (q, k, v)]
    dense_grad = grad_out.transpose(1, 2)

    def sdpa(backward):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(*dense, is_causal=True)
            if backward:
                out.backward(dense_grad)

    row = dict(
        N=seqlen,
        B=block_size,
        k=topk,
        chunks=f"{split.heads_per_chunk}h/{split.row_chunks}r",
        route=median_ms(route),
        index=median_ms(index),
        attn_fwd=median_ms(forward),
        fwd_bwd=median_ms(forward_backward),
        fwd_bwd_det=median_ms(lambda: forward_backward(True), 3),
        peak=peak_gib(forward_backward),
    )
    if seqlen <= 65536:
        row.update(
            sdpa_fwd=median_ms(lambda: sdpa(False), 3),
            sdpa_fwd_bwd=median_ms(lambda: sdpa(True), 3),
            sdpa_peak=peak_gib(lambda: sdpa(True)),
        )
    print(
        "  ".join(
            f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
            for key, value in row.items()
        ),
        flush=True,
    )


def kernel_breakdown(
    seqlen=65536, block_size=128, topk=8, deterministic=False, batch=2, heads=16, head_dim=128
):
    """Per-kernel CUDA time of one routed forward + backward (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    packed = [
        torch.randn(batch * seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    ]
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * seqlen

    def step():
        selected = triton_autograd.moba_select_varlen_triton(
            packed[0], packed[1], cu, cu, seqlen, seqlen, block_size, topk, True
        )
        out, _ = triton_autograd.sparse_attention_varlen(
            *packed, selected, cu, cu, block_size, True, 0.088, deterministic
        )
        out.backward(torch.ones_like(out))

    print(f"kernel breakdown N={seqlen} B={block_size} k={topk} deterministic={deterministic}", flush=True)
    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60),
        flush=True,
    )


FORWARD_SWEEP = ((64, 4, 1), (64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3), (64, 8, 3))
BACKWARD_SWEEP = {  # (BLOCK_M, warps, stages) with BLOCK_N = min(block size, 128)
    128: ((32, 8, 2), (32, 8, 3), (16, 8, 2), (32, 4, 2), (64, 8, 2), (64, 8, 3)),
    64: ((64, 8, 3), (32, 8, 3), (64, 4, 3), (32, 4, 3), (128, 8, 3), (64, 8, 2)),
    32: ((64, 8, 3), (64, 4, 3), (128, 8, 3), (32, 4, 3), (64, 4, 2), (128, 4, 3)),
}


def sweep_tiles(seqlen=65536, block_size=128, topk=8, batch=2, heads=16, head_dim=128):
    """Forward and dK/dV tile configurations at one shape, and the dQ strategies (ms, median)."""
    packed = [
        torch.randn(batch * seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    ]
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * seqlen
    selected = triton_autograd.moba_select_varlen_triton(
        packed[0], packed[1], cu, cu, seqlen, seqlen, block_size, topk, True
    )
    leaves = [t.clone().requires_grad_() for t in packed]
    grad_out = torch.randn_like(packed[0])
    block_n = min(128, block_size)
    tag = f"N={seqlen} B={block_size} k={topk}"

    def forward(config=None):
        return triton_autograd.sparse_attention_varlen(
            *leaves, selected, cu, cu, block_size, True, 0.088, config=config
        )

    def forward_backward(config=None):
        forward(config)[0].backward(grad_out)

    def tiles(kernel, block_m, warps, stages):
        settings = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        return KernelConfig.for_kernel(kernel, settings)

    def attempt(label, fn, minus=0.0):
        try:
            print(f"{tag} {label}: {median_ms(fn, 3) - minus:.2f} ms", flush=True)
        except Exception as error:  # noqa: BLE001  (out of shared memory, say)
            print(f"{tag} {label}: {type(error).__name__}", flush=True)

    print(
        f"{tag} default forward tiles {forward_tiles(head_dim, block_size)}, "
        f"backward {backward_tiles(head_dim, block_size)}",
        flush=True,
    )
    for block_m, warps, stages in FORWARD_SWEEP:
        config = tiles("forward", block_m, warps, stages)
        attempt(f"fwd M={block_m} warps={warps} stages={stages}", functools.partial(forward, config))
    fwd_ms = median_ms(forward, 3)
    for stored in (True, False):
        config = KernelConfig(dq_by_stored_partials=stored)
        label = f"bwd default tiles, dQ {'stored partials' if stored else 'atomics'}"
        attempt(label, functools.partial(forward_backward, config), fwd_ms)
    for block_m, warps, stages in BACKWARD_SWEEP[block_n]:
        config = tiles("backward", block_m, warps, stages)
        label = f"bwd M={block_m} N={block_n} warps={warps} stages={stages}"
        attempt(label, functools.partial(forward_backward, config), fwd_ms)


def partial_dtypes(seqlen=65536, batch=2, heads=16, head_dim=128):
    """Forward time with float32 partials against bf16 partials, and how far the outputs move."""
    for block_size, topk in ((128, 8), (32, 32)):
        packed = [
            torch.randn(batch * seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(3)
        ]
        cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * seqlen
        selected = triton_autograd.moba_select_varlen_triton(
            packed[0], packed[1], cu, cu, seqlen, seqlen, block_size, topk, True
        )

        def forward(config, packed=packed, selected=selected, block_size=block_size, cu=cu):
            return triton_autograd.sparse_attention_varlen(
                *packed, selected, cu, cu, block_size, True, 0.088, config=config
            )

        outputs = {}
        for in_input_dtype in (False, True):
            config = KernelConfig(partials_in_input_dtype=in_input_dtype)
            outputs[in_input_dtype] = forward(config)[0].float()
            print(
                f"N={seqlen} B={block_size} k={topk} bf16 partials={in_input_dtype}: fwd "
                f"{median_ms(functools.partial(forward, config), 5):.2f} ms",
                flush=True,
            )
        difference = (outputs[True] - outputs[False]).abs()
        print(
            f"  output change from bf16 partials: max {difference.max():.2e}, mean {difference.mean():.2e} "
            f"(output magnitude mean {outputs[False].abs().mean():.2e})",
            flush=True,
        )


def memory_phases(seqlen=65536, batch=2, heads=16, head_dim=128):
    """Peak memory above the inputs of routing, of the forward, and of the backward alone (GiB)."""
    for block_size, topk in ((128, 8), (32, 32)):
        _memory_phases_of(seqlen, block_size, topk, batch, heads, head_dim)


def _memory_phases_of(seqlen, block_size, topk, batch, heads, head_dim):
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * seqlen
    packed = [
        torch.randn(batch * seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    ]
    grad_out = torch.randn_like(packed[0])

    def route():
        return triton_autograd.moba_select_varlen_triton(
            packed[0], packed[1], cu, cu, seqlen, seqlen, block_size, topk, True
        )

    selected = route()
    route_gib = peak_gib(route)
    held = {}

    def forward():
        held["out"] = triton_autograd.sparse_attention_varlen(
            *packed, selected, cu, cu, block_size, True, 0.088
        )[0]

    forward_gib = peak_gib(forward)
    backward_gib = peak_gib(lambda: held["out"].backward(grad_out))
    print(
        f"memory N={seqlen} B={block_size} k={topk}: route {route_gib:.3f}, forward {forward_gib:.3f}, "
        f"backward {backward_gib:.3f} GiB (output alone {grad_out.numel() * 2 / 2**30:.3f})",
        flush=True,
    )


def partial_budgets(seqlen=65536, batch=2, heads=16, head_dim=128):
    """Forward time against the partial-output scratch budget (number of row chunks)."""
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * seqlen
    output_bytes = batch * seqlen * heads * head_dim * 2
    for block_size, topk in ((128, 8), (32, 32)):
        packed = [
            torch.randn(batch * seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(3)
        ]
        selected = triton_autograd.moba_select_varlen_triton(
            packed[0], packed[1], cu, cu, seqlen, seqlen, block_size, topk, True
        )
        for factor in (1, 2, 4, 8, 64):
            config = KernelConfig(partial_buffer_bytes=factor * output_bytes)
            chunks = chunking(batch * seqlen, heads, topk, head_dim, torch.bfloat16, config=config)
            forward = functools.partial(
                triton_autograd.sparse_attention_varlen,
                *packed,
                selected,
                cu,
                cu,
                block_size,
                True,
                0.088,
                config=config,
            )
            fwd = median_ms(forward, 5)
            print(
                f"budget N={seqlen} B={block_size} k={topk}: {factor}x output, chunks {chunks}: "
                f"fwd {fwd:.2f} ms",
                flush=True,
            )


if __name__ == "__main__" and sys.argv[1:2] == ["partials"]:
    partial_dtypes()
elif __name__ == "__main__" and sys.argv[1:2] == ["breakdown"]:
    # breakdown [N B k [det]]
    arguments = [int(x) for x in sys.argv[2:5]] or [65536, 128, 8]
    kernel_breakdown(*arguments, deterministic=sys.argv[5:6] == ["det"])
elif __name__ == "__main__" and sys.argv[1:2] == ["memory"]:
    memory_phases()
elif __name__ == "__main__" and sys.argv[1:2] == ["budgets"]:
    partial_budgets()
elif __name__ == "__main__" and sys.argv[1:2] == ["sweep"]:
    sweep_tiles(*[int(x) for x in sys.argv[2:5]])
elif __name__ == "__main__":
    print(torch.cuda.get_device_name(), flush=True)
    seqlens = [int(x) for x in sys.argv[1:]] or [8192, 65536]
    for n in seqlens:
        for block_size, topk in ((128, 8), (64, 16), (32, 32)):
            profile(n, block_size, topk)
