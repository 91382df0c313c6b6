"""Helpers shared by the test modules: packed-sequence offsets and one tolerance per comparison kind."""

from __future__ import annotations

import torch

# Tolerances by what is compared against a float64 answer. Kernels in float32 with IEEE dots (the
# interpreter's and the exactness suites' setting) stay within KERNEL_FLOAT32; the reference in float64
# against the brute-force oracle within FLOAT64.
TOLERANCES = {
    "float64": dict(atol=1e-10, rtol=1e-10),
    "kernel_float32": dict(atol=3e-5, rtol=1e-4),
}


def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    """int32 ``[len(lengths) + 1]`` sequence starts of packed sequences: 0 first, the total last."""
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + int(length))
    return torch.tensor(starts, dtype=torch.int32, device=device)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, kind: str = "kernel_float32", name: str = ""
) -> None:
    """``torch.testing.assert_close`` in float64 with the tolerance of ``kind`` (see TOLERANCES)."""
    if kind not in TOLERANCES:
        raise ValueError(f"kind must be one of {sorted(TOLERANCES)}, got {kind!r}")
    prefix = f"{name}: " if name else ""
    torch.testing.assert_close(
        actual.double(), expected.double(), **TOLERANCES[kind], msg=lambda message: prefix + message
    )
