"""Host time per call of the public functions on inputs so small that the GPU waits for the host: what a
call costs in Python, dispatch and launches, apart from the kernels' own time.

    PYTHONPATH=src python benchmarks/host_overhead.py [--calls 300] [--rounds 5]

Prints one JSON object: for moba_select, the forward and forward+backward, the median over rounds of the
microseconds per call (each round: ``calls`` calls back to back, one synchronisation at the end).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import flashmoba


def microseconds_per_call(function, calls: int, rounds: int) -> float:
    function()  # compile and warm up
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            function()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn_like(q)

    def select():
        return flashmoba.moba_select(q, k, 64, 2, backend="triton")

    def forward():
        with torch.no_grad():
            return flashmoba.moba_attn(q, k, v, 64, 2, backend="triton")

    def forward_backward():
        flashmoba.moba_attn(q, k, v, 64, 2, backend="triton").backward(grad)

    results = {
        name: round(microseconds_per_call(function, args.calls, args.rounds), 1)
        for name, function in (
            ("select", select),
            ("forward", forward),
            ("forward_backward", forward_backward),
        )
    }
    print(json.dumps({"source": flashmoba.__file__, "us_per_call": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
