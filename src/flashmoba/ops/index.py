"""From per-query selections to the key-block-major index the attention kernels walk.

The router gives, per query row and head, the ``topk`` key blocks it attends to (``selected``
int32 ``[total_q, Hq, topk]``, block ids local to the sequence, -1 in unused slots). The attention
kernels work the other way round: one program per (query head, key block) over every (query row,
slot) routed to that block, so that a gathered tile of query rows meets a dense K/V block on the
tensor cores. This module builds that CSC-like index on the device, with no host synchronisation:

- every key block of the packed batch gets a *global* block slot: block j of sequence b sits at slot
  ``cu_seqlens_k[b] // block_size + b + j`` (the centroid rows of ``ops.router`` use the same layout).
  The slots of a sequence need no prefix sum over the batch, those of different sequences never overlap,
  and ``total_k // block_size + batch`` slots hold them all, a bound known from the input shapes alone
  (CUDA graphs, ``torch.compile``); the few slots between sequences stay empty;
- each routed pair is one *entry* ``e = (row * Hq + head) * topk + slot``, its flat position in
  ``selected``; a stable sort of the entries by ``(head, global block, chunk)`` lists, per column, the
  routed query rows in ascending order (the chunk is the row range whose partial results the forward
  keeps in memory at once; the order inside a column is the same with or without it);
- ``offsets[(head * num_block_slots + block) * num_chunks + chunk]`` is where that (column, chunk)
  segment starts; one more trailing offset closes the last one.

Two small kernels compute the block table and the sort keys, one launch each: at short lengths the
launches cost more than the work (see "Index: two kernels" in benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 1024  # slots or entries per program of the two kernels below


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _sequence_of(CuSeqlens, batch, search_steps, positions, divisor, per_sequence):
    """Per position, the last sequence b < batch with cu_seqlens[b] // divisor + b * per_sequence <= position
    (a binary search; that start is non-decreasing in b, and 0 for b = 0)."""
    low = tl.zeros_like(positions)  # start(low) <= position
    high = low + batch  # high == batch or start(high) > position
    for _ in range(search_steps):
        middle = (low + high) // 2  # < high <= batch: always a real sequence
        start = tl.load(CuSeqlens + middle) // divisor + middle * per_sequence
        at_or_below = start <= positions
        low = tl.where(at_or_below, middle, low)
        high = tl.where(at_or_below, high, middle)
    return low


@triton.jit
def _block_table_kernel(
    BlockTable,
    CuSeqlensQ,
    CuSeqlensK,
    batch,
    search_steps,
    block_size,
    block_slots,
    TILE: tl.constexpr,
):
    """Program: TILE block slots -> table rows (first key, end key, causal shift) of each."""
    slots = tl.program_id(0) * TILE + tl.arange(0, TILE)
    in_range = slots < block_slots
    sequence = _sequence_of(CuSeqlensK, batch, search_steps, slots, block_size, 1)
    key_start = tl.load(CuSeqlensK + sequence)
    key_end = tl.load(CuSeqlensK + sequence + 1)
    first = key_start + (slots - key_start // block_size - sequence) * block_size
    used = first < key_end  # slots past the sequence's last block (before the next one's) stay empty
    end = tl.minimum(first + block_size, key_end)
    shift = key_end - tl.load(CuSeqlensQ + sequence + 1)
    tl.store(BlockTable + slots, tl.where(used, first, 0), mask=in_range)
    tl.store(BlockTable + block_slots + slots, tl.where(used, end, 0), mask=in_range)
    tl.store(BlockTable + 2 * block_slots + slots, shift, mask=in_range)


@triton.jit
def _sort_keys_kernel(
    SortKeys,
    Selected,
    CuSeqlensQ,
    CuSeqlensK,
    batch,
    search_steps,
    num_entries,
    heads_q,
    topk,
    block_size,
    block_slots,
    num_chunks,
    chunk_rows,
    num_segments,
    TILE: tl.constexpr,
):
    """Program: TILE entries of ``selected`` (flat) -> their (head, global block, chunk) sort keys; unused
    slots and blocks past the sequence's end get the largest key, num_segments, so they sort last."""
    entries = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    in_range = entries < num_entries
    row = entries // (heads_q * topk)
    head = (entries // topk) % heads_q
    block = tl.load(Selected + entries, mask=in_range, other=-1).to(tl.int64)
    sequence = _sequence_of(CuSeqlensQ, batch, search_steps, row, 1, 0)
    key_start = tl.load(CuSeqlensK + sequence).to(tl.int64)
    num_blocks = (tl.load(CuSeqlensK + sequence + 1) - key_start + block_size - 1) // block_size
    valid = (block >= 0) & (block < num_blocks)
    slot = key_start // block_size + sequence + block
    key = (head * block_slots + slot) * num_chunks + row // chunk_rows
    tl.store(
        SortKeys + entries, tl.where(valid, key, num_segments).to(SortKeys.dtype.element_ty), mask=in_range
    )


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def num_block_slots(total_k: int, batch: int, block_size: int) -> int:
    """A static upper bound on the global block slots of a packed batch (see the module docstring)."""
    return total_k // block_size + batch


def _search_steps(batch: int) -> int:
    return max(1, batch).bit_length()  # halvings that narrow [0, batch) to one sequence


def block_table(
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, block_size: int, block_slots: int
) -> torch.Tensor:
    """Per global block slot: int32 ``[3, block_slots]`` rows (first key, end key, causal shift).

    Keys ``[first, end)`` are the block's packed key rows (empty for unused slots). A query of packed row
    ``r`` of the same sequence sees key row ``s`` in causal mode iff ``s <= r + shift``, with
    ``shift = cu_seqlens_k[seq + 1] - cu_seqlens_q[seq + 1]`` (bottom-right alignment, ``p = i + S - T``).
    """
    batch = cu_seqlens_k.numel() - 1
    table = torch.empty(3, block_slots, dtype=torch.int32, device=cu_seqlens_k.device)
    if block_slots == 0 or batch < 1:
        return table.zero_()
    _block_table_kernel[(triton.cdiv(block_slots, TILE),)](
        BlockTable=table,
        CuSeqlensQ=cu_seqlens_q,
        CuSeqlensK=cu_seqlens_k,
        batch=batch,
        search_steps=_search_steps(batch),
        block_size=block_size,
        block_slots=block_slots,
        TILE=TILE,
    )
    return table


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
    batch = cu_seqlens_q.numel() - 1
    num_segments = heads_q * block_slots * num_chunks
    # int32 keys keep the pair-sized temporaries at 4 bytes a pair (they set the forward's peak).
    key_dtype = torch.int32 if num_segments < 2**31 - 1 else torch.int64
    keys = torch.empty(selected.numel(), dtype=key_dtype, device=selected.device)
    if keys.numel() > 0 and batch >= 1:
        _sort_keys_kernel[(triton.cdiv(keys.numel(), TILE),)](
            SortKeys=keys,
            Selected=selected.contiguous(),
            CuSeqlensQ=cu_seqlens_q,
            CuSeqlensK=cu_seqlens_k,
            batch=batch,
            search_steps=_search_steps(batch),
            num_entries=keys.numel(),
            heads_q=heads_q,
            topk=topk,
            block_size=block_size,
            block_slots=block_slots,
            num_chunks=num_chunks,
            chunk_rows=chunk_rows,
            num_segments=num_segments,
            TILE=TILE,
        )
    sorted_keys, order = torch.sort(keys, stable=True)
    entries = order.to(torch.int32)
    boundaries = torch.arange(num_segments + 1, device=selected.device, dtype=key_dtype)
    offsets = torch.searchsorted(sorted_keys, boundaries, out_int32=True)
    return entries, offsets
