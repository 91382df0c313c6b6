import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. It must be switched on
# before any test module imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
