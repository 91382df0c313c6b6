"""Timing on a CUDA device: the card's name, CUDA-event latency, peak memory above the inputs."""

from __future__ import annotations

import re
import statistics

import torch


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _file_stem(card: str) -> str:
    """The card's name as a file name: runs of other characters than letters and digits become ``_``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_")


def time_cuda_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over repeats, timed with CUDA events after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_memory_gib(fn) -> float:
    """Peak memory allocated by fn() above what was allocated before it (the inputs)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**30
