"""flashmoba.bench.baselines without a GPU: the MoBA BlockMask for FlexAttention is exactly MoBA."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

import flashmoba
from flashmoba.bench.baselines import flex_moba_block_mask


@pytest.mark.parametrize("causal", [True, False])
def test_flex_block_mask_is_exactly_moba(causal):
    """Token-level mask of the BlockMask == the keys MoBA lets each query see, and the block lists
    cover every selected block."""
    seqlen, heads, block_size, topk = 300, 2, 32, 3
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, seqlen, heads, 16, generator=generator)
    k = torch.randn(1, seqlen, heads, 16, generator=generator)
    selected = flashmoba.moba_select(q, k, block_size, topk, causal=causal)
    block_mask = flex_moba_block_mask(selected, block_size, seqlen, causal)

    dense = create_mask(block_mask.mask_mod, 1, heads, seqlen, seqlen, device="cpu")[0]
    positions = torch.arange(seqlen)
    expected = torch.zeros(heads, seqlen, seqlen, dtype=torch.bool)
    for slot in range(topk):
        block = selected[0, :, :, slot].T.long()  # [H, T]
        expected |= (positions[None, None, :] // block_size == block[..., None]) & (block[..., None] >= 0)
    if causal:
        expected &= positions[None, None, :] <= positions[None, :, None]
    assert torch.equal(dense, expected)

    block_level = block_mask.to_dense()[0].bool()  # [H, query tiles, key blocks]
    tile_of_query = positions // 128
    for slot in range(topk):
        block = selected[0, :, :, slot].T.long()
        chosen = block >= 0
        heads_idx = torch.arange(heads)[:, None].expand_as(block)
        assert block_level[heads_idx[chosen], tile_of_query.expand_as(block)[chosen], block[chosen]].all()
