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


# ----------------------------------------------------------------------------------------------------
# Kernels per step under torch.profiler (bench generate --profile, bench decode --profile)
# ----------------------------------------------------------------------------------------------------

PROFILE_NAME_CHARS = 90  # characters of a kernel's name kept
# The keys of a ``profile`` field, and of each of its ``top`` entries.
PROFILE_FIELDS = ("activity", "steps", "kernels_per_step", "device_us_per_step", "top")
PROFILE_TOP_FIELDS = ("name", "calls_per_step", "us_per_step")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _self_device_us(event) -> float:
    """An event's own device time in µs: ``self_device_time_total`` (PyTorch >= 2.4), else the older
    ``self_cuda_time_total``."""
    if hasattr(event, "self_device_time_total"):
        return event.self_device_time_total
    return event.self_cuda_time_total


def profile_steps(step, device: torch.device, steps: int, top: int) -> dict:
    """Profile ``steps`` calls of ``step()`` (warmed up by the caller) under ``torch.profiler``; per step:
    the device kernels (CUDA: every device activity, kernels, memcpys and memsets, each an entry of
    ``key_averages()``; CUPTI sees them inside CUDA-graph replays too) and their total time, and the ``top``
    entries by time. On the CPU ("cpu_ops") the entries are the operators by self CPU time and
    ``kernels_per_step`` counts operator calls; ``device_us_per_step`` is then their self CPU time.
    Returns a dict of ``PROFILE_FIELDS``, each ``top`` entry of ``PROFILE_TOP_FIELDS``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    _synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        _synchronize(device)
    entries = []  # (name, calls, total µs)
    for event in profiler.key_averages():
        if getattr(event, "is_user_annotation", False):
            continue  # record_function ranges, not work
        if on_cuda and event.device_type != DeviceType.CPU:
            entries.append((event.key, event.count, _self_device_us(event)))
        elif not on_cuda and event.device_type == DeviceType.CPU:
            entries.append((event.key, event.count, event.self_cpu_time_total))
    entries.sort(key=lambda entry: entry[2], reverse=True)
    return dict(
        activity="cuda_kernels" if on_cuda else "cpu_ops",
        steps=steps,
        kernels_per_step=sum(calls for _, calls, _ in entries) / steps,
        device_us_per_step=sum(total for _, _, total in entries) / steps,
        top=[
            dict(name=name[:PROFILE_NAME_CHARS], calls_per_step=calls / steps, us_per_step=total / steps)
            for name, calls, total in entries[:top]
        ],
    )
