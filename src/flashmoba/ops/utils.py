"""Small helpers and constants shared by the kernels' launchers (one definition each)."""

from __future__ import annotations

import os

import torch

LOG2_E = 1.4426950408889634  # kernels use exp2: scores are scaled by log2(e) once
LN_2 = 0.6931471805599453
MAX_HEAD_DIM = 256  # one head's row of a tile must fit on chip (router and attention alike)


def interpreting() -> bool:
    """The kernels run in Triton's interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(value: int) -> int:
    """The smallest power of two >= value (1 for value <= 1)."""
    return 1 << max(0, value - 1).bit_length()


def head_dim_tile(head_dim: int) -> int:
    """The head dimension padded for ``tl.dot``: a power of two, at least 16 (its minimum per dimension)."""
    return max(16, next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 inputs are for exactness tests, so no TF32 rounding."""
    return "ieee" if dtype == torch.float32 else "tf32"


def maybe_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself where its last dimension is dense (the kernels take any other strides), else a
    contiguous copy."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()
