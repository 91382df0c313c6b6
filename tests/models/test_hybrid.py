"""The hybrid LM: causality, packed documents, the loss weights, one host read of cu_seqlens, the layer
pattern, presets and config errors."""

import pytest
import torch

from flashmoba.models import MODEL_PRESETS, HybridLM, ModelConfig, model_config_from_preset
from flashmoba.nn import MoBAAttention
from tests.helpers import cu_seqlens


def tiny_model(**overrides) -> HybridLM:
    torch.manual_seed(3)
    config = model_config_from_preset(
        "tiny", window_size=8, moba_block_size=4, moba_topk=2, kconv_size=3, backend="reference", **overrides
    )
    return HybridLM(config).double().eval()


@pytest.mark.parametrize("global_attention", ["moba", "dense"])
def test_model_is_causal(global_attention):
    model = tiny_model(global_attention=global_attention)
    ids = torch.randint(0, 257, (2, 40))
    later = ids.clone()
    later[:, 25:] = torch.randint(0, 257, (2, 15))
    logits, _ = model(ids)
    logits_later, _ = model(later)
    torch.testing.assert_close(logits[:, :25], logits_later[:, :25], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(logits[:, 25:], logits_later[:, 25:])


def test_model_packed_documents_do_not_see_each_other():
    model = tiny_model()
    ids = torch.randint(0, 257, (45,))
    offsets = cu_seqlens([12, 18, 15])
    packed_logits, _ = model(ids, cu_seqlens=offsets)
    for start, end in [(0, 12), (12, 30), (30, 45)]:
        alone, _ = model(ids[start:end].unsqueeze(0))
        torch.testing.assert_close(packed_logits[start:end], alone[0], rtol=1e-12, atol=1e-12)
    targets = torch.randint(0, 257, (45,))
    _, loss = model(ids, targets, cu_seqlens=offsets)
    expected = torch.nn.functional.cross_entropy(packed_logits.float(), targets)
    torch.testing.assert_close(loss, expected)
    # Weights scale each target's loss; the sum is divided by the number of scored targets.
    targets[3] = -100
    weights = torch.ones(45)
    weights[[5, 40]] = 4.0
    _, weighted = model(ids, targets, cu_seqlens=offsets, loss_weights=weights)
    per_token = torch.nn.functional.cross_entropy(packed_logits.float(), targets, reduction="none")
    torch.testing.assert_close(weighted, (per_token * weights).sum() / 44)
    _, ones = model(ids, targets, cu_seqlens=offsets, loss_weights=torch.ones(45))
    torch.testing.assert_close(ones, torch.nn.functional.cross_entropy(packed_logits.float(), targets))
    with pytest.raises(ValueError, match="loss_weights"):
        model(ids, targets, cu_seqlens=offsets, loss_weights=torch.ones(44))


@pytest.mark.triton
def test_packed_forward_reads_cu_seqlens_once_for_all_layers(count_host_reads):
    # The Triton backend on CPU (interpreter): MoBA layers trust the model's one check of the packing.
    config = model_config_from_preset(
        "tiny", window_size=8, moba_block_size=4, moba_topk=2, kconv_size=3, backend="triton"
    )
    model = HybridLM(config).eval()
    ids = torch.randint(0, 257, (45,))
    offsets = cu_seqlens([12, 18, 15])
    reads = count_host_reads(offsets)
    model(ids, cu_seqlens=offsets)
    assert len(reads) == 1
    with pytest.raises(ValueError, match="max_seqlen must be >= the longest"):
        model(ids, cu_seqlens=offsets, max_seqlen=10)
    with pytest.raises(ValueError, match="total = 45"):
        model.blocks[1].attn(torch.zeros(44, model.config.hidden_size), cu_seqlens=offsets)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_set_kernel_config_reaches_every_moba_layer():
    # The Triton backend on CPU (interpreter). rows_per_item=1: one row tile per work item, so the hot
    # columns split; the loss and gradients are those of the default launch settings up to rounding.
    from flashmoba.ops import KernelConfig

    config = model_config_from_preset("tiny", window_size=8, moba_block_size=4, moba_topk=2, backend="triton")
    torch.manual_seed(3)
    model = HybridLM(config)
    ids = torch.randint(0, 257, (45,))
    offsets = cu_seqlens([30, 15])

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(ids, ids, cu_seqlens=offsets)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    default_loss, default_grads = loss_and_grads()
    kernel_config = KernelConfig(rows_per_item=1)
    model.set_kernel_config(kernel_config)
    assert [attn.kernel_config for _, attn in model.moba_layers()] == [kernel_config] * 2
    assert all(block.attn.kernel_config is None for block in model.blocks if not block.is_global)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, default_loss, rtol=1e-5, atol=1e-6)
    for grad, default_grad in zip(grads, default_grads):
        torch.testing.assert_close(grad, default_grad, rtol=1e-4, atol=1e-6)
    # A launch setting: neither the model's config nor its checkpoints hold it.
    assert "kernel_config" not in model.config.to_dict()
    assert not any("kernel_config" in name for name in model.state_dict())
    model.set_kernel_config(None)
    assert all(attn.kernel_config is None for _, attn in model.moba_layers())
    with pytest.raises(TypeError, match="kernel_config"):
        model.set_kernel_config(1024)


def test_layer_pattern_and_gradients_reach_every_parameter():
    model = tiny_model().train()
    kinds = [block.attn.attention for block in model.blocks]
    assert kinds == ["sliding", "moba", "sliding", "moba"]
    assert [block.attn.rope for block in model.blocks] == [True, False, True, False]
    assert all((block.attn.key_conv is not None) == block.is_global for block in model.blocks)
    ids = torch.randint(0, 257, (2, 24))
    _, loss = model(ids, ids)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_paper_presets_have_the_paper_shapes():
    for name, hidden, heads, mlp in [("340m", 1024, 16, 2816), ("1b", 2048, 32, 8192)]:
        config = model_config_from_preset(name)
        assert (
            config.num_layers,
            config.hidden_size,
            config.num_heads,
            config.head_dim,
            config.mlp_hidden_size,
            config.window_size,
        ) == (24, hidden, heads, 64, mlp, 256)
    with torch.device("meta"):
        model = HybridLM(model_config_from_preset("340m", vocab_size=32000))
    assert 300e6 < model.num_parameters(exclude_embeddings=True) < 320e6
    assert set(MODEL_PRESETS) >= {"tiny", "small", "340m", "1b"}


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="global_attention"):
        ModelConfig(global_attention="linear")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=16, num_kv_heads=5)
    with pytest.raises(ValueError, match="attention"):
        MoBAAttention(32, 4, attention="sparse")
    with pytest.raises(ValueError, match="preset"):
        model_config_from_preset("7b")
