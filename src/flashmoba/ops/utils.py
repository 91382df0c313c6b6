"""Small helpers and constants shared by the kernels and their launchers (one definition each)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634  # kernels use exp2: scores are scaled by log2(e) once
LN_2 = 0.6931471805599453
MAX_HEAD_DIM = 256  # one head's row of a tile must fit on chip (router and attention alike)


def interpreting() -> bool:
    """The kernels run in Triton's interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports_pdl(device: torch.device) -> bool:
    """Kernels on ``device`` may be launched with programmatic dependent launch (PDL): a CUDA device of
    compute capability 9.0 or newer (Hopper on), compiled, not interpreted. A PDL launch may start while
    the kernel before it in the stream still runs; the kernel then waits (``gdc_wait``) before touching
    memory, so only the launch latency between the two is overlapped."""
    if interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def next_power_of_2(value: int) -> int:
    """The smallest power of two >= value (1 for value <= 1)."""
    return 1 << max(0, value - 1).bit_length()


def head_dim_tile(head_dim: int) -> int:
    """The head dimension padded for ``tl.dot``: a power of two, at least 16 (its minimum per dimension)."""
    return max(16, next_power_of_2(head_dim))


def dot_in_float32(dtype: torch.dtype) -> bool:
    """Tiles go into ``tl.dot`` as float32: only for bfloat16 in Triton 3.6's interpreter, which multiplies
    the raw bits of bfloat16 tiles (|o| ~ 1e9 came back). Exact there, as a product of two bfloat16 values
    fits a float32. Compiled kernels keep 16-bit tiles for the tensor cores."""
    return dtype == torch.bfloat16 and interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 inputs are for exactness tests, so no TF32 rounding (nor for
    the float32 tiles of ``dot_in_float32``)."""
    return "ieee" if dtype == torch.float32 or dot_in_float32(dtype) else "tf32"


@triton.jit
def tile_dot(a, b, DOT_PRECISION: tl.constexpr, DOT_IN_FLOAT32: tl.constexpr):
    """``tl.dot(a, b)`` with float32 accumulation; float32 tiles where ``dot_in_float32`` says so."""
    if DOT_IN_FLOAT32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


def maybe_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself where its last dimension is dense (the kernels take any other strides), else a
    contiguous copy."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()
