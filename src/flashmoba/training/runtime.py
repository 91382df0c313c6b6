"""Where a run computes: the device, and the one autocast policy of training and evaluation.

Precision ``auto`` means bf16 autocast on CUDA and float32 on CPU; ``bf16`` and ``fp32`` force one.
Float32 disables autocast explicitly, so a forward pass inside an outer autocast region stays float32.
"""

from __future__ import annotations

import re

import torch

PRECISIONS = ("auto", "bf16", "fp32")
# torch.compile modes the blocks may take; "reduce-overhead" adds CUDA graphs.
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune-no-cudagraphs")
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(setting: str, name) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``setting`` (the field or flag) is named in the error,
    which torch's own (``Expected one of cpu, cuda, ...``) does not do."""
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise ValueError(f"{setting} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return name


def resolve_device(name: str, local_rank: int, setting: str = "device") -> torch.device:
    """``auto``: CUDA when present, else CPU. A CUDA device without an index takes ``local_rank``'s GPU
    (one GPU per torchrun process) and becomes the current device. ``setting`` names the field or flag
    in errors."""
    check_device_name(setting, name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{setting} {name!r} requested but CUDA is not available")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def resolved_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``: what ``precision`` (one of PRECISIONS) means on ``device``."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """The context a forward pass runs in: bf16 autocast, or autocast disabled (float32)."""
    if resolved_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def autocast_context(config, device: torch.device):
    """``autocast`` at a ``TrainConfig``'s precision."""
    return autocast(device, config.precision)


def blocks_compile_mode(compile_mode: str, activation_checkpointing: bool, world: int) -> str:
    """The mode the blocks are compiled in: ``compile_mode``, except that CUDA graphs ("reduce-overhead")
    give way to "default" where they would not hold still: blocks recomputed in backward (activation
    checkpointing replays a forward inside backward), and more than one process (DDP's and FSDP2's hooks
    and resharded parameters live outside the graphs). At long lengths the host is not the limit anyway."""
    if compile_mode == "reduce-overhead" and (activation_checkpointing or world > 1):
        return "default"
    return compile_mode


def head_compile_mode(blocks_mode: str) -> str:
    """The mode the head and loss (``HybridLM.compile_head``) are compiled in beside blocks compiled in
    ``blocks_mode``: the same, without CUDA graphs ("reduce-overhead" gives "default"). The head and loss
    are a few large kernels (the head's matrix product and its two gradient products, the fused
    log-softmax and its gradient): at long rows their launches cost nothing next to their run time, so
    graphs would save nothing and only add what they cost (a recording per shape, outputs that the next
    replay overwrites). "max-autotune-no-cudagraphs" stays: the head's product is the model's largest."""
    return "default" if uses_cuda_graphs(blocks_mode) else blocks_mode


def uses_cuda_graphs(compile_mode: str) -> bool:
    """Whether blocks compiled in ``compile_mode`` replay CUDA graphs (and so want static shapes)."""
    return compile_mode == "reduce-overhead"


def begin_graph_iteration(compile_mode: str | None) -> None:
    """Start a new iteration of the blocks' CUDA graphs (a no-op without them, ``compile_mode`` None or
    not graphed): the previous step's outputs are dead once its backward ran (PyTorch's advice for
    reduce-overhead training loops); without it cudagraph trees leave their fast path."""
    if compile_mode and uses_cuda_graphs(compile_mode):
        torch.compiler.cudagraph_mark_step_begin()
