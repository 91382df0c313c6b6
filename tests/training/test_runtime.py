"""The one autocast policy: auto is bf16 on CUDA and float32 on CPU; float32 disables autocast even
inside an outer autocast region."""

import pytest
import torch

from flashmoba.training.runtime import autocast, resolve_device, resolved_precision


def test_auto_precision_is_float32_on_cpu():
    cpu = torch.device("cpu")
    assert resolved_precision("auto", cpu) == "fp32"
    assert resolved_precision("bf16", cpu) == "bf16"
    with torch.autocast("cpu", dtype=torch.bfloat16), autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_bf16_precision_autocasts():
    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_resolve_device():
    assert resolve_device("cpu", 3) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto", 0) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda", 0)
