"""MoBAKVCache is moba_attn_with_kvcache with its arguments kept for you: every call equals calling the
function by hand on tensors allocated the same way, in float64; reorder gathers along the batch, reset
empties, and a refused call leaves the lengths where they were."""

from __future__ import annotations

import pytest
import torch

import flashmoba
from flashmoba import MoBAKVCache, moba_attn, moba_attn_with_kvcache

BATCH, CAPACITY, HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK, TOPK = 3, 23, 4, 2, 5, 4, 2
CHUNKS = (5, 1, 1, 3, 1)  # a prefill chunk, decode steps, a verification chunk: crosses several blocks


def new_cache(batch: int = BATCH) -> MoBAKVCache:
    return MoBAKVCache(
        batch,
        CAPACITY,
        HEADS_KV,
        HEAD_DIM,
        block_size=BLOCK,
        topk=TOPK,
        dtype=torch.float64,
        backend="reference",
    )


def randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def chunk_inputs(generator, batch: int, length: int):
    return (
        randn(generator, batch, length, HEADS_Q, HEAD_DIM),
        randn(generator, batch, length, HEADS_KV, HEAD_DIM),
        randn(generator, batch, length, HEADS_KV, HEAD_DIM),
    )


def test_is_exported_and_allocates_the_function_s_arguments():
    assert flashmoba.MoBAKVCache is MoBAKVCache and "MoBAKVCache" in flashmoba.__all__
    cache = new_cache()
    assert cache.k_cache.shape == cache.v_cache.shape == (BATCH, CAPACITY, HEADS_KV, HEAD_DIM)
    assert cache.k_cache.dtype == torch.float64
    assert cache.block_sums.shape == (BATCH, -(-CAPACITY // BLOCK), HEADS_KV, HEAD_DIM)
    assert cache.block_sums.dtype == torch.float64
    assert cache.seqlens.dtype == torch.int32 and cache.seqlens.tolist() == [0] * BATCH
    assert MoBAKVCache(1, 8, 1, 4, block_size=4, topk=2).block_sums.dtype == torch.float32


def test_append_and_attend_equals_the_function_called_by_hand_and_moba_attn():
    generator = torch.Generator().manual_seed(0)
    cache = new_cache()
    k_cache, v_cache = torch.zeros_like(cache.k_cache), torch.zeros_like(cache.v_cache)
    block_sums, seqlens = torch.zeros_like(cache.block_sums), torch.zeros(BATCH, dtype=torch.int32)
    queries, keys, values, outs = [], [], [], []
    for length in CHUNKS:
        q, k, v = chunk_inputs(generator, BATCH, length)
        out, lse = cache.append_and_attend(q, k, v, return_lse=True)
        want, want_lse = moba_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            block_sums,
            seqlens,
            BLOCK,
            TOPK,
            k=k,
            v=v,
            backend="reference",
            return_lse=True,
        )
        seqlens += length
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        for mine, theirs in (
            (cache.k_cache, k_cache),
            (cache.v_cache, v_cache),
            (cache.block_sums, block_sums),
        ):
            assert torch.equal(mine, theirs)
        assert torch.equal(cache.seqlens, seqlens)
        queries.append(q), keys.append(k), values.append(v), outs.append(out)
    # And the contract behind it: the rows of moba_attn over the whole sequences.
    whole = moba_attn(torch.cat(queries, 1), torch.cat(keys, 1), torch.cat(values, 1), BLOCK, TOPK)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-12, atol=1e-12)


def test_reorder_gathers_along_the_batch_and_later_calls_follow_it():
    generator = torch.Generator().manual_seed(1)
    cache = new_cache()
    prefix = chunk_inputs(generator, BATCH, 6)
    cache.append_and_attend(*prefix)
    index = torch.tensor([2, 0, 0, 1])  # repeats and reorders: the batch grows to 4
    cache.reorder(index)
    assert cache.batch_size == 4 and cache.seqlens.tolist() == [6] * 4
    step = chunk_inputs(generator, 4, 2)
    out = cache.append_and_attend(*step)
    # By hand: the gathered prefixes, then the step.
    whole = [torch.cat([tensor[index], new], 1) for tensor, new in zip(prefix, step)]
    torch.testing.assert_close(out, moba_attn(*whole, BLOCK, TOPK)[:, -2:], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"index must hold sequence ids in \[0, 4\)"):
        cache.reorder(torch.tensor([4]))
    with pytest.raises(TypeError, match="index must be a 1-D integer"):
        cache.reorder(torch.tensor([0.0]))


def test_reset_empties_every_sequence():
    generator = torch.Generator().manual_seed(2)
    cache = new_cache()
    cache.append_and_attend(*chunk_inputs(generator, BATCH, 7))
    cache.reset()
    assert cache.seqlens.tolist() == [0] * BATCH
    assert not cache.k_cache.any() and not cache.v_cache.any() and not cache.block_sums.any()
    inputs = chunk_inputs(generator, BATCH, 3)
    assert torch.equal(cache.append_and_attend(*inputs), new_cache().append_and_attend(*inputs))


def test_a_call_past_the_capacity_is_refused_and_the_lengths_stay():
    generator = torch.Generator().manual_seed(3)
    cache = new_cache()
    cache.append_and_attend(*chunk_inputs(generator, BATCH, CAPACITY - 1))
    with pytest.raises(ValueError, match="exceeds the cache's capacity"):
        cache.append_and_attend(*chunk_inputs(generator, BATCH, 2))
    assert cache.seqlens.tolist() == [CAPACITY - 1] * BATCH


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(max_seqlen=0), ValueError, "max_seqlen"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_allocations_are_refused(kwargs, error, message):
    arguments = {**dict(batch=1, max_seqlen=8, heads_kv=1, head_dim=4, block_size=4, topk=2), **kwargs}
    with pytest.raises(error, match=message):
        MoBAKVCache(**arguments)


@pytest.mark.parametrize("prompt", [1, BLOCK - 1, BLOCK, 2 * BLOCK + 3, CAPACITY])
def test_prefill_equals_appending_the_prompt_and_decoding_continues_alike(prompt):
    """prefill (moba_attn on the prompt, then keys, values and block sums stored) leaves the cache exactly
    as append_and_attend of the same prompt does, with the same output; the steps after agree."""
    generator = torch.Generator().manual_seed(prompt)
    by_prefill, by_append = new_cache(), new_cache()
    q, k, v = chunk_inputs(generator, BATCH, prompt)
    assert torch.allclose(by_prefill.prefill(q, k, v), by_append.append_and_attend(q, k, v), atol=1e-12)
    for name in ("k_cache", "v_cache", "block_sums", "cache_seqlens"):
        assert torch.allclose(getattr(by_prefill, name), getattr(by_append, name), atol=1e-12), name
    if prompt < CAPACITY:
        step = chunk_inputs(generator, BATCH, 1)
        assert torch.allclose(
            by_prefill.append_and_attend(*step), by_append.append_and_attend(*step), atol=1e-12
        )


def test_prefill_needs_an_empty_cache_of_its_shape():
    generator = torch.Generator().manual_seed(0)
    cache = new_cache()
    q, k, v = chunk_inputs(generator, BATCH, 3)
    with pytest.raises(ValueError, match=r"k must be \[3, <= 23, 2, 5\]"):
        cache.prefill(*chunk_inputs(generator, BATCH, CAPACITY + 1))
    cache.prefill(q, k, v)
    with pytest.raises(ValueError, match="prefill needs an empty cache"):
        cache.prefill(q, k, v)
    cache.reset()
    cache.prefill(q, k, v)
    assert cache.cache_seqlens.tolist() == [3] * BATCH


# ----------------------------------------------------------------------------------------------------
# The paged cache: every call gives exactly what the contiguous cache gives for the same calls
# ----------------------------------------------------------------------------------------------------

# Equal to the block, smaller, not dividing it (blocks span pages), holding two blocks, and larger than
# a sequence can grow (one page per sequence).
PAGE_SIZES = (BLOCK, 1, 3, 5, 2 * BLOCK, CAPACITY + 9)


def new_paged(batch: int = BATCH, page_size: int = BLOCK, heads_kv: int = HEADS_KV, **kwargs) -> MoBAKVCache:
    arguments = dict(block_size=BLOCK, topk=TOPK, dtype=torch.float64, backend="reference")
    return MoBAKVCache(batch, CAPACITY, heads_kv, HEAD_DIM, page_size=page_size, **{**arguments, **kwargs})


def new_contiguous(batch: int = BATCH, heads_kv: int = HEADS_KV, **kwargs) -> MoBAKVCache:
    arguments = dict(block_size=BLOCK, topk=TOPK, dtype=torch.float64, backend="reference")
    return MoBAKVCache(batch, CAPACITY, heads_kv, HEAD_DIM, **{**arguments, **kwargs})


def inputs(generator, batch: int, length: int, heads_q: int = HEADS_Q, heads_kv: int = HEADS_KV, dtype=None):
    dtype = dtype or torch.float64
    return tuple(
        torch.randn(batch, length, heads, HEAD_DIM, generator=generator, dtype=dtype)
        for heads in (heads_q, heads_kv, heads_kv)
    )


def paged_rows(cache: MoBAKVCache, tensor: torch.Tensor) -> torch.Tensor:
    """Each sequence's first ``length`` positions read from the pool through the host's pages."""
    rows = [tensor[row].flatten(0, 1)[: cache.length] for row in cache.pages]
    return torch.stack(rows) if rows else tensor.new_zeros(0, cache.length, *tensor.shape[2:])


def check_page_invariants(cache: MoBAKVCache) -> None:
    """The bookkeeping the object promises: every row holds ceil(length / page_size) pages, the pages
    held and the free ones partition the pool, the partly filled last page a row appends to next is that
    row's alone, and block_table starts with the host's rows."""
    pages, size = cache.pages, cache.page_size
    assert all(len(row) == -(-cache.length // size) for row in pages)
    held = {page for row in pages for page in row}
    assert len(held) + cache.num_free_pages == cache.num_pages
    assert all(0 <= page < cache.num_pages for page in held)
    if cache.length % size:
        lasts = [row[-1] for row in pages]
        assert sum(row.count(last) for row in pages for last in lasts) == len(lasts), (
            "a written page is shared"
        )
    for b, row in enumerate(pages):
        assert cache.block_table[b, : len(row)].tolist() == row


def assert_same_state(paged: MoBAKVCache, contiguous: MoBAKVCache) -> None:
    """The paged cache holds exactly the contiguous cache's keys, values, lengths and block sums."""
    length = paged.length
    assert torch.equal(paged.cache_seqlens, contiguous.cache_seqlens)
    assert contiguous.cache_seqlens.tolist() == [length] * contiguous.batch_size
    assert torch.equal(paged_rows(paged, paged.k_cache), contiguous.k_cache[:, :length])
    assert torch.equal(paged_rows(paged, paged.v_cache), contiguous.v_cache[:, :length])
    blocks = contiguous.block_sums.shape[1]
    assert torch.equal(paged.block_sums[:, :blocks], contiguous.block_sums)
    assert not paged.block_sums[:, blocks:].any()  # blocks past max_seqlen (a last page's slack) stay 0
    check_page_invariants(paged)


def test_paged_allocates_a_pool_and_a_block_table():
    cache = new_paged(page_size=5)
    max_pages = -(-CAPACITY // 5)
    assert cache.paged and cache.page_size == 5 and cache.length == 0
    assert cache.k_cache.shape == cache.v_cache.shape == (BATCH * max_pages, 5, HEADS_KV, HEAD_DIM)
    assert cache.num_pages == cache.num_free_pages == BATCH * max_pages
    assert cache.block_table.dtype == torch.int32 and cache.block_table.shape == (BATCH, max_pages)
    # block_sums as moba_attn_with_kvcache sizes it: by the capacity max_pages * page_size
    assert cache.block_sums.shape == (BATCH, -(-max_pages * 5 // BLOCK), HEADS_KV, HEAD_DIM)
    assert cache.block_sums.dtype == torch.float64 and cache.max_seqlen == CAPACITY
    assert new_paged(num_pages=7).k_cache.shape[0] == 7
    assert "page_size=5" in repr(cache)
    contiguous = new_contiguous()
    assert not contiguous.paged and contiguous.block_table is None and contiguous.pages is None
    assert contiguous.length is None and contiguous.num_pages is None and contiguous.num_free_pages is None


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("heads_q, heads_kv", [(4, 2), (3, 1), (2, 2)])  # GQA, MQA, MHA
def test_paged_growth_equals_the_contiguous_cache_and_moba_attn(page_size, heads_q, heads_kv):
    generator = torch.Generator().manual_seed(page_size)
    paged, contiguous = new_paged(page_size=page_size, heads_kv=heads_kv), new_contiguous(heads_kv=heads_kv)
    queries, keys, values, outs, length = [], [], [], [], 0
    for chunk in CHUNKS + (CAPACITY - sum(CHUNKS),):  # ragged chunks, the last one filling the cache
        q, k, v = inputs(generator, BATCH, chunk, heads_q, heads_kv)
        out, lse = paged.append_and_attend(q, k, v, return_lse=True)
        want, want_lse = contiguous.append_and_attend(q, k, v, return_lse=True)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        length += chunk
        assert paged.length == length
        # Memory only as needed: the pages the keys so far fill, no more.
        assert paged.num_pages - paged.num_free_pages == BATCH * -(-length // page_size)
        assert_same_state(paged, contiguous)
        queries.append(q), keys.append(k), values.append(v), outs.append(out)
    whole = moba_attn(torch.cat(queries, 1), torch.cat(keys, 1), torch.cat(values, 1), BLOCK, TOPK)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("prompt", [1, BLOCK, 2 * BLOCK + 3])
def test_paged_prefill_then_decode_equals_the_contiguous_cache(page_size, prompt):
    generator = torch.Generator().manual_seed(100 * page_size + prompt)
    paged, contiguous, appended = (
        new_paged(page_size=page_size),
        new_contiguous(),
        new_paged(page_size=page_size),
    )
    q, k, v = inputs(generator, BATCH, prompt)
    out = paged.prefill(q, k, v)
    assert torch.equal(out, contiguous.prefill(q, k, v))
    torch.testing.assert_close(out, appended.append_and_attend(q, k, v), rtol=1e-12, atol=1e-12)
    assert paged.length == prompt
    assert paged.num_free_pages == paged.num_pages - BATCH * -(-prompt // page_size)
    assert_same_state(paged, contiguous)
    for chunk in (1, 1, 3, 1):
        step = inputs(generator, BATCH, chunk)
        assert torch.equal(paged.append_and_attend(*step), contiguous.append_and_attend(*step))
        appended.append_and_attend(*step)
        # prefill's block sums go on like those of the appended prompt
        torch.testing.assert_close(paged.block_sums, appended.block_sums, rtol=1e-12, atol=1e-12)
        assert_same_state(paged, contiguous)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("prefix", [6, 8])  # a partly filled last page (or not) at the reorder
def test_paged_reorder_repeats_and_drops_rows_and_later_appends_follow_it(page_size, prefix):
    """Beams of one sequence share its full pages and each writes its own copy of the last page: the
    steps after the reorder append different keys to the beams, which a shared written page would mix."""
    generator = torch.Generator().manual_seed(10 * page_size + prefix)
    paged, contiguous = new_paged(page_size=page_size, num_pages=60), new_contiguous()
    history = [inputs(generator, BATCH, prefix)]
    paged.append_and_attend(*history[0])
    contiguous.append_and_attend(*history[0])
    reorders = (([2, 2, 0, 2], (2, 1)), ([1, 3, 3], (3,)), ([0, 0, 2, 1, 1], (1, 2)))
    for first, (index, chunks) in zip((True, False, False), reorders):
        full, partial = divmod(paged.length, page_size)
        paged.reorder(torch.tensor(index))
        contiguous.reorder(torch.tensor(index))
        history = [[tensor[index] for tensor in chunk] for chunk in history]
        assert paged.batch_size == len(index) and paged.block_table.shape[0] == len(index)
        # Full pages are held once per distinct sequence kept (fewer where earlier beams already
        # share them), partly filled last pages once per row; dropped sequences' pages are free again.
        used, most = (
            paged.num_pages - paged.num_free_pages,
            len(set(index)) * full + len(index) * bool(partial),
        )
        assert used == most if first else used <= most
        assert_same_state(paged, contiguous)
        for chunk in chunks:
            step = inputs(generator, len(index), chunk)
            out = paged.append_and_attend(*step)
            assert torch.equal(out, contiguous.append_and_attend(*step))
            history.append(list(step))
            assert_same_state(paged, contiguous)
    # And the contract: the rows of moba_attn over the gathered whole sequences.
    whole = [torch.cat([chunk[i] for chunk in history], 1) for i in range(3)]
    torch.testing.assert_close(out, moba_attn(*whole, BLOCK, TOPK)[:, -chunks[-1] :], rtol=1e-12, atol=1e-12)


def test_paged_reset_gives_every_page_back_and_stale_pages_are_not_read():
    generator = torch.Generator().manual_seed(5)
    cache = new_paged(page_size=3)
    cache.append_and_attend(*inputs(generator, BATCH, 10))
    cache.reorder(torch.tensor([1, 1]))
    cache.reset()
    assert cache.length == 0 and cache.batch_size == 2 and cache.num_free_pages == cache.num_pages
    assert cache.pages == [[], []] and not cache.block_table.any() and not cache.block_sums.any()
    assert cache.seqlens.tolist() == [0, 0]
    assert cache.k_cache.any()  # the pool keeps the old keys: reused pages hold stale slots, never read
    fresh = new_paged(batch=2, page_size=3)
    for chunk in (4, 1, 2):
        step = inputs(generator, 2, chunk)
        assert torch.equal(cache.append_and_attend(*step), fresh.append_and_attend(*step))
    cache.reset()
    prompt = inputs(generator, 2, 5)
    assert torch.equal(cache.prefill(*prompt), new_contiguous(batch=2).prefill(*prompt))
    check_page_invariants(cache)


def test_an_exhausted_pool_refuses_the_call_and_changes_nothing():
    generator = torch.Generator().manual_seed(6)
    cache, contiguous = new_paged(page_size=BLOCK, num_pages=5), new_contiguous()
    with pytest.raises(ValueError, match=r"page pool is exhausted.* takes 6 more pages.* num_pages=5"):
        cache.append_and_attend(*inputs(generator, BATCH, BLOCK + 1))  # two pages a sequence
    with pytest.raises(ValueError, match="num_pages=5"):
        cache.prefill(*inputs(generator, BATCH, BLOCK + 1))
    assert cache.length == 0 and cache.num_free_pages == 5 and cache.pages == [[]] * BATCH
    assert not cache.block_sums.any() and not cache.seqlens.any()
    step = inputs(generator, BATCH, BLOCK - 1)
    assert torch.equal(cache.append_and_attend(*step), contiguous.append_and_attend(*step))
    before = (cache.pages, cache.block_table.clone(), cache.block_sums.clone(), cache.num_free_pages)
    with pytest.raises(ValueError, match=r"takes 3 more pages.* only 2 of num_pages=5 are free"):
        cache.append_and_attend(*inputs(generator, BATCH, 2))
    # A reorder repeating rows needs a copy of each repeat's partly filled last page: 4 copies, for the
    # 2 free pages and the 1 the dropped row frees.
    with pytest.raises(ValueError, match=r"copying 4 partly filled last pages, freeing 1.* num_pages=5"):
        cache.reorder(torch.tensor([0, 0, 0, 0, 0, 1]))
    after = (cache.pages, cache.block_table, cache.block_sums, cache.num_free_pages)
    assert before[0] == after[0] and before[3] == after[3] and cache.batch_size == BATCH
    assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])
    assert cache.length == BLOCK - 1 and cache.seqlens.tolist() == [BLOCK - 1] * BATCH
    step = inputs(generator, BATCH, 1)  # fits the pages held: the cache goes on as if nothing happened
    assert torch.equal(cache.append_and_attend(*step), contiguous.append_and_attend(*step))
    cache.reorder(torch.tensor([0, 0, 0, 0, 2]))  # full pages now: shared, nothing to copy
    contiguous.reorder(torch.tensor([0, 0, 0, 0, 2]))
    assert cache.num_free_pages == 3
    assert_same_state(cache, contiguous)


def test_a_refused_paged_call_gives_its_pages_back():
    generator = torch.Generator().manual_seed(7)
    cache = new_paged(page_size=3)
    cache.append_and_attend(*inputs(generator, BATCH, 4))
    pages, free = cache.pages, cache.num_free_pages
    q, k, v = inputs(generator, BATCH, 3)
    with pytest.raises(ValueError, match="k must have shape"):
        cache.append_and_attend(q, k[:, :, :1], v[:, :, :1])  # refused by moba_attn_with_kvcache
    with pytest.raises(ValueError, match=r"exceeds the cache's capacity of max_seqlen=23"):
        cache.append_and_attend(*inputs(generator, BATCH, CAPACITY - 3))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        cache.append_and_attend(None, k, v)
    with pytest.raises(ValueError, match="prefill needs an empty cache"):
        cache.prefill(q, k, v)
    assert cache.pages == pages and cache.num_free_pages == free and cache.length == 4
    assert cache.seqlens.tolist() == [4] * BATCH
    check_page_invariants(cache)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(page_size=0), ValueError, "page_size must be >= 1"),
        (dict(page_size=2.0), TypeError, "page_size must be an int"),
        (dict(page_size=True), TypeError, "page_size must be an int"),
        (dict(page_size=4, num_pages=0), ValueError, "num_pages must be >= 1"),
        (dict(page_size=4, num_pages="8"), TypeError, "num_pages must be an int"),
        (dict(num_pages=8), ValueError, "num_pages .* give page_size too"),
    ],
)
def test_bad_paging_arguments_are_refused(kwargs, error, message):
    arguments = {**dict(batch=1, max_seqlen=8, heads_kv=1, head_dim=4, block_size=4, topk=2), **kwargs}
    with pytest.raises(error, match=message):
        MoBAKVCache(**arguments)


def test_paged_reorder_refuses_bad_indices_and_changes_nothing():
    cache = new_paged(page_size=3)
    cache.append_and_attend(*inputs(torch.Generator().manual_seed(8), BATCH, 4))
    pages = cache.pages
    with pytest.raises(ValueError, match=r"index must hold sequence ids in \[0, 3\)"):
        cache.reorder(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"index must hold sequence ids in \[0, 3\)"):
        cache.reorder(torch.tensor([-1]))
    for index in (torch.tensor([0.0]), torch.tensor([True]), torch.tensor([[0]]), [0]):
        with pytest.raises(TypeError, match="index must be a 1-D integer"):
            cache.reorder(index)
    assert cache.pages == pages and cache.batch_size == BATCH
    cache.reorder(torch.tensor([], dtype=torch.long))  # an empty batch: every page free
    assert (
        cache.batch_size == 0 and cache.num_free_pages == cache.num_pages and cache.block_table.shape[0] == 0
    )


def test_for_layers_makes_independent_caches():
    generator = torch.Generator().manual_seed(9)
    layers = MoBAKVCache.for_layers(
        3, BATCH, CAPACITY, HEADS_KV, HEAD_DIM, block_size=BLOCK, topk=TOPK, dtype=torch.float64, page_size=4
    )
    assert len(layers) == 3 and all(layer.paged and layer.page_size == 4 for layer in layers)
    assert len({id(layer.k_cache) for layer in layers}) == 3
    layers[0].append_and_attend(*inputs(generator, BATCH, 5))
    assert layers[1].length == 0 and layers[1].num_free_pages == layers[1].num_pages
    assert not layers[1].k_cache.any() and not layers[1].block_sums.any()
    assert MoBAKVCache.for_layers(0, 1, 8, 1, 4, block_size=4, topk=2) == []
    with pytest.raises(ValueError, match="num_layers must be >= 0"):
        MoBAKVCache.for_layers(-1, 1, 8, 1, 4, block_size=4, topk=2)
    with pytest.raises(TypeError, match="num_layers must be an int"):
        MoBAKVCache.for_layers(2.0, 1, 8, 1, 4, block_size=4, topk=2)


@pytest.mark.triton
@pytest.mark.parametrize("page_size", [BLOCK, 1, 3, 2 * BLOCK, 32])
def test_paged_on_the_triton_backend_matches_contiguous_and_reads_nothing_back(page_size, count_host_reads):
    """float32 in Triton's interpreter: the paged cache against the contiguous one (both on the kernels)
    and the reference, through growth, a reorder with repeats and drops, and more steps; the object
    itself reads neither the lengths nor the block table back in append_and_attend."""
    generator = torch.Generator().manual_seed(page_size)
    batch, capacity = 3, 14
    arguments = dict(block_size=BLOCK, topk=TOPK, dtype=torch.float32)
    paging = dict(page_size=page_size, num_pages=4 * -(-capacity // page_size))  # the batch grows to 4
    paged = MoBAKVCache(batch, capacity, 1, HEAD_DIM, backend="triton", **paging, **arguments)
    contiguous = MoBAKVCache(batch, capacity, 1, HEAD_DIM, backend="triton", **arguments)
    oracle = MoBAKVCache(batch, capacity, 1, HEAD_DIM, backend="reference", **paging, **arguments)
    caches = (paged, contiguous, oracle)

    def step(chunk):
        q, k, v = inputs(generator, paged.batch_size, chunk, 2, 1, dtype=torch.float32)
        reads = count_host_reads(paged.cache_seqlens), count_host_reads(paged.block_table)
        out = paged.append_and_attend(q, k, v)
        assert reads == ([], []), "append_and_attend read the device"
        for other in caches[1:]:
            torch.testing.assert_close(out, other.append_and_attend(q, k, v), rtol=1e-5, atol=1e-5)

    for chunk in (5, 1, 3):
        step(chunk)
    for cache in caches:
        cache.reorder(torch.tensor([2, 0, 2, 2]))
    step(1)
    step(2)
    torch.testing.assert_close(paged.block_sums, oracle.block_sums, rtol=1e-5, atol=1e-5)
    check_page_invariants(paged)


def test_a_reorder_may_use_the_last_free_page_and_the_pool_then_refuses_growth():
    generator = torch.Generator().manual_seed(12)
    cache, contiguous = new_paged(page_size=BLOCK, num_pages=5), new_contiguous()
    for target in (cache, contiguous):
        target.append_and_attend(*inputs(torch.Generator().manual_seed(13), BATCH, BLOCK - 1))
        target.reorder(torch.tensor([0, 0, 0, 0, 1]))  # 3 copies: the 2 free pages and row 2's
    assert cache.num_free_pages == 0
    assert_same_state(cache, contiguous)
    step = inputs(generator, 5, 1)  # fills the last pages: nothing to take
    assert torch.equal(cache.append_and_attend(*step), contiguous.append_and_attend(*step))
    with pytest.raises(ValueError, match=r"takes 5 more pages.* only 0 of num_pages=5 are free"):
        cache.append_and_attend(*inputs(generator, 5, 1))
    assert_same_state(cache, contiguous)


@pytest.mark.parametrize(
    "block_size, page_size, topk",
    [(7, 3, 3), (7, 7, 2), (7, 10, 2), (1, 2, 4), (32, 5, 1), (32, 64, 2)],  # blocks past the capacity too
)
def test_odd_sizes_paged_equal_contiguous_and_moba_attn(block_size, page_size, topk):
    generator = torch.Generator().manual_seed(block_size * page_size)
    arguments = dict(block_size=block_size, topk=topk, dtype=torch.float64, backend="reference")
    paged = MoBAKVCache(2, CAPACITY, 1, 3, page_size=page_size, **arguments)
    contiguous = MoBAKVCache(2, CAPACITY, 1, 3, **arguments)
    history, outs = [], []
    for length in (9, 1, 2, 1, 10):
        q = torch.randn(2, length, 3, 3, generator=generator, dtype=torch.float64)
        k, v = torch.randn(2, 2, length, 1, 3, generator=generator, dtype=torch.float64)
        step = (q, k, v)
        out = paged.prefill(*step) if not history else paged.append_and_attend(*step)
        want = contiguous.prefill(*step) if not history else contiguous.append_and_attend(*step)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        history.append(step), outs.append(out)
        check_page_invariants(paged)
    whole = [torch.cat([step[i] for step in history], 1) for i in range(3)]
    torch.testing.assert_close(
        torch.cat(outs, 1), moba_attn(*whole, block_size, topk), rtol=1e-12, atol=1e-12
    )


def test_empty_batches_and_missing_new_keys():
    for page_size in (None, BLOCK):
        cache = new_paged(batch=0, page_size=page_size) if page_size else new_contiguous(batch=0)
        q, k, v = inputs(torch.Generator().manual_seed(0), 0, 3)
        assert cache.append_and_attend(q, k, v).shape == q.shape
        cache = new_paged(page_size=page_size) if page_size else new_contiguous()
        q, k, v = inputs(torch.Generator().manual_seed(0), BATCH, 3)
        with pytest.raises(TypeError, match="append_and_attend needs k and v"):
            cache.append_and_attend(q, None, None)
        assert cache.seqlens.tolist() == [0] * BATCH
