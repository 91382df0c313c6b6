"""The one autocast policy: auto is bf16 on CUDA and float32 on CPU; float32 disables autocast even
inside an outer autocast region."""

import pytest
import torch

from flashmoba.training.runtime import (
    autocast,
    blocks_compile_mode,
    resolve_device,
    resolved_precision,
    uses_cuda_graphs,
)


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


def test_cuda_graphs_give_way_where_they_would_not_hold_still():
    assert (
        blocks_compile_mode("reduce-overhead", activation_checkpointing=False, world=1) == "reduce-overhead"
    )
    assert blocks_compile_mode("reduce-overhead", activation_checkpointing=True, world=1) == "default"
    assert blocks_compile_mode("reduce-overhead", activation_checkpointing=False, world=2) == "default"
    assert blocks_compile_mode("max-autotune-no-cudagraphs", activation_checkpointing=True, world=2) == (
        "max-autotune-no-cudagraphs"
    )
    assert uses_cuda_graphs("reduce-overhead") and not uses_cuda_graphs("default")


def test_cpu_runs_eager_with_the_multi_tensor_adamw():
    """compile_blocks and the fused optimizer are for CUDA: a CPU run keeps its eager blocks and numbers."""
    from flashmoba.training.config import TrainConfig
    from flashmoba.training.loop import build_model, compile_mode, host_batch_for

    config = TrainConfig(preset="tiny")
    cpu = torch.device("cpu")
    model, _, optimizer = build_model(config, cpu)
    assert compile_mode(config, cpu) is None and not optimizer.defaults["fused"]
    assert all(
        not hasattr(block, "_compiled_call_impl") or block._compiled_call_impl is None
        for block in model.blocks
    )
    batch = object()
    assert host_batch_for(batch, config, cpu) is batch
