"""``ModelConfig.global_rope``: RoPE in the global layers (the RoPE dense baseline of issue 19), and nothing
else changed."""

import pytest
import torch

from flashmoba.models import HybridLM, ModelConfig, model_config_from_preset
from flashmoba.models.hybrid import is_global_layer


def tiny(global_attention: str, global_rope: bool) -> HybridLM:
    torch.manual_seed(5)
    config = model_config_from_preset(
        "tiny",
        window_size=8,
        moba_block_size=4,
        moba_topk=2,
        backend="reference",
        global_attention=global_attention,
        global_rope=global_rope,
    )
    return HybridLM(config).double().eval()


def test_global_rope_is_off_by_default_and_round_trips():
    assert ModelConfig().global_rope is False
    config = model_config_from_preset("tiny", global_rope=True)
    assert ModelConfig.from_dict(config.to_dict()).global_rope is True


@pytest.mark.parametrize("global_attention", ["dense", "moba"])
def test_global_rope_changes_only_the_global_layers(global_attention):
    nope, rope = tiny(global_attention, False), tiny(global_attention, True)
    # Same parameters (RoPE has none), so the same initialisation.
    assert [n for n, _ in nope.named_parameters()] == [n for n, _ in rope.named_parameters()]
    for a, b in zip(nope.parameters(), rope.parameters()):
        assert torch.equal(a, b)
    for index, (block_nope, block_rope) in enumerate(zip(nope.blocks, rope.blocks)):
        if is_global_layer(index):
            assert block_nope.attn.rope is False and block_rope.attn.rope is True
            assert block_rope.attn.rope_base == rope.config.rope_base
        else:  # the sliding-window layers keep their RoPE either way
            assert block_nope.attn.rope is True and block_rope.attn.rope is True
        assert block_nope.attn.attention == block_rope.attn.attention
    ids = torch.randint(0, 257, (2, 24))
    logits_nope, _ = nope(ids)
    logits_rope, _ = rope(ids)
    assert not torch.allclose(logits_nope, logits_rope)
    # A global layer with RoPE rotates q and k by position; the same x gives other q and k.
    x = torch.randn(1, 24, nope.config.hidden_size, dtype=torch.float64)
    q_nope, k_nope, v_nope = nope.blocks[1].attn.project(x)
    q_rope, k_rope, v_rope = rope.blocks[1].attn.project(x)
    torch.testing.assert_close(v_nope, v_rope)
    torch.testing.assert_close(q_nope[:, 0], q_rope[:, 0])  # position 0: no rotation
    assert not torch.allclose(q_nope[:, 1:], q_rope[:, 1:])
    assert not torch.allclose(k_nope[:, 1:], k_rope[:, 1:])


def test_global_rope_model_stays_causal():
    model = tiny("dense", True)
    ids = torch.randint(0, 257, (1, 30))
    later = ids.clone()
    later[:, 20:] = torch.randint(0, 257, (1, 10))
    torch.testing.assert_close(model(ids)[0][:, :20], model(later)[0][:, :20], rtol=1e-12, atol=1e-12)
