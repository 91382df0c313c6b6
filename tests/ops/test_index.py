"""The key-block-major index (``flashmoba.ops.index``) against a direct construction from its definition,
on CPU in Triton's interpreter (on a CUDA machine the same tests run the compiled kernels)."""

from __future__ import annotations

import pytest
import torch

from flashmoba.ops import index
from flashmoba.ops.utils import interpreting
from tests.helpers import cu_seqlens

DEVICE = "cpu" if interpreting() else "cuda"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.usefixtures("poison_empty"),  # conftest.py: unwritten table or keys show
]

# (query lengths, key lengths): empty sequences, partial last blocks, more keys than queries and fewer.
LAYOUTS = [
    ([5, 0, 12, 13], [9, 0, 11, 25]),
    ([64], [64]),
    ([7, 30, 1], [3, 30, 50]),
    ([0, 0, 9], [0, 4, 9]),
    # 37 sequences: a binary search of six steps over cu_seqlens, with empty ones among them.
    ([(7 * i) % 11 for i in range(37)], [(5 * i) % 13 for i in range(37)]),
]


def _expected_slots(lengths_k, block_size):
    """{global slot: (sequence, first key, end key)} by the layout's definition."""
    slots, start = {}, 0
    for sequence, length in enumerate(lengths_k):
        for block in range(-(-length // block_size)):
            first = start + block * block_size
            slots[start // block_size + sequence + block] = (
                sequence,
                first,
                min(first + block_size, start + length),
            )
        start += length
    return slots


@pytest.mark.parametrize("lengths_q, lengths_k", LAYOUTS)
@pytest.mark.parametrize("block_size", [4, 7])
def test_block_table(lengths_q, lengths_k, block_size):
    cu_q, cu_k = cu_seqlens(lengths_q, DEVICE), cu_seqlens(lengths_k, DEVICE)
    block_slots = index.num_block_slots(sum(lengths_k), len(lengths_k), block_size)
    table = index.block_table(cu_q, cu_k, block_size, block_slots).cpu()
    assert table.shape == (3, block_slots) and table.dtype == torch.int32
    expected = _expected_slots(lengths_k, block_size)
    assert max(expected, default=-1) < block_slots
    for slot in range(block_slots):
        if slot in expected:
            sequence, first, end = expected[slot]
            shift = int(cu_k[sequence + 1]) - int(cu_q[sequence + 1])
            assert table[:, slot].tolist() == [first, end, shift], slot
        else:
            assert table[:2, slot].tolist() == [0, 0], slot  # an empty slot has no keys


@pytest.mark.parametrize("lengths_q, lengths_k", LAYOUTS)
@pytest.mark.parametrize("num_chunks", [1, 3])
def test_block_index(lengths_q, lengths_k, num_chunks):
    block_size, heads, topk = 4, 3, 3
    generator = torch.Generator().manual_seed(len(lengths_q) + num_chunks)
    total_q = sum(lengths_q)
    # Random block ids, -1 (unused) and ids past the sequence's last block (never attended).
    selected = torch.randint(-1, 9, (total_q, heads, topk), dtype=torch.int32, generator=generator)
    cu_q, cu_k = cu_seqlens(lengths_q, DEVICE), cu_seqlens(lengths_k, DEVICE)
    block_slots = index.num_block_slots(sum(lengths_k), len(lengths_k), block_size)
    chunk_rows = max(1, -(-total_q // num_chunks))
    entries, offsets = index.build_block_index(
        selected.to(DEVICE), cu_q, cu_k, block_size, block_slots, num_chunks, chunk_rows
    )
    entries, offsets = entries.cpu(), offsets.cpu()

    slot_of = {
        (sequence, first): slot
        for slot, (sequence, first, _) in _expected_slots(lengths_k, block_size).items()
    }
    segments = [[] for _ in range(heads * block_slots * num_chunks)]
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for row in range(total_q):
        sequence = max(b for b in range(len(lengths_q)) if starts_q[b] <= row)
        for head in range(heads):
            for slot_index in range(topk):
                block = int(selected[row, head, slot_index])
                if block < 0 or block * block_size >= lengths_k[sequence]:
                    continue
                slot = slot_of[(sequence, starts_k[sequence] + block * block_size)]
                segment = (head * block_slots + slot) * num_chunks + row // chunk_rows
                segments[segment].append((row * heads + head) * topk + slot_index)
    expected_offsets = torch.tensor([0] + [len(s) for s in segments]).cumsum(0)
    assert offsets.dtype == torch.int32 and entries.dtype == torch.int32
    assert torch.equal(offsets, expected_offsets.to(torch.int32))
    assert entries[: int(offsets[-1])].tolist() == [e for segment in segments for e in segment]
    # The unused pairs follow, each once.
    assert sorted(entries.tolist()) == list(range(selected.numel()))
