"""MoBAAttention and the hybrid LM: dense equivalence, causality, packed sequences, sliding windows, presets."""

import pytest
import torch

from flashmoba import moba_attn
from flashmoba.model import MODEL_PRESETS, HybridLM, ModelConfig, model_config_from_preset
from flashmoba.nn import MoBAAttention, sliding_window_attention


def layer_pair(**kwargs):
    """A MoBA layer and a dense layer with the same weights."""
    torch.manual_seed(0)
    moba = MoBAAttention(48, 6, 2, 8, attention="moba", backend="reference", **kwargs).double()
    dense = MoBAAttention(
        48, 6, 2, 8, attention="dense", **{k: v for k, v in kwargs.items() if k not in ("block_size", "topk")}
    ).double()
    dense.load_state_dict(moba.state_dict())
    return moba, dense


@pytest.mark.parametrize("kconv_size", [0, 3])
def test_moba_with_topk_covering_all_blocks_equals_dense(kconv_size):
    moba, dense = layer_pair(block_size=8, topk=16, kconv_size=kconv_size)  # 50 tokens = 7 blocks
    x = torch.randn(2, 50, 48, dtype=torch.float64, requires_grad=True)
    out_moba, out_dense = moba(x), dense(x)
    torch.testing.assert_close(out_moba, out_dense, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out_moba)
    torch.testing.assert_close(
        torch.autograd.grad(out_moba, x, grad)[0],
        torch.autograd.grad(out_dense, x, grad)[0],
        rtol=1e-10,
        atol=1e-10,
    )
    # Packed: sequences of different lengths.
    cu_seqlens = torch.tensor([0, 13, 50, 51, 90], dtype=torch.int32)
    packed = torch.randn(90, 48, dtype=torch.float64)
    torch.testing.assert_close(moba(packed, cu_seqlens), dense(packed, cu_seqlens), rtol=1e-10, atol=1e-10)


def test_moba_layer_computes_moba_of_its_projections():
    moba, _ = layer_pair(block_size=4, topk=2, kconv_size=3)
    x = torch.randn(1, 30, 48, dtype=torch.float64)
    q, k, v = moba.project(x)
    expected = moba.o_proj(moba_attn(q, k, v, 4, 2, backend="reference").flatten(-2))
    torch.testing.assert_close(moba(x), expected, rtol=0, atol=0)
    selection = moba.select_blocks(x)
    assert selection.shape == (1, 30, 6, 2) and selection.dtype == torch.int32


def naive_sliding(q, k, v, window):
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    i = torch.arange(q.shape[1])[:, None]
    j = torch.arange(q.shape[1])[None]
    scores = scores.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


@pytest.mark.parametrize("seqlen,window", [(1, 4), (37, 5), (64, 16), (20, 64)])
def test_sliding_window_matches_masked_attention(seqlen, window):
    torch.manual_seed(1)
    q = torch.randn(2, seqlen, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(2, seqlen, 2, 8, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(
        sliding_window_attention(q, k, v, window, 8**-0.5), naive_sliding(q, k, v, window)
    )


@pytest.mark.parametrize("attention", ["moba", "dense", "sliding"])
def test_packed_layer_equals_each_sequence_alone(attention):
    torch.manual_seed(2)
    layer = MoBAAttention(
        32,
        4,
        2,
        attention=attention,
        block_size=4,
        topk=2,
        window_size=6,
        kconv_size=3,
        rope=attention == "sliding",
        backend="reference",
    ).double()
    lengths = [5, 17, 1, 9]
    cu_seqlens = torch.tensor([0, 5, 22, 23, 32], dtype=torch.int32)
    x = torch.randn(32, 32, dtype=torch.float64)
    packed = layer(x, cu_seqlens)
    for start, length in zip(cu_seqlens[:-1].tolist(), lengths):
        alone = layer(x[start : start + length].unsqueeze(0))[0]
        torch.testing.assert_close(packed[start : start + length], alone, rtol=1e-12, atol=1e-12)


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
    cu_seqlens = torch.tensor([0, 12, 30, 45], dtype=torch.int32)
    packed_logits, _ = model(ids, cu_seqlens=cu_seqlens)
    for start, end in [(0, 12), (12, 30), (30, 45)]:
        alone, _ = model(ids[start:end].unsqueeze(0))
        torch.testing.assert_close(packed_logits[start:end], alone[0], rtol=1e-12, atol=1e-12)
    targets = torch.randint(0, 257, (45,))
    _, loss = model(ids, targets, cu_seqlens=cu_seqlens)
    expected = torch.nn.functional.cross_entropy(packed_logits.float(), targets)
    torch.testing.assert_close(loss, expected)
    # Weights scale each target's loss; the sum is divided by the number of scored targets.
    targets[3] = -100
    weights = torch.ones(45)
    weights[[5, 40]] = 4.0
    _, weighted = model(ids, targets, cu_seqlens=cu_seqlens, loss_weights=weights)
    per_token = torch.nn.functional.cross_entropy(packed_logits.float(), targets, reduction="none")
    torch.testing.assert_close(weighted, (per_token * weights).sum() / 44)
    _, ones = model(ids, targets, cu_seqlens=cu_seqlens, loss_weights=torch.ones(45))
    torch.testing.assert_close(ones, torch.nn.functional.cross_entropy(packed_logits.float(), targets))
    with pytest.raises(ValueError, match="loss_weights"):
        model(ids, targets, cu_seqlens=cu_seqlens, loss_weights=torch.ones(44))


def test_packed_forward_reads_cu_seqlens_once_for_all_layers(count_host_reads):
    # The Triton backend on CPU (interpreter): MoBA layers trust the model's one check of the packing.
    config = model_config_from_preset(
        "tiny", window_size=8, moba_block_size=4, moba_topk=2, kconv_size=3, backend="triton"
    )
    model = HybridLM(config).eval()
    ids = torch.randint(0, 257, (45,))
    cu_seqlens = torch.tensor([0, 12, 30, 45], dtype=torch.int32)
    reads = count_host_reads(cu_seqlens)
    model(ids, cu_seqlens=cu_seqlens)
    assert len(reads) == 1
    with pytest.raises(ValueError, match="max_seqlen must be >= the longest"):
        model(ids, cu_seqlens=cu_seqlens, max_seqlen=10)
    with pytest.raises(ValueError, match="total = 45"):
        model.blocks[1].attn(torch.zeros(44, model.config.hidden_size), cu_seqlens=cu_seqlens)


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
