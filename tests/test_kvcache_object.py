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
