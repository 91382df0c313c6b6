import importlib.util
import math
import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. It must be switched on
# before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Triton is a Linux-only dependency: where it is not installed, the kernel tests are not collected.
collect_ignore_glob = [] if importlib.util.find_spec("triton") else ["ops/*", "gpu/*"]


def triton_runnable() -> bool:
    """The Triton kernels can run here: on CUDA, or on CPU tensors in Triton's interpreter."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs the Triton kernels (needs CUDA or TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    if triton_runnable():
        return
    skip = pytest.mark.skip(reason="needs CUDA or TRITON_INTERPRET=1")
    for item in items:
        if "triton" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def count_host_reads(monkeypatch):
    """``count_host_reads(tensor)`` -> a list that grows by one at each ``tensor.tolist()`` (the way the
    library reads cu_seqlens back to the host)."""

    def track(tensor: torch.Tensor) -> list:
        reads, tolist = [], torch.Tensor.tolist

        def counting(self):
            if self is tensor:
                reads.append(1)
            return tolist(self)

        monkeypatch.setattr(torch.Tensor, "tolist", counting)
        return reads

    return track


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like / Tensor.new_empty give poisoned tensors during a test: NaN for floats, the
    dtype's minimum for integers, so that scratch or output a kernel forgets to write shows in results."""
    original_empty, original_empty_like, original_new_empty = (
        torch.empty,
        torch.empty_like,
        torch.Tensor.new_empty,
    )

    def poison(tensor):
        if tensor.requires_grad or tensor.dtype == torch.bool:
            return tensor
        if tensor.is_floating_point():
            return tensor.fill_(math.nan)
        return tensor.fill_(torch.iinfo(tensor.dtype).min)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(original_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(original_empty_like(*a, **kw)))
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *a, **kw: poison(original_new_empty(self, *a, **kw))
    )
