"""moba_attn_with_kvcache's Triton backend (flashmoba.ops.decode) against moba_attn on whole sequences.

The oracle is the float64 reference (``moba_attn`` of each whole sequence, its last seqlen_q rows) on the
same values; bfloat16 compares with the reference backend on the same bfloat16 inputs (it routes on the
same bfloat16-rounded centroids). Caches hold NaN wherever no key was written and unused block_table
entries are -1, so a read past a sequence's length, or of a page it does not own, shows in the result;
scratch comes from poisoned torch.empty (``poison_empty``), so a partial the kernels forget to write does.
The interpreter is slow: the shapes are small, and each case is a batch of ragged sequences.
"""

from __future__ import annotations

import math

import pytest
import torch

import flashmoba
from flashmoba import MoBAKVCache
from flashmoba.ops import decode
from flashmoba.ops.utils import supports_pdl
from tests.helpers import assert_close

pytestmark = pytest.mark.triton

BLOCK, TOPK, HEAD_DIM, CAPACITY = 4, 3, 24, 41
CACHE_LENGTHS = (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 33)  # ragged, in one batch
LAYOUTS = {  # (page_size, shuffled); None: contiguous
    "contiguous": None,
    "paged-B-shuffled": (BLOCK, True),
    "paged-3-shuffled": (3, True),  # neither a divisor nor a multiple of the block size
}
HEADS = {"gqa": (4, 2), "mqa": (3, 1)}
BF16_TOLERANCE = dict(atol=2e-2, rtol=2e-2)


class Case:
    """A batch of whole float64 sequences, of which the first ``cache_lengths[b]`` keys sit in a cache of
    ``dtype`` (the values are rounded to dtype first, so the oracle sees what the kernels see)."""

    def __init__(
        self,
        cache_lengths,
        seqlen_q,
        heads=HEADS["gqa"],
        new_kv=True,
        layout=None,
        dtype=torch.float32,
        block_size=BLOCK,
        topk=TOPK,
        head_dim=HEAD_DIM,
        capacity=CAPACITY,
        seed=0,
    ):
        generator = torch.Generator().manual_seed(seed)
        heads_q, heads_kv = heads
        self.block_size, self.topk, self.dtype = block_size, topk, dtype
        self.batch, self.seqlen_q = len(cache_lengths), seqlen_q
        self.new = seqlen_q if new_kv else 0
        lengths = [length + self.new for length in cache_lengths]

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).double()

        self.keys = [randn(length, heads_kv, head_dim) for length in lengths]
        self.values = [randn(length, heads_kv, head_dim) for length in lengths]
        self.q = randn(self.batch, seqlen_q, heads_q, head_dim)
        if layout is None:
            self.block_table, self.page_size = None, None
            shape = (self.batch, capacity, heads_kv, head_dim)
        else:
            self.page_size, shuffled = layout
            max_pages = -(-capacity // self.page_size)
            num_pages = self.batch * max_pages + 3  # spare pages nobody owns
            order = torch.randperm(num_pages, generator=generator) if shuffled else torch.arange(num_pages)
            table = order[: self.batch * max_pages].view(self.batch, max_pages).to(torch.int32)
            for b, length in enumerate(lengths):  # entries past the pages a sequence uses are never read
                table[b, -(-length // self.page_size) :] = -1
            self.block_table = table
            shape = (num_pages, self.page_size, heads_kv, head_dim)
        self.k_cache = torch.full(shape, math.nan, dtype=dtype)
        self.v_cache = torch.full(shape, math.nan, dtype=dtype)
        for b, length in enumerate(cache_lengths):
            index = self.index(b, length)
            self.k_cache[index] = self.keys[b][:length].to(dtype)
            self.v_cache[index] = self.values[b][:length].to(dtype)
        self.cache_seqlens = torch.tensor(cache_lengths, dtype=torch.int32)
        self.block_sums = flashmoba.kvcache_block_sums(
            self.k_cache, self.cache_seqlens, block_size, block_table=self.block_table
        )
        self.k = self.v = None
        if new_kv:
            self.k = torch.stack([keys[keys.shape[0] - seqlen_q :] for keys in self.keys]).to(dtype)
            self.v = torch.stack([vals[vals.shape[0] - seqlen_q :] for vals in self.values]).to(dtype)

    def index(self, b, length):
        positions = torch.arange(length)
        if self.block_table is None:
            return b, positions
        return self.block_table[b].long()[positions // self.page_size], positions % self.page_size

    def run(self, backend="triton", **overrides):
        return flashmoba.moba_attn_with_kvcache(
            self.q.to(self.dtype),
            self.k_cache,
            self.v_cache,
            self.block_sums,
            self.cache_seqlens,
            self.block_size,
            self.topk,
            k=self.k,
            v=self.v,
            block_table=self.block_table,
            backend=backend,
            return_lse=True,
            **overrides,
        )

    def triton_arguments(self, scale: float) -> tuple:
        """The positional arguments of ``moba_decode_triton`` (and of the ``flashmoba::moba_decode`` op)
        for this case, the config left out."""
        return (
            self.q.to(self.dtype),
            self.k_cache,
            self.v_cache,
            self.block_sums,
            self.cache_seqlens,
            self.block_size,
            self.topk,
            self.k,
            self.v,
            self.block_table,
            scale,
        )

    def expected(self):
        """moba_attn of each whole sequence in float64, its last seqlen_q rows (bottom-right causal)."""
        outs, lses = [], []
        for b in range(self.batch):
            out, lse = flashmoba.moba_attn(
                self.q[b : b + 1],
                self.keys[b][None],
                self.values[b][None],
                self.block_size,
                self.topk,
                causal=True,
                backend="reference",
                return_lse=True,
            )
            outs.append(out[0])
            lses.append(lse[0])
        return torch.stack(outs), torch.stack(lses)

    def check_appended(self):
        """The new keys and values are in the cache, and block_sums are those of the filled cache."""
        for b in range(self.batch):
            index = self.index(b, self.keys[b].shape[0])
            assert torch.equal(self.k_cache[index].double(), self.keys[b]), f"keys of sequence {b}"
            assert torch.equal(self.v_cache[index].double(), self.values[b]), f"values of sequence {b}"
        filled = flashmoba.kvcache_block_sums(
            self.k_cache, self.cache_seqlens + self.new, self.block_size, block_table=self.block_table
        )
        assert_close(self.block_sums, filled, "kernel_float32", "block_sums")


def cached_lengths(seqlen_q):
    """Cache lengths that hold seqlen_q queries without new keys (or 0: an empty sequence)."""
    return [length if length == 0 else max(length, seqlen_q) for length in CACHE_LENGTHS]


@pytest.fixture(params=["by-group", "by-head"])
def attention_by(request, monkeypatch):
    """Both attention kernels: by kv head group (the default) and by query head."""
    monkeypatch.setattr(decode, "DEFAULT_ATTN_BY_GROUP", request.param == "by-group")


def check_float32(case):
    seqlens_before = case.cache_seqlens.clone()
    out, lse = case.run()
    expected_out, expected_lse = case.expected()
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(out, expected_out, "kernel_float32", "o")
    assert_close(lse, expected_lse, "kernel_float32", "lse")
    assert torch.equal(case.cache_seqlens, seqlens_before), "cache_seqlens must not be advanced"
    if case.new:
        case.check_appended()


# ----------------------------------------------------------------------------------------------------
# Against the oracle
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("new_kv", [True, False], ids=["new-kv", "cached"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decode_step_float32(layout, new_kv, heads, poison_empty, attention_by):
    lengths = CACHE_LENGTHS if new_kv else cached_lengths(1)
    check_float32(Case(lengths, 1, HEADS[heads], new_kv, LAYOUTS[layout]))


@pytest.mark.parametrize("new_kv", [True, False], ids=["new-kv", "cached"])
@pytest.mark.parametrize("layout", ["contiguous", "paged-3-shuffled"])
def test_chunk_of_several_blocks_float32(layout, new_kv, poison_empty):
    seqlen_q = 2 * BLOCK + 3  # rows at different absolute positions, in several blocks
    lengths = CACHE_LENGTHS if new_kv else cached_lengths(seqlen_q)
    case = Case(lengths, seqlen_q, (2, 1), new_kv, LAYOUTS[layout], capacity=48, seed=1)  # GQA, 2 per kv head
    check_float32(case)


@pytest.mark.parametrize("block_size, head_dim", [(5, 40), (3, 7)], ids=["odd-block-d40", "block-3-d7"])
def test_odd_block_sizes_and_head_dims(block_size, head_dim, poison_empty):
    lengths = (0, 1, block_size - 1, block_size, block_size + 1, 30)
    case = Case(
        lengths,
        2,
        HEADS["gqa"],
        True,
        LAYOUTS["paged-3-shuffled"],
        block_size=block_size,
        head_dim=head_dim,
        seed=2,
    )
    check_float32(case)


def test_topk_larger_than_the_number_of_blocks(poison_empty):
    # 11 blocks at most: every candidate is selected, and the selection's slots past the on-chip list
    # (16 slots) are written by the tail loop.
    check_float32(Case(CACHE_LENGTHS, 2, HEADS["mqa"], True, None, topk=40, seed=3))
    check_float32(Case(CACHE_LENGTHS, 1, HEADS["gqa"], True, None, topk=1, seed=4))  # own block only


def test_block_size_beyond_the_capacity():
    case = Case((0, 3, 20), 2, HEADS["mqa"], True, None, block_size=10**6, topk=4, seed=5)
    check_float32(case)


@pytest.mark.parametrize("layout", ["contiguous", "paged-3-shuffled"])
def test_bfloat16_against_the_reference_backend(layout, attention_by):
    case = Case(CACHE_LENGTHS, 3, HEADS["gqa"], True, LAYOUTS[layout], dtype=torch.bfloat16, seed=6)
    twin = Case(CACHE_LENGTHS, 3, HEADS["gqa"], True, LAYOUTS[layout], dtype=torch.bfloat16, seed=6)
    out, lse = case.run()
    expected_out, expected_lse = twin.run(backend="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected_out.float(), **BF16_TOLERANCE)
    torch.testing.assert_close(lse, expected_lse, atol=1e-3, rtol=1e-3)
    # And near the float64 oracle of the same (bfloat16) values.
    torch.testing.assert_close(out.double(), case.expected()[0], atol=3e-2, rtol=3e-2)
    for b in range(case.batch):  # bfloat16 keys go into float32 sums: the same sums as the reference's
        assert torch.equal(case.k_cache[case.index(b, case.keys[b].shape[0])].double(), case.keys[b])
    assert_close(case.block_sums, twin.block_sums, "kernel_float32", "block_sums")


def test_float16_decode_step():
    case = Case(CACHE_LENGTHS, 1, HEADS["gqa"], True, LAYOUTS["paged-B-shuffled"], dtype=torch.float16)
    out, _ = case.run()
    torch.testing.assert_close(out.double(), case.expected()[0], atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("layout", ["contiguous", "paged-3-shuffled"])
def test_prompt_prefilled_in_chunks_equals_one_moba_attn(layout):
    chunks = [5, 1, 9, 1, 1]
    whole = Case([0, 0], sum(chunks), HEADS["gqa"], True, LAYOUTS[layout], seed=7)
    sums = torch.zeros_like(whole.block_sums)
    seqlens = torch.zeros(2, dtype=torch.int32)
    outs, lses, start = [], [], 0
    for size in chunks:
        rows = slice(start, start + size)
        out, lse = flashmoba.moba_attn_with_kvcache(
            whole.q[:, rows].float(),
            whole.k_cache,
            whole.v_cache,
            sums,
            seqlens,
            BLOCK,
            TOPK,
            k=whole.k[:, rows],
            v=whole.v[:, rows],
            block_table=whole.block_table,
            backend="triton",
            return_lse=True,
        )
        outs.append(out)
        lses.append(lse)
        seqlens += size
        start += size
    expected_out, expected_lse = whole.expected()
    assert_close(torch.cat(outs, dim=1), expected_out, "kernel_float32", "o")
    assert_close(torch.cat(lses, dim=2), expected_lse, "kernel_float32", "lse")
    filled = flashmoba.kvcache_block_sums(whole.k_cache, seqlens, BLOCK, block_table=whole.block_table)
    assert_close(sums, filled, "kernel_float32", "block_sums")


# ----------------------------------------------------------------------------------------------------
# The pieces: router selection, split-K settings
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_selection_equals_moba_select_on_whole_sequences(dtype):
    # bfloat16 routes on centroids rounded to bfloat16 (to nearest, as torch and the GPU round).
    case = Case(CACHE_LENGTHS, 2 * BLOCK + 1, HEADS["gqa"], True, None, dtype, topk=TOPK + 1, seed=8)
    capacity = case.k_cache.shape[1]
    decode.decode_append(
        case.k, case.v, case.k_cache, case.v_cache, case.block_sums, case.cache_seqlens, None, BLOCK, capacity
    )
    tiles = decode.decode_tiles(
        HEAD_DIM, BLOCK, case.topk, case.block_sums.shape[1], 1, 2, case.seqlen_q, decode.DEFAULT_SM_COUNT
    )
    selected = decode.decode_route(
        case.q.to(dtype), case.block_sums, case.cache_seqlens, BLOCK, case.topk, case.seqlen_q, tiles
    )
    for b in range(case.batch):
        expected = flashmoba.moba_select(
            case.q[b : b + 1].to(dtype), case.keys[b][None].to(dtype), BLOCK, case.topk, backend="reference"
        )
        assert torch.equal(selected[b], expected[0]), f"sequence {b}"


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize(
    ("heads", "seqlen_q", "rows"),
    [((2, 2), 1, 1), ((4, 2), 1, 2), ((3, 1), 1, 4), ((4, 2), 3, 8), ((4, 1), 2, 8), ((8, 1), 2, 16)],
    ids=["mha-step", "gqa-step", "mqa-step", "gqa-3-rows", "mqa-2-rows", "16-pairs"],
)
def test_router_tiles_and_block_splits_equal_moba_select(heads, seqlen_q, rows, splits, poison_empty):
    # Blocks of one key: 48 blocks are 3 centroid tiles of 16, scored by one program or shared by 2 or 3
    # and merged. A tile of fewer (row, head) pairs than the dot's 16 rows routes only its first `rows`
    # rows: one pair (MHA, one token) up to the full 16.
    case = Case((0, 1, 2, 17, 40), seqlen_q, heads, True, None, block_size=1, topk=5, capacity=48, seed=13)
    decode.decode_append(
        case.k, case.v, case.k_cache, case.v_cache, case.block_sums, case.cache_seqlens, None, 1, 48
    )
    config = decode.DecodeConfig(route_block_n=16, route_block_splits=splits)
    group = heads[0] // heads[1]
    tiles = decode.decode_tiles(
        HEAD_DIM, 1, 5, 48, 5 * seqlen_q * heads[0], group, seqlen_q, decode.DEFAULT_SM_COUNT, config
    )
    assert (tiles["route"]["BLOCK_M"], tiles["route"]["ROWS"], tiles["block_splits"]) == (16, rows, splits)
    selected = decode.decode_route(case.q.float(), case.block_sums, case.cache_seqlens, 1, 5, seqlen_q, tiles)
    for b in range(case.batch):
        expected = flashmoba.moba_select(case.q[b : b + 1], case.keys[b][None], 1, 5, backend="reference")
        assert torch.equal(selected[b], expected[0]), f"sequence {b}"


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize(
    ("heads", "seqlen_q", "new_kv"),
    [((3, 3), 1, True), ((3, 3), 1, False), ((4, 2), 1, True), ((2, 1), 3, True)],
    ids=["mha-step", "mha-cached", "gqa-step", "mqa-3-rows"],
)
def test_attention_merges_the_router_splits(heads, seqlen_q, new_kv, splits, monkeypatch, poison_empty):
    # The by-head attention merges each pair's split lists (route_merge_in_attention): the route merge
    # kernel is not launched, and the step equals the reference and, bit for bit, the step with it.
    # Blocks of one key: 3 centroid tiles of 16 shared by 2 or 3 router programs.
    lengths = (0, 1, 2, 17, 40) if new_kv else (1, 2, 3, 17, 40)

    def new_case():  # a step appends in place: each run gets its own copy of the caches
        return Case(lengths, seqlen_q, heads, new_kv, None, block_size=1, topk=5, capacity=48, seed=16)

    fields = dict(route_block_n=16, route_block_splits=splits, attn_by_group=False)
    merged_apart = decode.moba_decode_triton(
        *new_case().triton_arguments(HEAD_DIM**-0.5),
        decode.DecodeConfig(**fields, route_merge_in_attention=False),
    )
    case = new_case()

    def no_merge(*args, **kwargs):
        raise AssertionError("the route merge kernel is launched")

    monkeypatch.setattr(decode, "_decode_route_merge_kernel", NoLaunch(no_merge))
    config = decode.DecodeConfig(**fields)
    tiles = decode.decode_tiles(
        HEAD_DIM,
        1,
        5,
        48,
        5 * seqlen_q * heads[0],
        heads[0] // heads[1],
        seqlen_q,
        decode.DEFAULT_SM_COUNT,
        config,
    )
    assert tiles["route_merge_in_attention"] and tiles["block_splits"] == splits
    out, lse = decode.moba_decode_triton(*case.triton_arguments(HEAD_DIM**-0.5), config)
    expected_out, expected_lse = case.expected()
    assert_close(out, expected_out, "kernel_float32", "o")
    assert_close(lse, expected_lse, "kernel_float32", "lse")
    assert torch.equal(out, merged_apart[0]) and torch.equal(lse, merged_apart[1])


def test_one_row_router_settings_at_the_benchmark_s_16_16_heads():
    # One (row, head) pair per program (16 / 16 heads, d 64, one token): 2 warps, splits towards 8
    # programs per SM merged by the by-head attention; 4 warps only for an unsplit launch of fewer
    # programs than SMs (batch 8 at 8K: one centroid tile).
    def settings(batch, max_blocks):
        tiles = decode.decode_tiles(64, 128, 8, max_blocks, batch * 16, 1, 1, 132)
        assert tiles["route"]["ROWS"] == 1
        return tiles["route"]["num_warps"], tiles["block_splits"], tiles["route_merge_in_attention"]

    assert settings(8, 64) == (4, 1, False)
    assert settings(8, 256) == (2, 4, True) and settings(8, 1024) == (2, 8, True)
    assert settings(32, 1024) == (2, 1, False) and settings(64, 64) == (2, 1, False)
    # The group kernel keeps the route merge kernel.
    assert not decode.decode_tiles(128, 128, 8, 1024, 8 * 32, 4, 1, 132)["route_merge_in_attention"]


def test_router_split_heuristic_splits_the_centroids_of_small_batches_only():
    # 1M keys in blocks of 128: 8192 centroids, 128 tiles of 64 per (sequence, kv head).
    small = decode.decode_tiles(128, 128, 8, 8192, rows=32, group=4, seqlen_q=1, sm_count=132)
    large = decode.decode_tiles(128, 128, 8, 8192, rows=64 * 32, group=4, seqlen_q=1, sm_count=132)
    short = decode.decode_tiles(128, 128, 8, 256, rows=32, group=4, seqlen_q=1, sm_count=132)
    single = decode.decode_tiles(128, 128, 8, 64, rows=32, group=4, seqlen_q=1, sm_count=132)
    assert (small["block_splits"], small["tiles_per_split"]) == (16, 8)
    assert large["block_splits"] == 1 and single["block_splits"] == 1  # enough programs; one tile
    assert (short["block_splits"], short["tiles_per_split"]) == (4, 1)
    # Batch 8 (64 router programs): about two programs per SM, a quarter of the tiles per split (1-4).
    for max_blocks, expected in [(256, (4, 1)), (512, (4, 2)), (1024, (4, 4)), (4096, (5, 13))]:
        tiles = decode.decode_tiles(128, 128, 8, max_blocks, rows=8 * 32, group=4, seqlen_q=1, sm_count=132)
        assert (tiles["block_splits"], tiles["tiles_per_split"]) == expected, max_blocks


def test_bfloat16_centroids_round_to_nearest():
    # Centroids 1 + 0.75 ulp and 1 + 0.25 ulp (ulp = 2**-7 at 1): to nearest they are 1 + ulp and 1, so
    # block 0 wins; truncated (as Triton's interpreter does in .to) they would tie and block 1 would win.
    ulp = 2.0**-7
    sums = torch.zeros(1, 3, 1, 1)
    sums[0, :2, 0, 0] = torch.tensor([1 + 0.75 * ulp, 1 + 0.25 * ulp]) * BLOCK
    q = torch.ones(1, 1, 1, 1, dtype=torch.bfloat16)
    seqlens = torch.tensor([2 * BLOCK + 1], dtype=torch.int32)
    tiles = decode.decode_tiles(1, BLOCK, 2, 3, 1, 1, 1, decode.DEFAULT_SM_COUNT)
    selected = decode.decode_route(q, sums, seqlens, BLOCK, 2, 0, tiles)
    assert selected.flatten().tolist() == [0, 2]
    centroids = (sums[0, :2] / BLOCK).to(torch.bfloat16).float()  # the reference's rule, in torch
    assert centroids.flatten().tolist() == [1 + ulp, 1.0]


@pytest.mark.parametrize(
    "config",
    [decode.DecodeConfig(num_splits=1), decode.DecodeConfig(num_splits=2, attn_block_n=2, route_block_n=16)],
    ids=["one-split", "two-splits-tiles-of-2"],
)
def test_launch_settings_do_not_change_the_result(config, poison_empty):
    case = Case(CACHE_LENGTHS, 3, HEADS["gqa"], True, LAYOUTS["paged-3-shuffled"], topk=4, seed=9)
    out, lse = decode.moba_decode_triton(*case.triton_arguments(HEAD_DIM**-0.5), config)
    expected_out, expected_lse = case.expected()
    assert_close(out, expected_out, "kernel_float32", "o")
    assert_close(lse, expected_lse, "kernel_float32", "lse")


BY_HEAD = decode.DecodeConfig(attn_by_group=False)


def test_split_heuristic_splits_small_batches_only():
    shape = dict(head_dim=128, block_size=128, topk=8, max_blocks=256, group=4, seqlen_q=1, sm_count=132)
    small = decode.decode_tiles(**shape, rows=32, config=BY_HEAD)
    large = decode.decode_tiles(**shape, rows=64 * 32, config=BY_HEAD)
    assert small["num_splits"] == 8 and small["slots_per_split"] == 1
    assert large["num_splits"] == 1 and large["slots_per_split"] == 8
    odd = decode.decode_tiles(64, 128, 8, 256, rows=100, group=1, seqlen_q=1, sm_count=132, config=BY_HEAD)
    assert odd["num_splits"] * odd["slots_per_split"] >= 8 > (odd["num_splits"] - 1) * odd["slots_per_split"]
    # By group: a split holds entries (query head, slot) of the group's 4 * 8, towards 4 programs per SM.
    small, large = (decode.decode_tiles(**shape, rows=rows) for rows in (32, 64 * 32))
    assert small["attn_by_group"] and small["num_splits"] == 32 and small["entries_per_split"] == 1
    assert large["num_splits"] == 2 and large["entries_per_split"] == 16
    by_group = decode.DecodeConfig(attn_by_group=True)
    odd = decode.decode_tiles(64, 128, 8, 256, rows=100, group=1, seqlen_q=1, sm_count=132, config=by_group)
    assert (
        odd["num_splits"] * odd["entries_per_split"] >= 8 > (odd["num_splits"] - 1) * odd["entries_per_split"]
    )


def test_attention_kernel_and_key_tiles_by_shape():
    # By group where a kv head has several query heads, by query head for one (unless a config says);
    # the group kernel's key tiles hold a block of 128 keys within 32 KB per K tile.
    def tiles(head_dim, group, config=decode.DEFAULT_DECODE_CONFIG, element_size=2, block_size=128):
        return decode.decode_tiles(
            head_dim, block_size, 8, 1024, 8 * 32, group, 1, 132, config, element_size=element_size
        )

    assert tiles(128, 4)["attn_by_group"] and tiles(128, 4)["attention"]["BLOCK_N"] == 128
    assert tiles(128, 4, element_size=4)["attention"]["BLOCK_N"] == 64  # float32
    assert tiles(256, 4)["attention"]["BLOCK_N"] == 64
    assert tiles(128, 4, block_size=32)["attention"]["BLOCK_N"] == 32
    # By query head: tiles of 8192 elements, at most 128 keys (a whole B=128 block at head_dim 64).
    assert not tiles(64, 1)["attn_by_group"] and tiles(64, 1)["attention"]["BLOCK_N"] == 128
    assert tiles(64, 1, block_size=64)["attention"]["BLOCK_N"] == 64
    assert tiles(32, 1)["attention"]["BLOCK_N"] == 128
    assert tiles(64, 1, decode.DecodeConfig(attn_by_group=True))["attn_by_group"]
    assert (
        not tiles(128, 4, BY_HEAD)["attn_by_group"] and tiles(128, 4, BY_HEAD)["attention"]["BLOCK_N"] == 64
    )


@pytest.fixture
def one_split(monkeypatch):
    """Every decode call of the test takes one split (the partial kernel writes o and lse itself, as at
    large batches), and launching the merge kernel fails the test."""
    monkeypatch.setattr(decode, "DEFAULT_DECODE_CONFIG", decode.DecodeConfig(num_splits=1))

    def no_merge(*args, **kwargs):
        raise AssertionError("the merge kernel is launched with one split")

    monkeypatch.setattr(decode, "_decode_merge_kernel", NoLaunch(no_merge))


class NoLaunch:
    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        return self.launch


def test_split_heuristic_takes_one_split_from_the_benchmark_s_batch_32():
    # By query head, 32 heads: batch 8 takes 2 splits (partials and the merge), batch 32 and 64 one (no
    # merge); by group (8 kv heads), 8, 3 and 2 splits of the group's 32 entries.
    shape = dict(head_dim=128, block_size=128, topk=8, max_blocks=1024, group=4, seqlen_q=1, sm_count=132)
    for batch, splits, group_splits in [(1, 8, 32), (8, 2, 8), (32, 1, 3), (64, 1, 2)]:
        tiles = decode.decode_tiles(**shape, rows=batch * 32, config=BY_HEAD)
        assert tiles["num_splits"] == splits, batch
        assert decode.decode_tiles(**shape, rows=batch * 32)["num_splits"] == group_splits, batch
    assert tiles["attention"]["NUM_STAGES"] == 2
    config = decode.DecodeConfig(attn_num_stages=3)
    assert decode.decode_tiles(128, 128, 8, 1024, 32, 4, 1, 132, config)["attention"]["NUM_STAGES"] == 3


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("layout", ["contiguous", "paged-3-shuffled"])
def test_one_split_writes_o_and_lse_without_the_merge(layout, heads, one_split, poison_empty, attention_by):
    check_float32(Case(CACHE_LENGTHS, 1, HEADS[heads], True, LAYOUTS[layout], seed=30))
    check_float32(Case(cached_lengths(2), 2, HEADS[heads], False, LAYOUTS[layout], seed=31))


def test_one_split_bfloat16_and_empty_sequences(one_split):
    case = Case(
        CACHE_LENGTHS, 1, HEADS["gqa"], True, LAYOUTS["paged-3-shuffled"], dtype=torch.bfloat16, seed=32
    )
    twin = Case(
        CACHE_LENGTHS, 1, HEADS["gqa"], True, LAYOUTS["paged-3-shuffled"], dtype=torch.bfloat16, seed=32
    )
    out, lse = case.run()
    expected_out, expected_lse = twin.run(backend="reference")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected_out.float(), **BF16_TOLERANCE)
    torch.testing.assert_close(lse, expected_lse, atol=1e-3, rtol=1e-3)
    empty = Case([0, 0, 5], 1, HEADS["mqa"], False, None)
    out, lse = empty.run()
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isneginf(lse[:2]).all() and torch.isfinite(lse[2]).all()


def test_one_split_nan_rule(one_split, poison_empty, attention_by):
    lengths = cached_lengths(2 * BLOCK + 3)
    args = (lengths, 2 * BLOCK + 3, HEADS["gqa"], False, LAYOUTS["paged-3-shuffled"])
    case, clean = Case(*args, seed=20), Case(*args, seed=20)
    set_cached(case, "v", 5, 29, 0, 3, math.nan)
    set_cached(case, "v", 5, 10, 1, 0, math.inf)
    set_cached(case, "k", 1, 5, 1, 7, math.inf)  # an inf key of sequence 1: +-inf logits
    nan_rows = check_nan_rule(case, clean, bad_seqs=(1, 5))
    assert not nan_rows[5, :2, :7].any() and nan_rows[5, :2, 7:10].all()


@pytest.mark.parametrize(
    "block_size, attn_block_n, stages",
    [(5, 2, 1), (5, 2, 2), (5, 2, 3), (3, 16, 2), (BLOCK, 4, 2)],
    ids=[
        "block-5-tiles-of-2-no-pipelining",
        "block-5-tiles-of-2",
        "block-5-3-stages",
        "tile-past-block",
        "tile-is-block",
    ],
)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_key_tile_loop_over_slots_and_partial_tiles(
    block_size, attn_block_n, stages, num_splits, poison_empty, attention_by
):
    # The flat loop over (slot, tile): several tiles per block, a last tile past the block's end, one tile
    # per block; lengths 0, 1, B - 1, B, B + 1 and a long one; both with partials and with one split.
    lengths = (0, 1, block_size - 1, block_size, block_size + 1, 30)
    case = Case(
        lengths, 1, HEADS["gqa"], True, LAYOUTS["paged-3-shuffled"], block_size=block_size, topk=4, seed=33
    )
    config = decode.DecodeConfig(attn_block_n=attn_block_n, attn_num_stages=stages, num_splits=num_splits)
    out, lse = decode.moba_decode_triton(*case.triton_arguments(HEAD_DIM**-0.5), config)
    expected_out, expected_lse = case.expected()
    assert_close(out, expected_out, "kernel_float32", "o")
    assert_close(lse, expected_lse, "kernel_float32", "lse")


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_group_attends_each_shared_block_once(heads, num_splits, poison_empty):
    # The group's query heads share their selections: every block is attended at its first entry (member,
    # slot) for every member that selected it, whichever split that entry falls in. Members 0 and 1 of
    # each group get the same q (the same selection), the others their own.
    heads_q, heads_kv = HEADS[heads]
    case = Case(CACHE_LENGTHS, 2, HEADS[heads], True, LAYOUTS["paged-3-shuffled"], topk=4, seed=34)
    group = heads_q // heads_kv
    for kv_head in range(heads_kv):
        case.q[:, :, kv_head * group + 1] = case.q[:, :, kv_head * group]
    config = decode.DecodeConfig(attn_by_group=True, num_splits=num_splits)
    out, lse = decode.moba_decode_triton(*case.triton_arguments(HEAD_DIM**-0.5), config)
    expected_out, expected_lse = case.expected()
    assert_close(out, expected_out, "kernel_float32", "o")
    assert_close(lse, expected_lse, "kernel_float32", "lse")
    shared = out[:, :, [kv_head * group for kv_head in range(heads_kv)]]
    twins = out[:, :, [kv_head * group + 1 for kv_head in range(heads_kv)]]
    assert torch.equal(shared, twins), "two members of one selection attend the same keys in one loop"


def test_group_attention_wants_dot_tiles_on_a_gpu(monkeypatch):
    monkeypatch.setattr(decode, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="attn_block_n must be >= 16 with attn_by_group"):
        decode.decode_tiles(128, 128, 8, 64, 32, 4, 1, 132, decode.DecodeConfig(attn_block_n=8))
    by_head = decode.DecodeConfig(attn_block_n=8, attn_by_group=False)
    assert decode.decode_tiles(128, 128, 8, 64, 32, 4, 1, 132, by_head)["attention"]["BLOCK_N"] == 8


# ----------------------------------------------------------------------------------------------------
# Edges, host reads, errors, the cache object
# ----------------------------------------------------------------------------------------------------


def test_empty_sequences_give_zeros_and_minus_inf():
    case = Case([0, 0, 5], 2, HEADS["gqa"], False, LAYOUTS["paged-B-shuffled"])
    out, lse = case.run()
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isneginf(lse[:2]).all() and torch.isfinite(lse[2]).all()
    assert_close(out, case.expected()[0], "kernel_float32", "o")


def test_no_queries_and_no_sequences():
    case = Case([0, 3], 0, HEADS["gqa"], True)
    out, lse = case.run()
    assert out.shape == (2, 0, 4, HEAD_DIM) and lse.shape == (2, 4, 0)
    q = torch.zeros(0, 1, 4, HEAD_DIM)
    cache = torch.zeros(0, CAPACITY, 2, HEAD_DIM)
    sums = flashmoba.kvcache_block_sums(cache, torch.zeros(0, dtype=torch.int32), BLOCK)
    out, lse = flashmoba.moba_attn_with_kvcache(
        q,
        cache,
        cache.clone(),
        sums,
        torch.zeros(0, dtype=torch.int32),
        BLOCK,
        TOPK,
        backend="triton",
        return_lse=True,
    )
    assert out.shape == (0, 1, 4, HEAD_DIM) and lse.shape == (0, 4, 1) and lse.dtype == torch.float32


def test_no_value_is_read_on_the_host(monkeypatch):
    case = Case(CACHE_LENGTHS, 1, HEADS["gqa"], True, LAYOUTS["paged-3-shuffled"], seed=10)
    watched = {id(case.cache_seqlens), id(case.block_table)}

    def refuse(name):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, **kwargs):
            if id(self) in watched:
                raise AssertionError(f"{name}() read a device value on the host")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)

    for name in ("tolist", "item", "__bool__", "__int__", "__index__"):
        refuse(name)
    case.run()
    monkeypatch.undo()
    check_float32(Case(CACHE_LENGTHS, 1, HEADS["gqa"], True, LAYOUTS["paged-3-shuffled"], seed=10))


def test_float64_is_the_reference_s():
    case = Case(CACHE_LENGTHS, 1, HEADS["gqa"], True, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' supports float16, bfloat16 and float32"):
        case.run()
    # auto on CPU tensors is the reference, float64 included.
    out, _ = case.run(backend="auto")
    assert_close(out, case.expected()[0], "float64", "o")


def test_no_backward():
    case = Case(CACHE_LENGTHS, 1, HEADS["gqa"], True)
    case.q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="moba_attn_with_kvcache has no backward.* but q require grad"):
        case.run()


def test_unsupported_topk_is_named():
    case = Case((0, 3), 1, HEADS["mqa"], True, None, block_size=1, topk=200, capacity=300)
    with pytest.raises(ValueError, match="keeps at most 128 blocks per query on chip"):
        case.run()


def test_cache_object_steps_reorder_and_reset_match_the_reference_object():
    generator = torch.Generator().manual_seed(11)
    caches = [
        MoBAKVCache(3, 23, 2, 8, block_size=4, topk=2, dtype=torch.float32, backend=backend)
        for backend in ("triton", "reference")
    ]

    def step(length):
        batch = caches[0].batch_size
        q = torch.randn(batch, length, 4, 8, generator=generator)
        k, v = torch.randn(2, batch, length, 2, 8, generator=generator)
        outs = [cache.append_and_attend(q, k, v) for cache in caches]
        assert_close(outs[0], outs[1], "kernel_float32", f"chunk of {length}")

    for length in (5, 1, 3):
        step(length)
    for cache in caches:
        cache.reorder(torch.tensor([2, 0, 0, 1]))
    assert caches[0].seqlens.tolist() == [9] * 4
    step(1)
    assert_close(caches[0].block_sums, caches[1].block_sums, "kernel_float32", "block_sums")
    for cache in caches:
        cache.reset()
    assert not caches[0].block_sums.any() and caches[0].seqlens.tolist() == [0] * 4
    step(2)


# ----------------------------------------------------------------------------------------------------
# NaN, inf and overflow (flashmoba.reference's NaN rule) against the reference backend
# ----------------------------------------------------------------------------------------------------


def locate(case, b, position):
    """(page, slot) of sequence b's key at position: (b, position) in a contiguous cache."""
    if case.block_table is None:
        return b, position
    return int(case.block_table[b, position // case.page_size]), position % case.page_size


def set_cached(case, name, b, position, head, dim, value):
    """Put value at (position, kv head, dim) of sequence b's cached k or v; block_sums follow the cache."""
    cache = case.k_cache if name == "k" else case.v_cache
    cache[(*locate(case, b, position), head, dim)] = value
    case.block_sums = flashmoba.kvcache_block_sums(
        case.k_cache, case.cache_seqlens, case.block_size, block_table=case.block_table
    )


def reference_inputs(case, dtype):
    """moba_attn_with_kvcache's arguments for the reference backend: copies of the case's inputs in dtype."""
    k_cache, v_cache = case.k_cache.to(dtype), case.v_cache.to(dtype)
    return dict(
        q=case.q.to(case.dtype).to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        block_sums=flashmoba.kvcache_block_sums(
            k_cache, case.cache_seqlens, case.block_size, block_table=case.block_table
        ),
        cache_seqlens=case.cache_seqlens.clone(),
        block_size=case.block_size,
        topk=case.topk,
        k=None if case.k is None else case.k.to(dtype),
        v=None if case.v is None else case.v.to(dtype),
        block_table=case.block_table,
        backend="reference",
        return_lse=True,
    )


def check_nan_rule(case, clean, bad_seqs, reference_dtype=torch.float64, routing_unchanged=False):
    """case (with bad entries) on the Triton backend against the reference backend on the same inputs: the
    same NaN rows (whole rows of o, and lse), the reference's values elsewhere; sequences other than
    bad_seqs bitwise as in clean (the same case without the bad entries), and with routing_unchanged (bad
    entries in v only) every row that is not NaN too. Returns the NaN mask of lse [batch, Hq, T]."""
    expected_out, expected_lse = flashmoba.moba_attn_with_kvcache(**reference_inputs(case, reference_dtype))
    out, lse = case.run()
    nan_rows = expected_lse.isnan()
    assert torch.equal(lse.isnan(), nan_rows), "NaN rows of lse"
    assert torch.equal(out.isnan(), expected_out.isnan()), "NaN entries of o"
    assert torch.equal(out.isnan().all(-1), nan_rows.transpose(1, 2)), "a NaN row is NaN in every column"
    assert not torch.isinf(out).any()
    bad = nan_rows[list(bad_seqs)]  # each case poisons some rows of its bad sequences, not all
    assert bad.any() and not bad.all(), f"NaN rows of sequences {bad_seqs}: {bad.tolist()}"
    assert_close(out.nan_to_num(0.0), expected_out.nan_to_num(0.0), "kernel_float32", "o")
    assert_close(lse.nan_to_num(0.0), expected_lse.nan_to_num(0.0), "kernel_float32", "lse")
    clean_out, clean_lse = clean.run()
    for b in range(case.batch):
        if b not in bad_seqs:
            assert torch.equal(out[b], clean_out[b]) and torch.equal(lse[b], clean_lse[b]), f"sequence {b}"
    if routing_unchanged:
        kept = ~nan_rows.transpose(1, 2)  # [batch, T, Hq]
        assert torch.equal(out[kept], clean_out[kept]), "rows that do not see the bad entries, bitwise"
        assert torch.equal(lse[~nan_rows], clean_lse[~nan_rows])
    return nan_rows


@pytest.mark.parametrize("layout", ["contiguous", "paged-3-shuffled"])
def test_nan_and_inf_in_cached_values(layout, poison_empty, attention_by):
    # A chunk of 11 rows over cached keys: sequence 5 (33 keys) has rows at positions 22..32.
    lengths = cached_lengths(2 * BLOCK + 3)
    args = (lengths, 2 * BLOCK + 3, HEADS["gqa"], False, LAYOUTS[layout])
    case, clean = Case(*args, seed=20), Case(*args, seed=20)
    set_cached(case, "v", 5, 29, 0, 3, math.nan)  # block 7: rows 22..28 do not see it, 29..32 do
    set_cached(case, "v", 5, 10, 1, 0, math.inf)  # block 2: a candidate some heads select, others not
    set_cached(case, "v", 1, 5, 1, 7, -math.inf)  # sequence 1 (11 keys, rows 0..10): rows 5.. see it
    nan_rows = check_nan_rule(case, clean, bad_seqs=(1, 5), routing_unchanged=True)
    # Kv head 0 (query heads 0, 1) of sequence 5: not the rows before position 29, those of its block.
    assert not nan_rows[5, :2, :7].any() and nan_rows[5, :2, 7:10].all()
    assert not nan_rows[1, 2:, :5].any() and nan_rows[1, 2:, 5:8].all()


def test_nan_and_inf_in_new_keys_and_values(poison_empty):
    # Chunked prefill with the bad entries in the k and v passed with the call: a NaN value after some rows
    # of its own block, and an inf key (its block's centroid is inf: +-inf or NaN scores).
    seqlen_q = 2 * BLOCK + 3
    args = (CACHE_LENGTHS, seqlen_q, HEADS["gqa"], True, LAYOUTS["paged-3-shuffled"])
    case, clean = Case(*args, capacity=48, seed=21), Case(*args, capacity=48, seed=21)
    case.v[4, 6, 0, 2] = math.nan  # sequence 4: 5 cached keys, new ones at positions 5..15; this at 11
    case.k[5, 2, 1, 4] = math.inf  # sequence 5: 33 cached keys, new ones at 33..43; this at 35 (block 8)
    case.v[5, 9, 1, 1] = -math.inf  # at 42 (block 10, the last rows' own block)
    nan_rows = check_nan_rule(case, clean, bad_seqs=(4, 5))
    assert nan_rows[4, :2, :6].sum() == 0 and nan_rows[4, :2, 6:8].all()  # rows at positions 5..10, 11, 12
    assert nan_rows[5, 2:, 2].all() and not nan_rows[5, 2:, :2].any()  # the inf key at 35, own block
    assert nan_rows[5, 2:, 9:].all() and not nan_rows[5, :2].any()  # the -inf value at 42
    # Appended as they are: the NaN value at 11 of sequence 4, the inf key at 35 and -inf value at 42 of 5.
    assert case.v_cache[(*locate(case, 4, 11), 0, 2)].isnan()
    assert case.k_cache[(*locate(case, 5, 35), 1, 4)] == math.inf
    assert case.v_cache[(*locate(case, 5, 42), 1, 1)] == -math.inf


def test_nan_and_inf_in_q_poison_their_row_only(poison_empty, attention_by):
    # One decode step: a NaN, a -inf (-inf or NaN logits) and an inf in q of single (row, head) pairs;
    # sequence 0 is empty, so its row sees nothing whatever its q: zeros and lse -inf.
    args = (cached_lengths(2), 2, HEADS["gqa"], False, LAYOUTS["paged-B-shuffled"])
    case, clean = Case(*args, seed=22), Case(*args, seed=22)
    case.q[0, 0, 1, 0] = math.nan
    case.q[2, 1, 3, 5] = math.nan
    case.q[4, 0, 0, 2] = -math.inf
    case.q[5, 1, 2, 0] = math.inf
    nan_rows = check_nan_rule(case, clean, bad_seqs=(2, 4, 5), routing_unchanged=False)
    assert nan_rows.sum() == 3 and nan_rows[2, 3, 1] and nan_rows[4, 0, 0] and nan_rows[5, 2, 1]
    out, lse = case.run()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_nan_and_inf_in_cached_keys(heads, poison_empty, attention_by):
    # A NaN key makes its block's centroid NaN: every row with that block as a candidate ranks it first
    # and is NaN, as in the reference. An inf key gives +inf scores to some heads (selected, NaN) and -inf
    # to others (not selected when better candidates exist; selected where they do not).
    lengths = cached_lengths(3)  # sequence 4: 5 keys, rows at 2..4; sequence 5: 33 keys, rows at 30..32
    args = (lengths, 3, HEADS[heads], False, None)
    case, clean = Case(*args, seed=23), Case(*args, seed=23)
    heads_kv = HEADS[heads][1]
    set_cached(case, "k", 5, 6, 0, 1, math.nan)  # block 1 of sequence 5
    set_cached(case, "k", 5, 17, heads_kv - 1, 4, math.inf)  # block 4
    set_cached(case, "k", 5, 18, heads_kv - 1, 5, -math.inf)  # and -inf in another dim: inf - inf
    set_cached(case, "k", 4, 0, heads_kv - 1, 2, -math.inf)  # block 0 of sequence 4, the only candidate
    set_cached(case, "k", 3, 3, 0, 0, math.nan)  # sequence 3: 4 keys, rows at 1..3: the last sees it
    nan_rows = check_nan_rule(case, clean, bad_seqs=(3, 4, 5))
    group = HEADS[heads][0] // heads_kv
    assert nan_rows[5, :group].all()  # the NaN centroid's kv head: every row selects block 1
    assert nan_rows[4, -group:].all() and nan_rows[3, :group, 2].all() and not nan_rows[3, :, :2].any()


def test_overflowing_logits_poison_the_row(poison_empty):
    # A finite key of magnitude 1e37: q . k overflows float32 for a row whose q is 2 everywhere, not for the
    # other rows (random q). The reference computes in float32 here, as the kernels do.
    args = (cached_lengths(3), 3, HEADS["gqa"], False, None)
    case, clean = Case(*args, seed=24), Case(*args, seed=24)
    for dim in range(HEAD_DIM):
        set_cached(case, "k", 5, 31, 1, dim, 1e37)  # in the own block of rows 31 and 32
    case.q[5, 2, 2] = 2.0  # row at 32, query head 2 (kv head 1): q . k = 4.8e38
    case.q[5, 1, 3] = 2.0  # row at 31: sees the key too
    case.q[5, 0, 2] = 2.0  # row at 30: does not see it (a later key of its own block)
    case.q[5, 1, 2] = 0.5  # row at 31: q . k = 1.2e38, a finite logit that dominates the row
    nan_rows = check_nan_rule(case, clean, bad_seqs=(5,), reference_dtype=torch.float32)
    assert nan_rows[5].nonzero().tolist() == [[2, 2], [3, 1]]
    out, lse = case.run()
    assert 1e37 < lse[5, 2, 1] < 1e38


@pytest.mark.parametrize("splits", [1, 2])
def test_router_ranks_nan_and_inf_scores_as_the_reference(splits):
    # Blocks of one key, so each cached key is a centroid: NaN keys (NaN scores), +-inf entries (+-inf
    # scores, NaN where q is 0 there or where +inf and -inf meet: x86 makes those NaN negative), NaN and
    # -inf in q. The selection must equal moba_select's reference (candidate -inf beats non-candidates,
    # NaN ranks first, ties to the later block), on one centroid tile walk and on a split one.
    case = Case((0, 1, 2, 17, 40), 3, HEADS["gqa"], True, None, block_size=1, topk=5, capacity=48, seed=25)
    keys = case.keys
    keys[4][7, 0, 2] = keys[4][30, 0, 2] = math.nan  # two NaN centroids: the tie goes to the later one
    keys[4][12, 1, 3] = math.inf
    keys[4][12, 1, 4] = -math.inf
    keys[4][20, 0, 0] = -math.inf
    keys[4][21, 1, 5] = math.inf
    keys[3][3, 1, 6] = -math.inf
    case.q[4, 0, 2, 5] = 0.0  # inf * 0
    case.q[4, 1, 1, 3] = math.nan
    case.q[3, 2, 3, 6] = 1.0  # -inf scores for sequence 3's block 3
    case.q[3, 1, 0, 0] = -math.inf
    case.k = torch.stack([k[k.shape[0] - 3 :] for k in keys]).float()
    for b, length in enumerate(case.cache_seqlens.tolist()):
        index = case.index(b, length)
        case.k_cache[index] = keys[b][:length].float()
    case.block_sums = flashmoba.kvcache_block_sums(case.k_cache, case.cache_seqlens, 1)
    decode.decode_append(
        case.k, case.v, case.k_cache, case.v_cache, case.block_sums, case.cache_seqlens, None, 1, 48
    )
    config = decode.DecodeConfig(route_block_n=16, route_block_splits=splits)
    tiles = decode.decode_tiles(HEAD_DIM, 1, 5, 48, 5 * 3 * 4, 2, 3, decode.DEFAULT_SM_COUNT, config)
    assert tiles["block_splits"] == splits
    selected = decode.decode_route(case.q.float(), case.block_sums, case.cache_seqlens, 1, 5, 3, tiles)
    for b in range(case.batch):
        expected = flashmoba.moba_select(
            case.q[b : b + 1].float(), keys[b][None].float(), 1, 5, backend="reference"
        )
        assert torch.equal(selected[b], expected[0]), f"sequence {b}: {selected[b]} {expected[0]}"
    nan_first = (selected[4, :, :2] == 7).any(-1) & (selected[4, :, :2] == 30).any(-1)  # NaN centroids
    assert nan_first.sum() == 5 and not nan_first[1, 1]  # every kv head 0 row but the NaN q's


# ----------------------------------------------------------------------------------------------------
# The append folded into the route kernel (DecodeConfig.fold_append)
# ----------------------------------------------------------------------------------------------------

# Ragged around one block: empty, one key, B - 1, B (the token opens a block), B + 1, and a long one.
FOLD_LENGTHS = (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 33)


@pytest.fixture
def folded(monkeypatch):
    """Every decode call of the test folds one-token appends into the route kernel, and launching the
    append kernel for one fails the test (chunks of several tokens still launch it)."""
    monkeypatch.setattr(decode, "DEFAULT_DECODE_CONFIG", decode.DecodeConfig(fold_append=True))
    append_kernel = decode._decode_append_kernel

    class OneTokenRefused:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert kwargs["seqlen_q"] > 1, "the append kernel is launched for a one-token step"
                return append_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(decode, "_decode_append_kernel", OneTokenRefused())


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_folded_append_one_token_steps(layout, heads, folded, poison_empty):
    check_float32(Case(FOLD_LENGTHS, 1, HEADS[heads], True, LAYOUTS[layout], seed=40))


@pytest.mark.parametrize(
    "config",
    [
        decode.DecodeConfig(fold_append=True, num_splits=1),
        decode.DecodeConfig(fold_append=True, route_block_splits=2, route_block_n=16, num_splits=2),
        decode.DecodeConfig(fold_append=True, route_block_m=16),
    ],
    ids=["one-split", "split-router", "two-row-tiles"],
)
def test_folded_append_with_other_launch_settings(config, monkeypatch, poison_empty):
    """The folded append under one attention split, a split router (the append programs follow both
    splits' programs in the grid) and two router row tiles of 16 of a 32-head group (row tile 1's
    append programs do nothing); the append kernel never launches."""
    monkeypatch.setattr(decode, "_decode_append_kernel", NoLaunch(_refuse_append))
    # 70 keys: 18 blocks, two centroid tiles of 16 for the split router.
    lengths = (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 70)
    heads = (32, 1) if config.route_block_m == 16 else HEADS["gqa"]
    case = Case(lengths, 1, heads, True, LAYOUTS["paged-3-shuffled"], capacity=80, seed=41)
    out, lse = _triton_step(case, config)
    expected_out, expected_lse = case.expected()
    assert_close(out, expected_out, "kernel_float32", "o")
    assert_close(lse, expected_lse, "kernel_float32", "lse")
    case.check_appended()


def _refuse_append(*args, **kwargs):
    raise AssertionError("the append kernel is launched with the folded append")


def _triton_step(case, config):
    return decode.moba_decode_triton(*case.triton_arguments(HEAD_DIM**-0.5), config)


@pytest.mark.parametrize("layout", ["contiguous", "paged-B-shuffled"])
def test_folded_append_bfloat16_equals_the_append_kernel(layout, monkeypatch):
    """bfloat16: the folded step writes the same caches and block_sums and returns the same o and lse as
    the step through the append kernel (the same code, bit for bit)."""
    case = Case(FOLD_LENGTHS, 1, HEADS["mqa"], True, LAYOUTS[layout], dtype=torch.bfloat16, seed=42)
    twin = Case(FOLD_LENGTHS, 1, HEADS["mqa"], True, LAYOUTS[layout], dtype=torch.bfloat16, seed=42)
    expected_out, expected_lse = _triton_step(twin, decode.DecodeConfig(fold_append=False))
    monkeypatch.setattr(decode, "_decode_append_kernel", NoLaunch(_refuse_append))
    out, lse = _triton_step(case, decode.DecodeConfig(fold_append=True))
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    for name in ("k_cache", "v_cache", "block_sums"):
        torch.testing.assert_close(getattr(case, name), getattr(twin, name), rtol=0, atol=0, equal_nan=True)
    case.check_appended()


def test_chunks_keep_the_append_kernel(folded, poison_empty):
    """seqlen_q > 1 appends through the append kernel (the fixture lets it launch for chunks only)."""
    check_float32(Case(FOLD_LENGTHS, 3, HEADS["gqa"], True, LAYOUTS["paged-3-shuffled"], seed=43))


def test_fold_append_is_a_bool_of_the_config():
    assert decode.decode_tiles(128, 128, 8, 64, 32, 4, 1, 132)["fold_append"] is decode.DEFAULT_FOLD_APPEND
    config = decode.DecodeConfig(fold_append=True)
    assert decode.decode_tiles(128, 128, 8, 64, 32, 4, 1, 132, config)["fold_append"] is True
    with pytest.raises(TypeError, match="fold_append must be a bool"):
        decode.DecodeConfig(fold_append=1)


def test_pdl_is_chosen_only_where_the_device_takes_it():
    def pdl(config=decode.DEFAULT_DECODE_CONFIG, supported=True):
        return decode.decode_tiles(128, 128, 8, 64, 32, 4, 1, 132, config, pdl_supported=supported)["pdl"]

    assert pdl() is decode.DEFAULT_PDL
    assert pdl(decode.DecodeConfig(pdl=False)) is False
    assert pdl(decode.DecodeConfig(pdl=True), supported=False) is False  # a request, not a demand
    assert pdl(supported=False) is False
    assert not supports_pdl(torch.device("cpu"))  # and never in the interpreter
    with pytest.raises(TypeError, match="pdl must be a bool"):
        decode.DecodeConfig(pdl=1)
    with pytest.raises(ValueError, match="num_splits"):
        decode.DecodeConfig(num_splits=0)


def test_bool_fields_are_read_from_the_type_hints():
    from flashmoba._checks import bool_fields
    from flashmoba.ops import KernelConfig

    assert bool_fields(decode.DecodeConfig) == {
        "fold_append",
        "attn_by_group",
        "route_merge_in_attention",
        "pdl",
    }
    assert bool_fields(KernelConfig) == {"router_filter", "partials_in_input_dtype", "dq_by_stored_partials"}
