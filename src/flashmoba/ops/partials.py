"""The scratch layout the forward and the backward share: per-pair partial results, kept a chunk at a time.

The forward writes one partial output and log2-sum-exp per routed (row, head, slot) pair, and the
backward's stored-dQ and deterministic paths one partial dQ per pair; a merge or sum kernel then combines
the ``topk`` partials of each row in slot order. A chunk's partials are laid out [head in chunk, row,
slot]. The chunking is static (from the shapes alone, no host synchronisation), so the scratch stays
about twice the size of the output whatever topk is. A chunk is a group of whole query heads, so every
program sees all the rows routed to its column and loads its K/V block once; only when one head's
partials exceed the budget is a head split into row ranges (``Chunking``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashmoba.ops.config import DEFAULT_CONFIG, KernelConfig


@triton.jit
def chunk_pair_index(entry, rows, head_in_chunk, first_row, rows_here, topk):
    """Position of routed pairs in the chunk's partial buffers, laid out [head in chunk, row, slot]."""
    return ((head_in_chunk * rows_here + rows - first_row) * topk + entry % topk).to(tl.int64)


@triton.jit
def store_partial(
    PartialOut,
    PartialLse,
    pair,
    entry_mask,
    row_max,
    row_sum,
    accumulator,
    offs_d,
    d_mask,
    HEAD_DIM: tl.constexpr,
):
    """Write each pair's normalised partial output and its log2-sum-exp (-inf when it saw no key)."""
    partial_lse = row_max + tl.math.log2(row_sum)
    partial_out = accumulator / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    tl.store(PartialLse + pair, partial_lse, mask=entry_mask)
    tl.store(
        PartialOut + pair[:, None] * HEAD_DIM + offs_d[None, :],
        partial_out.to(PartialOut.dtype.element_ty),
        mask=entry_mask[:, None] & d_mask[None, :],
    )


def partial_dtype(dtype: torch.dtype, config: KernelConfig = DEFAULT_CONFIG) -> torch.dtype:
    """The dtype of the partials of inputs in ``dtype``: that dtype for 16-bit inputs where the config
    keeps partials in the input dtype, float32 otherwise."""
    in_input_dtype = config.partials_in_input_dtype and dtype in (torch.float16, torch.bfloat16)
    return dtype if in_input_dtype else torch.float32


class Chunking(NamedTuple):
    """How the forward splits the partial outputs of all (row, head, slot) pairs to fit its scratch.

    Whole heads go together while one head's partials fit (``row_chunks == 1``); otherwise each chunk is
    one head and ``rows_per_chunk`` rows. The index keeps ``row_chunks`` segments per column.
    """

    heads_per_chunk: int
    rows_per_chunk: int
    row_chunks: int

    def chunks(self, total_q: int, heads_q: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(first head, heads, row chunk, first row, rows) of each chunk, in launch order."""
        for head_first in range(0, heads_q, self.heads_per_chunk):
            for row_chunk in range(self.row_chunks):
                first_row = row_chunk * self.rows_per_chunk
                yield (
                    head_first,
                    min(self.heads_per_chunk, heads_q - head_first),
                    row_chunk,
                    first_row,
                    min(self.rows_per_chunk, total_q - first_row),
                )

    def scratch_pairs(self, topk: int) -> int:
        return self.heads_per_chunk * self.rows_per_chunk * topk


def chunking(
    total_q: int,
    heads_q: int,
    topk: int,
    head_dim: int,
    dtype: torch.dtype,
    group: int = 1,
    config: KernelConfig = DEFAULT_CONFIG,
) -> Chunking:
    """The static chunking of the forward's partials (and of the backward's dQ partials) for these shapes.

    With ``group`` > 1, heads go in whole groups of ``group`` consecutive heads (the query heads of one kv
    head, for the backward's dK/dV programs); a group that does not fit is split into row ranges instead.
    Whole heads are preferred: splitting rows costs each column a K/V reload and shorter row loops per
    chunk (see "Forward: chunks of whole heads" in benchmarks/NOTES.md).
    """
    budget = config.partial_buffer_bytes
    if budget is None:  # twice the output and its lse
        budget = max(64 << 20, 2 * total_q * heads_q * (head_dim * dtype.itemsize + 4))
    # One group's partial outputs and lse per row.
    bytes_per_row = group * topk * (head_dim * partial_dtype(dtype, config).itemsize + 4)
    rows = max(total_q, 1)
    groups = heads_q // group
    groups_that_fit = min(groups, budget // (bytes_per_row * rows))
    if groups_that_fit >= 1:
        launches = -(-groups // groups_that_fit)
        return Chunking(group * -(-groups // launches), rows, 1)  # even sizes: no short last launch
    rows_per_chunk = max(1, budget // bytes_per_row)
    return Chunking(group, rows_per_chunk, -(-rows // rows_per_chunk))
