"""Work items: the routed rows of one column cut into pieces that separate programs take.

The attention kernels walk the index column by column (a column: one key block and one query head, or,
for the dK/dV kernel, one key block and one kv head with the query heads of its group). A trained router
is skewed: per head, the hottest block (block 0 mostly) receives ~10x the mean rows, so one program per
column walks the hot column serially while the rest of its launch has long finished. Here each column's
rows are cut into *items* of at most ``rows_per_item`` entries (the last item of a column takes the rest),
one program each.

Per launch, columns are numbered ``column = block * units_here + unit`` (a unit: the launch's query head,
or kv head, in its range): units vary fastest, so the early blocks, which collect the most rows under
causal routing, start first, and a column's items are consecutive program ids. The table holds, per
launch and column, ``item_ends`` (the inclusive prefix sum of the columns' item counts, int32); a program
finds its column by a binary search over it (``find_item``). All of it is built on the device by one
launch of ``_work_items_kernel`` for all the launches of a call; the grids have a static size from the
shapes alone (``WorkItems.grid``), with programs past the last item exiting at once.

Items of one dK/dV column each hold a partial dK/dV, summed by a second kernel in item order
(deterministic). Their float32 partials need scratch, bounded statically: ``scratch_slots`` items per
launch. The table gives each split column its slots in column order (``scratch_first``); a column whose
items would not fit any more stays one item (its rows in one program, as without splitting). With the
default bound (one slot per column of the launch, scratch the size of the launch's dK and dV in float32)
that happens only where most columns hold more than ``rows_per_item`` rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flashmoba.ops.config import KernelConfig

TILE = 1024  # columns per step of the table kernel's scan
NEVER_SPLIT = 1 << 30  # rows_per_item of "no split": above any column's rows (pairs < 2**31)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _work_items_kernel(
    ItemEnds,
    ScratchFirst,
    Offsets,
    block_slots,
    num_chunks,
    segments_per_column,
    heads_per_unit,
    units_total,
    units_per_launch,
    row_chunks,
    columns_per_launch,
    rows_per_item,
    min_items,
    scratch_slots,
    TILE: tl.constexpr,
):
    """Program: one launch's table. Column ``(block, unit)`` holds, for each of the unit's heads
    ``unit * heads_per_unit + i``, index segments ``[s, s + segments_per_column)`` with
    ``s = (head * block_slots + block) * num_chunks + row_chunk``; it gets ``max(min_items,
    cdiv(rows, rows_per_item))`` items, or one where its scratch slots would pass ``scratch_slots``."""
    launch = tl.program_id(0)
    unit_first = (launch // row_chunks) * units_per_launch
    row_chunk = launch % row_chunks
    units_here = tl.minimum(units_per_launch, units_total - unit_first)
    columns = block_slots * units_here
    table_first = launch * columns_per_launch
    items_before = tl.zeros([], dtype=tl.int32)
    slots_before = tl.zeros([], dtype=tl.int32)
    for tile_first in range(0, columns, TILE):
        column = tile_first + tl.arange(0, TILE)
        in_range = column < columns
        block = column // units_here
        unit = unit_first + column % units_here
        rows = tl.zeros([TILE], dtype=tl.int32)
        for head_in_unit in range(heads_per_unit):
            segment = ((unit * heads_per_unit + head_in_unit) * block_slots + block) * num_chunks + row_chunk
            begin = tl.load(Offsets + segment, mask=in_range, other=0)
            end = tl.load(Offsets + segment + segments_per_column, mask=in_range, other=0)
            rows += end - begin
        items = tl.where(in_range, tl.maximum(tl.cdiv(rows, rows_per_item), min_items), 0)
        if ScratchFirst is not None:
            # Slots in column order; once a split column does not fit, no later one does (the ends grow).
            wanted = tl.where(items > 1, items, 0)
            slot_ends = slots_before + tl.cumsum(wanted, 0)
            items = tl.where(slot_ends <= scratch_slots, items, tl.minimum(items, 1))
            tl.store(ScratchFirst + table_first + column, slot_ends - wanted, mask=in_range)
            slots_before += tl.sum(wanted, 0)
        tl.store(ItemEnds + table_first + column, items_before + tl.cumsum(items, 0), mask=in_range)
        items_before += tl.sum(items, 0)


@triton.jit
def find_item(ItemEnds, columns, search_steps, item):
    """The column of work item ``item`` in a launch's table, the item's rank among the column's items and
    the column's item count, and whether the item exists (programs past the last one find none; their
    column is then clamped to the last, so that its loads stay in range).

    A lower bound in ``search_steps`` = ``columns.bit_length()`` halvings: the first column whose items end
    after ``item``; everything below ``low`` ends at or before it, everything from ``high`` on after it."""
    low = tl.zeros_like(item)
    high = low + columns
    for _ in range(search_steps):
        searching = low < high
        middle = (low + high) // 2  # < high <= columns while searching
        after = tl.load(ItemEnds + middle, mask=searching, other=0) > item
        high = tl.where(searching & after, middle, high)
        low = tl.where(searching & ~after, middle + 1, low)
    is_item = low < columns
    column = tl.minimum(low, columns - 1)
    item_end = tl.load(ItemEnds + column)
    item_first = tl.load(ItemEnds + column - 1, mask=column > 0, other=0)
    return column, tl.where(is_item, item - item_first, 0), item_end - item_first, is_item


@triton.jit
def item_rows(column_begin, column_end, item_in_column, items, rows_per_item):
    """The item's part [begin, end) of its column's entries [column_begin, column_end): ``rows_per_item``
    of them, the column's rest for its last item."""
    begin = column_begin + item_in_column * rows_per_item
    end = tl.where(item_in_column == items - 1, column_end, begin + rows_per_item)
    return begin, end


@triton.jit
def program_item(
    Offsets,
    BlockTable,
    ItemEnds,
    search_steps,
    rows_per_item,
    block_slots,
    num_chunks,
    chunk,
    head_first,
    heads_here,
):
    """The work item of this program in a chunk's grid of (key block, query head) columns: the head, the
    item's part [begin, end) of the column's segment (empty for programs past the last item), and the
    block's keys [key_first, key_end) and causal shift."""
    column, item_in_column, items, is_item = find_item(
        ItemEnds, block_slots * heads_here, search_steps, tl.program_id(0)
    )
    block = column // heads_here
    head_in_chunk = column % heads_here
    head = head_first + head_in_chunk
    segment = (head * block_slots + block) * num_chunks + chunk
    begin, end = item_rows(
        tl.load(Offsets + segment), tl.load(Offsets + segment + 1), item_in_column, items, rows_per_item
    )
    end = tl.where(is_item, end, begin)
    key_first = tl.load(BlockTable + block)
    key_end = tl.load(BlockTable + block_slots + block)
    shift = tl.load(BlockTable + 2 * block_slots + block)
    return head_in_chunk, head, begin, end, key_first, key_end, shift


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


def rows_per_item(config: KernelConfig, block_m: int) -> int:
    """The config's item size for a kernel of ``block_m`` gathered rows per tile: rounded up to whole
    tiles, so that only a column's last item has a partial tile; 0 (never split) as NEVER_SPLIT."""
    if config.rows_per_item == 0:
        return NEVER_SPLIT
    return triton.cdiv(config.rows_per_item, block_m) * block_m


class WorkItems(NamedTuple):
    """A call's item tables, one row per launch: int32 ``item_ends [launches, columns_per_launch]`` and,
    where items need scratch, ``scratch_first`` of the same shape (None otherwise)."""

    item_ends: torch.Tensor
    scratch_first: torch.Tensor | None
    rows_per_item: int

    def grid(self, entries: int, columns: int) -> int:
        """Programs of a launch whose ``columns`` columns hold at most ``entries`` routed entries: a static
        bound on its items. A column of n >= 1 rows takes ceil(n / R) <= (n - 1) // R + 1 items (an
        empty one at most one), and the (n - 1) // R sum to at most entries // R."""
        return entries // self.rows_per_item + columns


def search_steps(columns: int) -> int:
    """Halvings of ``find_item``'s search over ``columns`` columns."""
    return max(1, columns).bit_length()


def work_items(
    offsets: torch.Tensor,
    block_slots: int,
    num_chunks: int,
    *,
    units_total: int,
    units_per_launch: int,
    heads_per_unit: int,
    row_chunks: int,
    segments_per_column: int,
    rows_per_item: int,
    min_items: int,
    scratch_slots: int | None = None,
) -> WorkItems:
    """The item tables of the launches over ``units_total`` units, ``units_per_launch`` at a time, each for
    ``row_chunks`` row chunks (launch ``group * row_chunks + row_chunk``, the order of
    ``Chunking.chunks``). ``offsets`` is the index's (``flashmoba.ops.index``), ``num_chunks`` segments per
    column; ``scratch_slots`` None: items need no scratch, every column splits."""
    launches = triton.cdiv(units_total, units_per_launch) * row_chunks
    columns_per_launch = block_slots * units_per_launch
    item_ends = torch.empty(launches, columns_per_launch, dtype=torch.int32, device=offsets.device)
    scratch_first = None if scratch_slots is None else torch.empty_like(item_ends)
    if item_ends.numel() > 0:
        _work_items_kernel[(launches,)](
            ItemEnds=item_ends,
            ScratchFirst=scratch_first,
            Offsets=offsets,
            block_slots=block_slots,
            num_chunks=num_chunks,
            segments_per_column=segments_per_column,
            heads_per_unit=heads_per_unit,
            units_total=units_total,
            units_per_launch=units_per_launch,
            row_chunks=row_chunks,
            columns_per_launch=columns_per_launch,
            rows_per_item=rows_per_item,
            min_items=min_items,
            scratch_slots=0 if scratch_slots is None else scratch_slots,
            TILE=TILE,
        )
    return WorkItems(item_ends, scratch_first, rows_per_item)
