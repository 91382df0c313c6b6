"""moba_attn_with_kvcache (reference backend) against moba_attn on the whole sequences, in float64.

Caches hold NaN wherever no key was written (and unused block_table entries are -1), so that a read of a
position past a sequence's length shows up in the result.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flashmoba
from flashmoba import kvcache, reference
from tests.helpers import assert_close

BLOCK = 4
TOPK = 3
HEAD_DIM = 5
CAPACITY = 41
CACHE_LENGTHS = (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 33)  # ragged, in one batch

# (page_size, shuffled page order); None: contiguous cache.
LAYOUTS = {
    "contiguous": None,
    "paged-B": (BLOCK, False),
    "paged-B-shuffled": (BLOCK, True),
    "paged-B/2-shuffled": (BLOCK // 2, True),
    "paged-3B-shuffled": (3 * BLOCK, True),
    "paged-3-shuffled": (3, True),  # neither a divisor nor a multiple of the block size
}
HEADS = {"gqa": (6, 2), "mqa": (3, 1)}


class Case:
    """A batch of whole sequences, of which the first ``cache_lengths[b]`` keys sit in a cache."""

    def __init__(self, layout, cache_lengths, seqlen_q, heads, new_kv, dtype=torch.float64, seed=0):
        generator = torch.Generator().manual_seed(seed)
        heads_q, heads_kv = heads
        self.batch = len(cache_lengths)
        self.seqlen_q = seqlen_q
        self.new = seqlen_q if new_kv else 0
        self.cache_lengths = list(cache_lengths)
        lengths = [length + self.new for length in cache_lengths]

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

        self.keys = [randn(length, heads_kv, HEAD_DIM) for length in lengths]
        self.values = [randn(length, heads_kv, HEAD_DIM) for length in lengths]
        self.q = randn(self.batch, seqlen_q, heads_q, HEAD_DIM)
        self.page_size = None if layout is None else layout[0]
        if layout is None:
            self.block_table = None
            shape = (self.batch, CAPACITY, heads_kv, HEAD_DIM)
        else:
            page_size, shuffled = layout
            max_pages = -(-CAPACITY // page_size)
            num_pages = self.batch * max_pages + 3  # spare pages nobody owns
            order = torch.randperm(num_pages, generator=generator) if shuffled else torch.arange(num_pages)
            table = order[: self.batch * max_pages].view(self.batch, max_pages).to(torch.int32)
            if shuffled:  # entries past the pages a sequence uses are never read
                for b, length in enumerate(lengths):
                    table[b, -(-length // page_size) :] = -1
            self.block_table = table
            shape = (num_pages, page_size, heads_kv, HEAD_DIM)
        self.k_cache = torch.full(shape, math.nan, dtype=dtype)
        self.v_cache = torch.full(shape, math.nan, dtype=dtype)
        for b, length in enumerate(cache_lengths):
            self.write(b, self.keys[b][:length], self.values[b][:length])
        self.cache_seqlens = torch.tensor(cache_lengths, dtype=torch.int32)
        self.block_sums = flashmoba.kvcache_block_sums(
            self.k_cache, self.cache_seqlens, BLOCK, block_table=self.block_table
        )
        self.k = torch.stack([keys[keys.shape[0] - seqlen_q :] for keys in self.keys]) if new_kv else None
        self.v = torch.stack([vals[vals.shape[0] - seqlen_q :] for vals in self.values]) if new_kv else None

    def index(self, b, length):
        positions = torch.arange(length)
        if self.block_table is None:
            return b, positions
        return self.block_table[b].long()[positions // self.page_size], positions % self.page_size

    def write(self, b, keys, values):
        index = self.index(b, keys.shape[0])
        self.k_cache[index] = keys
        self.v_cache[index] = values

    def read(self, b, length):
        index = self.index(b, length)
        return self.k_cache[index], self.v_cache[index]

    def args(self):
        return (self.q, self.k_cache, self.v_cache, self.block_sums, self.cache_seqlens, BLOCK, TOPK)

    def kwargs(self, **overrides):
        return dict(k=self.k, v=self.v, block_table=self.block_table, **overrides)

    def run(self, **overrides):
        return flashmoba.moba_attn_with_kvcache(*self.args(), **self.kwargs(**overrides))

    def expected(self, block_size=BLOCK, topk=TOPK):
        """moba_attn of each whole sequence, its last seqlen_q rows (all of them: bottom-right causal)."""
        outs, lses = [], []
        for b in range(self.batch):
            out, lse = flashmoba.moba_attn(
                self.q[b : b + 1],
                self.keys[b][None],
                self.values[b][None],
                block_size,
                topk,
                causal=True,
                backend="reference",
                return_lse=True,
            )
            outs.append(out[0])
            lses.append(lse[0])
        return torch.stack(outs), torch.stack(lses)


def no_kv_lengths(seqlen_q):
    """Cache lengths that hold seqlen_q queries (or 0: an empty sequence)."""
    return [length if length == 0 else max(length, seqlen_q) for length in CACHE_LENGTHS]


# ----------------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", sorted(HEADS))
@pytest.mark.parametrize("seqlen_q", [1, 3])
@pytest.mark.parametrize("new_kv", [True, False], ids=["new-kv", "cached"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_moba_attn_on_whole_sequences(layout, new_kv, seqlen_q, heads):
    lengths = CACHE_LENGTHS if new_kv else no_kv_lengths(seqlen_q)
    case = Case(LAYOUTS[layout], lengths, seqlen_q, HEADS[heads], new_kv)
    seqlens_before = case.cache_seqlens.clone()
    out, lse = case.run(backend="reference", return_lse=True)
    expected_out, expected_lse = case.expected()
    assert_close(out, expected_out, "float64", "o")
    # lse is float32 by contract; both sides round float64 values that agree to ~1e-15.
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=0)
    assert torch.equal(case.cache_seqlens, seqlens_before), "cache_seqlens must not be advanced"
    # The new keys and values are in the cache and in the block sums.
    for b in range(case.batch):
        keys, values = case.read(b, case.keys[b].shape[0])
        assert torch.equal(keys, case.keys[b]) and torch.equal(values, case.values[b])
    filled = flashmoba.kvcache_block_sums(
        case.k_cache, case.cache_seqlens + case.new, BLOCK, block_table=case.block_table
    )
    assert_close(case.block_sums, filled, "float64", "block_sums")


@pytest.mark.parametrize("layout", ["contiguous", "paged-3-shuffled"])
def test_float64_lse_of_the_oracle(layout):
    case = Case(LAYOUTS[layout], CACHE_LENGTHS, 2, HEADS["gqa"], new_kv=True, seed=1)
    out, lse = kvcache.moba_attn_with_kvcache_reference(
        *case.args(), case.k, case.v, case.block_table, HEAD_DIM**-0.5
    )
    assert lse.dtype == torch.float64
    for b in range(case.batch):
        expected_out, expected_lse = reference.moba_sequence_reference(
            case.q[b], case.keys[b], case.values[b], BLOCK, TOPK, True, HEAD_DIM**-0.5
        )
        assert_close(out[b], expected_out, "float64", f"o[{b}]")
        assert_close(lse[b], expected_lse, "float64", f"lse[{b}]")


@pytest.mark.parametrize("layout", ["contiguous", "paged-B/2-shuffled", "paged-3-shuffled"])
def test_chunked_prefill_then_decode_equals_one_moba_attn(layout):
    """A prompt prefilled in chunks of several sizes, then decoded token by token, from empty caches."""
    chunks = [5, 1, 7, 10, 1, 1]
    total = sum(chunks)
    whole = Case(LAYOUTS[layout], [0, 0], total, HEADS["gqa"], new_kv=True, seed=2)
    sums = torch.zeros_like(whole.block_sums)
    seqlens = torch.zeros(2, dtype=torch.int32)
    outs, lses = [], []
    start = 0
    for size in chunks:
        rows = slice(start, start + size)
        out, lse = flashmoba.moba_attn_with_kvcache(
            whole.q[:, rows].contiguous(),
            whole.k_cache,
            whole.v_cache,
            sums,
            seqlens,
            BLOCK,
            TOPK,
            k=whole.k[:, rows],
            v=whole.v[:, rows],
            block_table=whole.block_table,
            return_lse=True,
        )
        outs.append(out)
        lses.append(lse)
        seqlens += size
        start += size
    expected_out, expected_lse = whole.expected()
    assert_close(torch.cat(outs, dim=1), expected_out, "float64", "o")
    torch.testing.assert_close(torch.cat(lses, dim=2), expected_lse, rtol=1e-6, atol=0)
    filled = flashmoba.kvcache_block_sums(whole.k_cache, seqlens, BLOCK, block_table=whole.block_table)
    assert_close(sums, filled, "float64", "block_sums")


def test_paged_and_contiguous_block_sums_agree():
    contiguous = Case(None, CACHE_LENGTHS, 1, HEADS["gqa"], new_kv=False)
    paged = Case(LAYOUTS["paged-3-shuffled"], CACHE_LENGTHS, 1, HEADS["gqa"], new_kv=False)
    assert contiguous.block_sums.shape == (len(CACHE_LENGTHS), -(-CAPACITY // BLOCK), 2, HEAD_DIM)
    assert paged.block_sums.shape == (
        len(CACHE_LENGTHS),
        -(-paged.block_table.shape[1] * 3 // BLOCK),
        2,
        HEAD_DIM,
    )
    blocks = contiguous.block_sums.shape[1]
    assert torch.equal(paged.block_sums[:, :blocks], contiguous.block_sums)
    assert not paged.block_sums[:, blocks:].any()
    for b, length in enumerate(CACHE_LENGTHS):  # blocks past the keys are zero
        assert not contiguous.block_sums[b, -(-length // BLOCK) :].any()


def test_block_size_and_topk_beyond_the_cache():
    case = Case(None, CACHE_LENGTHS, 2, HEADS["mqa"], new_kv=True)
    case.block_sums = flashmoba.kvcache_block_sums(case.k_cache, case.cache_seqlens, 10**6)
    assert case.block_sums.shape[1] == 1
    out = flashmoba.moba_attn_with_kvcache(
        case.q, case.k_cache, case.v_cache, case.block_sums, case.cache_seqlens, 10**6, 10**9, **case.kwargs()
    )
    assert_close(out, case.expected(10**6, 10**9)[0], "float64")


def test_beam_reordering_is_a_gather_on_dim_0():
    case = Case(None, CACHE_LENGTHS, 1, HEADS["gqa"], new_kv=False)
    order = torch.tensor([5, 5, 2, 0, 3, 1])
    out = flashmoba.moba_attn_with_kvcache(
        case.q[order],
        case.k_cache[order],
        case.v_cache[order],
        case.block_sums[order],
        case.cache_seqlens[order],
        BLOCK,
        TOPK,
    )
    assert_close(out, case.run()[order], "float64")


# ----------------------------------------------------------------------------------------------------
# Edges, dtypes, backends
# ----------------------------------------------------------------------------------------------------


def test_empty_sequences_give_zeros_and_minus_inf():
    case = Case(LAYOUTS["paged-B-shuffled"], [0, 0, 5], 2, HEADS["gqa"], new_kv=False)
    out, lse = case.run(return_lse=True)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert torch.isneginf(lse[:2]).all() and torch.isfinite(lse[2]).all()
    assert_close(out, case.expected()[0], "float64")


def test_no_queries_and_no_sequences():
    case = Case(None, [0, 3], 0, HEADS["gqa"], new_kv=True)
    out, lse = case.run(return_lse=True)
    assert out.shape == (2, 0, 6, HEAD_DIM) and lse.shape == (2, 6, 0)
    q = torch.zeros(0, 1, 6, HEAD_DIM, dtype=torch.float64)
    cache = torch.zeros(0, CAPACITY, 2, HEAD_DIM, dtype=torch.float64)
    sums = flashmoba.kvcache_block_sums(cache, torch.zeros(0, dtype=torch.int32), BLOCK)
    out, lse = flashmoba.moba_attn_with_kvcache(
        q, cache, cache.clone(), sums, torch.zeros(0, dtype=torch.int32), BLOCK, TOPK, return_lse=True
    )
    assert out.shape == (0, 1, 6, HEAD_DIM) and lse.shape == (0, 6, 1) and lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_return_shapes_and_dtypes(dtype):
    case = Case(LAYOUTS["paged-B/2-shuffled"], no_kv_lengths(2), 2, HEADS["gqa"], new_kv=False, dtype=dtype)
    assert case.block_sums.dtype == torch.float32
    out, lse = case.run(return_lse=True)
    assert out.dtype == dtype and out.shape == case.q.shape
    assert lse.dtype == torch.float32 and lse.shape == (case.batch, 6, 2)
    # Built by kvcache_block_sums, the sums are the reference's: the same routing as moba_attn.
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, case.expected()[0], **tolerance)
    assert isinstance(case.run(return_lse=False), torch.Tensor)
    with_kv = Case(None, CACHE_LENGTHS, 1, HEADS["mqa"], new_kv=True, dtype=dtype)
    out = with_kv.run()
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_float64_block_sums_for_float64_caches():
    assert Case(None, [3], 1, HEADS["mqa"], new_kv=False).block_sums.dtype == torch.float64


def test_backends():
    case = Case(None, CACHE_LENGTHS, 1, HEADS["gqa"], new_kv=False)
    assert torch.equal(case.run(backend="auto"), case.run(backend="reference"))
    # float64 is the reference's alone (the Triton backend is tested in tests/ops/test_decode.py).
    with pytest.raises(ValueError, match="backend='triton'"):
        case.run(backend="triton")
    with pytest.raises(ValueError, match="backend"):
        case.run(backend="cuda")


def test_numpy_integers_are_accepted():
    case = Case(None, CACHE_LENGTHS, 1, HEADS["gqa"], new_kv=False)
    out = flashmoba.moba_attn_with_kvcache(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_sums,
        case.cache_seqlens,
        np.int64(BLOCK),
        np.int32(TOPK),
    )
    assert_close(out, case.run(), "float64")


@pytest.mark.parametrize("name", ["q", "k_cache", "v_cache", "block_sums", "k", "v"])
def test_no_backward(name):
    case = Case(None, CACHE_LENGTHS, 1, HEADS["gqa"], new_kv=True)
    setattr(case, name, getattr(case, name).clone().requires_grad_(True))
    with pytest.raises(
        RuntimeError, match=f"moba_attn_with_kvcache has no backward.* but {name} require grad"
    ):
        case.run()
    with torch.no_grad():
        case.run()


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


BAD_INPUTS = {
    # name: (edit of the case's call as (args, kwargs) -> None, error, message pattern)
    "q-not-tensor": (lambda a, kw: a.__setitem__(0, [[1.0]]), TypeError, "q must be a torch.Tensor"),
    "q-int": (lambda a, kw: a.__setitem__(0, a[0].long()), TypeError, "q must be float16"),
    "q-3d": (lambda a, kw: a.__setitem__(0, a[0][0]), ValueError, "q must have 4 dimensions"),
    "q-heads": (lambda a, kw: a.__setitem__(0, a[0][:, :, :5]), ValueError, "heads_q must be a multiple"),
    "q-head-dim": (
        lambda a, kw: a.__setitem__(0, a[0][..., :-1]),
        ValueError,
        "k_cache must have q's head_dim",
    ),
    "q-batch": (lambda a, kw: a.__setitem__(0, a[0][:-1]), ValueError, "cache_seqlens must have shape"),
    "q-device": (
        lambda a, kw: a.__setitem__(0, a[0].to("meta")),
        ValueError,
        "k_cache must be on q's device",
    ),
    "k_cache-dtype": (lambda a, kw: a.__setitem__(1, a[1].float()), TypeError, "k_cache must have q's dtype"),
    "k_cache-3d": (lambda a, kw: a.__setitem__(1, a[1][0]), ValueError, "k_cache must have 4 dimensions"),
    "k_cache-batch": (
        lambda a, kw: a.__setitem__(1, a[1][:-1]),
        ValueError,
        "k_cache must have the batch size",
    ),
    "v_cache-shape": (
        lambda a, kw: a.__setitem__(2, a[2][:, :-1]),
        ValueError,
        "v_cache must have k_cache's shape",
    ),
    "v_cache-dtype": (lambda a, kw: a.__setitem__(2, a[2].float()), TypeError, "v_cache must have q's dtype"),
    "block_sums-dtype": (
        lambda a, kw: a.__setitem__(3, a[3].float()),
        TypeError,
        r"block_sums must be torch.float64 for torch.float64 caches, got torch.float32",
    ),
    "block_sums-shape": (
        lambda a, kw: a.__setitem__(3, a[3][:, :-1]),
        ValueError,
        r"block_sums must have shape .* = \(6, 11, 2, 5\)",
    ),
    "block_sums-list": (lambda a, kw: a.__setitem__(3, a[3].tolist()), TypeError, "block_sums must be a"),
    "cache_seqlens-int64": (
        lambda a, kw: a.__setitem__(4, a[4].long()),
        TypeError,
        "cache_seqlens must be int32",
    ),
    "cache_seqlens-list": (
        lambda a, kw: a.__setitem__(4, a[4].tolist()),
        TypeError,
        "cache_seqlens must be an int32",
    ),
    "cache_seqlens-shape": (
        lambda a, kw: a.__setitem__(4, a[4][None]),
        ValueError,
        r"cache_seqlens must have shape \[batch\]",
    ),
    "cache_seqlens-negative": (
        lambda a, kw: a[4].__setitem__(0, -1),
        ValueError,
        "cache_seqlens must be >= 0",
    ),
    "block_size-zero": (lambda a, kw: a.__setitem__(5, 0), ValueError, "block_size must be >= 1"),
    "block_size-float": (lambda a, kw: a.__setitem__(5, 4.0), TypeError, "block_size must be an int"),
    "topk-zero": (lambda a, kw: a.__setitem__(6, 0), ValueError, "topk must be >= 1"),
    "topk-bool": (lambda a, kw: a.__setitem__(6, True), TypeError, "topk must be an int"),
    "k-without-v": (lambda a, kw: kw.__setitem__("v", None), ValueError, "k and v .* must be given together"),
    "k-shape": (lambda a, kw: kw.__setitem__("k", kw["k"][:, :0]), ValueError, "k must have shape"),
    "v-heads": (lambda a, kw: kw.__setitem__("v", kw["v"][:, :, :1]), ValueError, "v must have shape"),
    "k-dtype": (lambda a, kw: kw.__setitem__("k", kw["k"].float()), TypeError, "k must have q's dtype"),
    "past-capacity": (
        lambda a, kw: a[4].__setitem__(5, CAPACITY),
        ValueError,
        "cache_seqlens\\[5\\] = 41 plus 1 new keys exceeds the cache's capacity of 41",
    ),
    "block_table-contiguous-shape": (
        lambda a, kw: kw.__setitem__("block_table", torch.zeros(6, 3, dtype=torch.int32)),
        ValueError,
        "k_cache must have page_size|block_sums must have shape",
    ),
    "softmax_scale-str": (lambda a, kw: kw.__setitem__("softmax_scale", "1"), TypeError, "softmax_scale"),
    "softmax_scale-nan": (
        lambda a, kw: kw.__setitem__("softmax_scale", math.nan),
        ValueError,
        "softmax_scale",
    ),
    "return_lse-str": (
        lambda a, kw: kw.__setitem__("return_lse", "yes"),
        TypeError,
        "return_lse must be a bool",
    ),
}

PAGED_BAD_INPUTS = {
    "block_table-int64": (
        lambda a, kw: kw.__setitem__("block_table", kw["block_table"].long()),
        TypeError,
        "int32",
    ),
    "block_table-batch": (
        lambda a, kw: kw.__setitem__("block_table", kw["block_table"][:-1]),
        ValueError,
        r"block_table must have shape \[batch, max_pages\]",
    ),
    "block_table-1d": (
        lambda a, kw: kw.__setitem__("block_table", kw["block_table"][0]),
        ValueError,
        r"block_table must have shape \[batch, max_pages\]",
    ),
    "block_table-page-out-of-range": (
        lambda a, kw: kw["block_table"].__setitem__((5, 0), a[1].shape[0]),
        ValueError,
        r"block_table\[5\] must hold page ids in \[0, 87\)",
    ),
    "block_table-used-page-minus-one": (
        lambda a, kw: kw["block_table"].__setitem__((5, 0), -1),
        ValueError,
        r"block_table\[5\] must hold page ids",
    ),
    "block_table-capacity": (
        lambda a, kw: kw.__setitem__("block_table", kw["block_table"][:, :-1]),
        ValueError,
        "block_sums must have shape",
    ),
}


def _call_with(case, edit):
    args, kwargs = list(case.args()), case.kwargs()
    edit(args, kwargs)
    return flashmoba.moba_attn_with_kvcache(*args, **kwargs)


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_is_named(bad):
    edit, error, pattern = BAD_INPUTS[bad]
    case = Case(None, CACHE_LENGTHS, 1, HEADS["gqa"], new_kv=True)
    before = case.k_cache.clone(), case.block_sums.clone()
    with pytest.raises(error, match=pattern):
        _call_with(case, edit)
    # Checks come before any write.
    assert torch.equal(case.k_cache.nan_to_num(), before[0].nan_to_num())
    assert torch.equal(case.block_sums, before[1])


@pytest.mark.parametrize("bad", sorted(PAGED_BAD_INPUTS))
def test_bad_paged_input_is_named(bad):
    edit, error, pattern = PAGED_BAD_INPUTS[bad]
    case = Case(LAYOUTS["paged-3-shuffled"], CACHE_LENGTHS, 1, HEADS["gqa"], new_kv=True)
    before = case.k_cache.clone()
    with pytest.raises(error, match=pattern):
        _call_with(case, edit)
    assert torch.equal(case.k_cache.nan_to_num(), before.nan_to_num())


def test_cached_sequence_shorter_than_the_queries():
    case = Case(None, [0, 4, 2], 3, HEADS["gqa"], new_kv=False)
    with pytest.raises(ValueError, match=r"cache_seqlens\[2\] = 2 is shorter than seqlen_q = 3"):
        case.run()


def test_cached_sequence_past_the_capacity():
    case = Case(None, [3], 1, HEADS["gqa"], new_kv=False)
    case.cache_seqlens[0] = CAPACITY + 1
    with pytest.raises(ValueError, match="exceeds the cache's capacity"):
        case.run()


@pytest.mark.parametrize(
    "edit, error, pattern",
    [
        (lambda kw: kw.__setitem__("block_size", 0), ValueError, "block_size must be >= 1"),
        (
            lambda kw: kw.__setitem__("k_cache", kw["k_cache"][0]),
            ValueError,
            "k_cache must have 4 dimensions",
        ),
        (lambda kw: kw.__setitem__("cache_seqlens", kw["cache_seqlens"].long()), TypeError, "cache_seqlens"),
        (lambda kw: kw["cache_seqlens"].__setitem__(0, 10**4), ValueError, "capacity of 44"),
        (lambda kw: kw.__setitem__("block_table", kw["block_table"][:, :1]), ValueError, "capacity of 4 "),
    ],
    ids=["block_size", "k_cache", "cache_seqlens-dtype", "cache_seqlens-capacity", "block_table-short"],
)
def test_kvcache_block_sums_bad_input(edit, error, pattern):
    case = Case(LAYOUTS["paged-B-shuffled"], CACHE_LENGTHS, 1, HEADS["gqa"], new_kv=False)
    kwargs = dict(
        k_cache=case.k_cache, cache_seqlens=case.cache_seqlens, block_size=BLOCK, block_table=case.block_table
    )
    edit(kwargs)
    with pytest.raises(error, match=pattern):
        flashmoba.kvcache_block_sums(
            kwargs["k_cache"],
            kwargs["cache_seqlens"],
            kwargs["block_size"],
            block_table=kwargs["block_table"],
        )


def test_meta_tensors_give_shapes_only():
    case = Case(LAYOUTS["paged-B-shuffled"], CACHE_LENGTHS, 2, HEADS["gqa"], new_kv=True)
    args = [arg.to("meta") if isinstance(arg, torch.Tensor) else arg for arg in case.args()]
    kwargs = {name: value.to("meta") for name, value in case.kwargs().items()}
    out, lse = flashmoba.moba_attn_with_kvcache(*args, **kwargs, return_lse=True)
    assert out.is_meta and out.shape == case.q.shape and lse.shape == (case.batch, 6, 2)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_reference_is_one_opaque_op_under_torch_compile(compile_backend):
    """The reference backend is the custom op flashmoba::moba_decode_reference: torch.compile traces a
    caller whole (fullgraph=True; the op's host reads of the lengths stay inside it), compiles it once
    although the lengths change every step, and gets the oracle's results."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()

    def step(q, k, v, k_cache, v_cache, block_sums, cache_seqlens):
        out = flashmoba.moba_attn_with_kvcache(
            q * 1.0, k_cache, v_cache, block_sums, cache_seqlens, BLOCK, TOPK, k=k, v=v, backend="reference"
        )
        cache_seqlens += q.shape[1]
        return out * 2.0

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    case = Case(None, CACHE_LENGTHS, 1, HEADS["gqa"], True, seed=3)
    twin = Case(None, CACHE_LENGTHS, 1, HEADS["gqa"], True, seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _ in range(3):
            q, k, v = (
                torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in (case.q, case.k, case.v)
            )
            got = compiled(q, k, v, case.k_cache, case.v_cache, case.block_sums, case.cache_seqlens)
            expected = step(q, k, v, twin.k_cache, twin.v_cache, twin.block_sums, twin.cache_seqlens)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert case.cache_seqlens.tolist() == [length + 3 for length in CACHE_LENGTHS]
    torch.testing.assert_close(case.block_sums, twin.block_sums, rtol=0, atol=0)
    for b, length in enumerate(CACHE_LENGTHS):  # the appended keys are in the caller's cache
        assert torch.equal(case.read(b, length + 3)[0], twin.read(b, length + 3)[0])


@pytest.mark.parametrize("new_kv", [True, False], ids=["new-kv", "cached"])
def test_opcheck_reference_op(new_kv):
    lengths = CACHE_LENGTHS if new_kv else no_kv_lengths(1)
    case = Case(LAYOUTS["paged-3-shuffled"], lengths, 1, HEADS["gqa"], new_kv, seed=5)
    # opcheck compares runs of the op with one another: finite caches (unused slots hold NaN, which never
    # reach the output but make equal tensors compare unequal).
    case.k_cache.nan_to_num_(0.0)
    case.v_cache.nan_to_num_(0.0)
    arguments = (*case.args(), case.k, case.v, case.block_table, 0.4)
    torch.library.opcheck(torch.ops.flashmoba.moba_decode_reference.default, arguments)
