"""From per-query selections to the key-block-major index the attention kernels walk.

The router gives, per query row and head, the ``topk`` key blocks it attends to (``selected``
int32 ``[total_q, Hq, topk]``, block ids local to the sequence, -1 in unused slots). The attention
kernels work the other way round: one program per (query head, key block) over every (query row,
slot) routed to that block, so that a gathered tile of query rows meets a dense K/V block on the
tensor cores. This module builds that CSC-like index on the device, with no host synchronisation:

- every key block of the packed batch gets a *global* block id; the number of global block slots is a
  static bound, ``total_k // block_size + batch`` (each sequence adds at most one partial block), so
  that every shape below is known from the input shapes alone (CUDA graphs, ``torch.compile``);
- each routed pair is one *entry* ``e = (row * Hq + head) * topk + slot``, its flat position in
  ``selected``; a stable sort of the entries by ``(head, global block, chunk)`` lists, per column, the
  routed query rows in ascending order (the chunk is the row range whose partial results the forward
  keeps in memory at once; the order inside a column is the same with or without it);
- ``offsets[(head * num_block_slots + block) * num_chunks + chunk]`` is where that (column, chunk)
  segment starts; one more trailing offset closes the last one.
"""

from __future__ import annotations

import torch


def num_block_slots(total_k: int, batch: int, block_size: int) -> int:
    """A static upper bound on the key blocks of a packed batch (each sequence adds < 1 partial block)."""
    return total_k // block_size + batch


def _blocks_per_sequence(cu_seqlens_k: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    blocks = (lengths_k + block_size - 1) // block_size
    first_block = torch.cumsum(blocks, 0) - blocks  # exclusive prefix sum: global id of local block 0
    return blocks, first_block


def block_table(
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_size: int, block_slots: int
) -> torch.Tensor:
    """Per global block slot: int32 ``[3, block_slots]`` rows (first key, end key, causal shift).

    Keys ``[first, end)`` are the block's packed key rows (empty for unused slots). A query of packed row
    ``r`` of the same sequence sees key row ``s`` in causal mode iff ``s <= r + shift``, with
    ``shift = cu_seqlens_k[seq + 1] - cu_seqlens_q[seq + 1]`` (bottom-right alignment, ``p = i + S - T``).
    """
    device = cu_seqlens_k.device
    batch = cu_seqlens_k.numel() - 1
    blocks, first_block = _blocks_per_sequence(cu_seqlens_k, block_size)
    slots = torch.arange(block_slots, device=device)
    sequence = torch.searchsorted(torch.cumsum(blocks, 0), slots, right=True)
    used = sequence < batch
    sequence = sequence.clamp(max=max(batch - 1, 0))
    cu_k, cu_q = cu_seqlens_k.long(), cu_seqlens_q.long()
    first = cu_k[sequence] + (slots - first_block[sequence]) * block_size
    end = torch.minimum(first + block_size, cu_k[sequence + 1])
    shift = cu_k[sequence + 1] - cu_q[sequence + 1]
    zero = torch.zeros_like(first)
    table = torch.stack([torch.where(used, first, zero), torch.where(used, end, zero), shift])
    return table.to(torch.int32)


def build_block_index(
    selected: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int,
    block_slots: int,
    num_chunks: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key-block-major list of routed (row, slot) pairs.

    selected: int32 ``[total_q, Hq, topk]``. Returns ``entries`` int32 ``[total_q * Hq * topk]`` (valid
    entries first, grouped by column and chunk, rows ascending inside a column) and ``offsets`` int32
    ``[Hq * block_slots * num_chunks + 1]``.
    """
    total_q, heads_q, topk = selected.shape
    device = selected.device
    blocks, first_block = _blocks_per_sequence(cu_seqlens_k, block_size)
    rows = torch.arange(total_q, device=device)
    # Sequence of each packed query row: how many sequences end at or before it.
    row_sequence = torch.searchsorted(cu_seqlens_q[1:].long(), rows, right=True)
    row_sequence = row_sequence.clamp(max=max(cu_seqlens_q.numel() - 2, 0))
    num_segments = heads_q * block_slots * num_chunks
    # int32 arithmetic keeps the pair-sized temporaries at 4 bytes a pair (they set the forward's peak).
    key_dtype = torch.int32 if num_segments < 2**31 - 1 else torch.int64
    block_ids = selected.to(key_dtype)
    valid = (block_ids >= 0) & (block_ids < blocks[row_sequence].to(key_dtype)[:, None, None])
    heads = torch.arange(heads_q, device=device, dtype=key_dtype)[None, :, None]
    chunk = torch.div(rows, chunk_rows, rounding_mode="floor").to(key_dtype)[:, None, None]
    first = first_block[row_sequence].to(key_dtype)[:, None, None]
    key = ((heads * block_slots + first) + block_ids) * num_chunks + chunk
    key = torch.where(valid, key, torch.full_like(key, num_segments)).flatten()  # unused slots sort last
    sorted_key, order = torch.sort(key, stable=True)
    entries = order.to(torch.int32)
    boundaries = torch.arange(num_segments + 1, device=device, dtype=sorted_key.dtype)
    offsets = torch.searchsorted(sorted_key, boundaries, out_int32=True)
    return entries, offsets
