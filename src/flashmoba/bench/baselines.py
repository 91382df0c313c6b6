"""The baselines flashmoba is measured against: PyTorch SDPA (flash and cuDNN backends, dense causal) and
FlexAttention with a MoBA ``BlockMask`` built from flashmoba's own router indices (what a PyTorch user
would otherwise write)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flashmoba.api import moba_select


def sdpa_attention(backend_name: str):
    """Dense causal SDPA pinned to one backend (``"sdpa_flash"`` or ``"sdpa_cudnn"``), flash-attn layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[
        backend_name
    ]

    def attention(q, k, v):
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=True,
                enable_gqa=q.shape[2] != k.shape[2],
            )
        return out.transpose(1, 2)

    return attention


def flex_moba_block_mask(selected: torch.Tensor, block_size: int, seqlen: int, causal: bool):
    """An exact MoBA BlockMask for FlexAttention from the router's indices.

    selected: int32 [B, T, H, topk] (moba_select's output). Each 128-query tile visits the union of its
    queries' blocks; mask_mod keeps, inside them, exactly the keys each query selected.
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, _, heads, topk = selected.shape
    query_tile = 128
    num_tiles = math.ceil(seqlen / query_tile)
    num_blocks = math.ceil(seqlen / block_size)
    per_query = selected.permute(0, 2, 1, 3).contiguous()  # [B, H, T, topk]
    padded = torch.full(
        (batch, heads, num_tiles * query_tile, topk), -1, dtype=torch.int32, device=selected.device
    )
    padded[:, :, :seqlen] = per_query
    tiles = padded.view(batch, heads, num_tiles, query_tile * topk).long()
    used = torch.zeros(batch, heads, num_tiles, num_blocks + 1, dtype=torch.bool, device=selected.device)
    used.scatter_(-1, torch.where(tiles >= 0, tiles, num_blocks), True)
    used = used[..., :num_blocks]
    kv_num_blocks = used.sum(-1, dtype=torch.int32)
    # Selected block ids first (ascending), then the rest: a stable sort of "not used".
    kv_indices = torch.sort((~used).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        block = kv_idx // block_size
        keep = per_query[b, h, q_idx, 0] == block
        for slot in range(1, topk):
            keep = keep | (per_query[b, h, q_idx, slot] == block)
        if causal:
            keep = keep & (kv_idx <= q_idx)
        return keep

    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        BLOCK_SIZE=(query_tile, block_size),
        mask_mod=mask_mod,
        seq_lengths=(seqlen, seqlen),
    )


def flex_moba_attention(block_size: int, topk: int, causal: bool):
    """Compiled FlexAttention with the MoBA BlockMask of flashmoba's own router indices, flash-attn layout."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def attention(q, k, v):
        key = (q.data_ptr(), q.shape)
        if key not in masks:  # built once per input, outside the timed calls' steady state
            with torch.no_grad():
                selected = moba_select(q, k, block_size, topk, causal=causal)
            masks.clear()
            masks[key] = flex_moba_block_mask(selected, block_size, q.shape[1], causal)
        out = compiled(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=masks[key],
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)

    return attention
