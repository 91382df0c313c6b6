"""MoBAAttention as the hybrid model uses it: dense equivalence at full top-k, MoBA of its projections,
sliding windows against masked attention, packed sequences against each sequence alone."""

import pytest
import torch

from flashmoba import moba_attn
from flashmoba.nn import MoBAAttention, sliding_window_attention
from tests.helpers import cu_seqlens


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
    offsets = cu_seqlens([13, 37, 1, 39])
    packed = torch.randn(90, 48, dtype=torch.float64)
    torch.testing.assert_close(moba(packed, offsets), dense(packed, offsets), rtol=1e-10, atol=1e-10)


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
    offsets = cu_seqlens(lengths)
    x = torch.randn(32, 32, dtype=torch.float64)
    packed = layer(x, offsets)
    for start, length in zip(offsets[:-1].tolist(), lengths):
        alone = layer(x[start : start + length].unsqueeze(0))[0]
        torch.testing.assert_close(packed[start : start + length], alone, rtol=1e-12, atol=1e-12)


def test_moba_layer_passes_its_kernel_config_on(monkeypatch):
    """The layer's kernel_config reaches moba_attn and moba_attn_varlen (MoBA only), and shows in its
    repr once set."""
    pytest.importorskip("triton")
    from flashmoba.nn import attention as attention_module
    from flashmoba.ops import KernelConfig

    calls = []

    def recording(function):
        def record(*args, **kwargs):
            calls.append((function.__name__, kwargs.get("kernel_config")))
            return function(*args, **kwargs)

        return record

    for name in ("moba_attn", "moba_attn_varlen"):
        monkeypatch.setattr(attention_module, name, recording(getattr(attention_module, name)))
    config = KernelConfig(rows_per_item=16)
    layer = MoBAAttention(32, 4, 2, block_size=4, topk=2, backend="reference", kernel_config=config)
    assert layer.kernel_config is config and "kernel_config=KernelConfig(" in repr(layer)
    layer(torch.randn(2, 9, 32))
    layer(torch.randn(14, 32), cu_seqlens([5, 9]))
    assert calls == [("moba_attn", config), ("moba_attn_varlen", config)]

    calls.clear()
    layer.kernel_config = None
    layer(torch.randn(2, 9, 32))
    assert calls == [("moba_attn", None)] and "kernel_config" not in repr(layer)
    dense = MoBAAttention(32, 4, 2, attention="dense")
    assert dense.kernel_config is None and "kernel_config" not in repr(dense)
    with pytest.raises(TypeError, match="kernel_config must be a flashmoba.ops.KernelConfig or None"):
        MoBAAttention(32, 4, 2, kernel_config=dict(rows_per_item=16))
