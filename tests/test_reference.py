"""The reference against an independent brute-force oracle, its invariants and its gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flashmoba
from flashmoba import reference
from tests.oracle import brute_force_sequence, selection_tensor


def _random_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=generator, dtype=dtype)
    return q, k, v


def _assert_matches_oracle(q, k, v, block_size, topk, causal, softmax_scale=None):
    out, lse = flashmoba.moba_attn(
        q,
        k,
        v,
        block_size,
        topk,
        causal=causal,
        softmax_scale=softmax_scale,
        backend="reference",
        return_lse=True,
    )
    selected = flashmoba.moba_select(q, k, block_size, topk, causal=causal, backend="reference")
    for b in range(q.shape[0]):
        expected_out, expected_lse, selections = brute_force_sequence(
            q[b], k[b], v[b], block_size, topk, causal, softmax_scale
        )
        torch.testing.assert_close(out[b], expected_out.to(out.dtype), rtol=1e-10, atol=1e-10)
        # lse is float32 by contract; -inf exactly where the query sees nothing.
        torch.testing.assert_close(lse[b], expected_lse.float(), rtol=1e-6, atol=1e-6)
        assert torch.equal(selected[b], selection_tensor(selections, q.shape[1], q.shape[2], topk))


# (seqlen_q, seqlen_k, heads_q, heads_kv, block_size, topk, causal): every rule of the contract.
ORACLE_CASES = [
    (37, 37, 2, 2, 8, 3, True),  # partial last block
    (1, 1, 2, 1, 4, 2, True),  # one token
    (15, 15, 2, 2, 16, 4, True),  # shorter than a block: own block only
    (17, 17, 2, 2, 16, 2, True),  # B + 1
    (55, 55, 2, 2, 16, 2, True),  # 3B + 7
    (20, 45, 4, 1, 7, 2, True),  # bottom-right causal, seqlen_q < seqlen_k, MQA, odd block size
    (45, 20, 4, 2, 4, 3, True),  # seqlen_q > seqlen_k: early queries see nothing (lse -inf)
    (33, 29, 8, 2, 5, 3, False),  # non-causal, GQA 4:1
    (24, 24, 4, 4, 5, 1, True),  # topk = 1: block-diagonal causal
    (24, 24, 2, 2, 5, 9, True),  # topk > number of blocks: dense causal
    (30, 30, 2, 2, 1, 4, True),  # block_size 1: token-level routing
    (30, 40, 2, 2, 6, 20, False),  # non-causal dense
]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=[str(c) for c in ORACLE_CASES])
def test_reference_matches_brute_force(case):
    seqlen_q, seqlen_k, heads_q, heads_kv, block_size, topk, causal = case
    q, k, v = _random_qkv(2, seqlen_q, seqlen_k, heads_q, heads_kv, 16, seed=hash(case) % 1000)
    _assert_matches_oracle(q, k, v, block_size, topk, causal)


def test_custom_softmax_scale_matches_brute_force():
    q, k, v = _random_qkv(1, 26, 26, 2, 1, 8, seed=3)
    _assert_matches_oracle(q, k, v, 4, 3, True, softmax_scale=0.9)


def test_small_chunks_match_brute_force(monkeypatch):
    """Many query chunks (the path long sequences take) give the same function."""
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 64)
    q, k, v = _random_qkv(1, 41, 50, 4, 2, 8, seed=4)
    _assert_matches_oracle(q, k, v, 6, 3, True)
    _assert_matches_oracle(q, k, v, 6, 3, False)


@pytest.mark.parametrize("causal", [True, False])
def test_planted_ties_go_to_the_later_block(causal):
    """Identical key blocks tie exactly; the later one must win."""
    block_size, head_dim = 4, 8
    generator = torch.Generator().manual_seed(5)
    pattern = torch.randn(block_size, 1, head_dim, generator=generator, dtype=torch.float64)
    k = pattern.repeat(6, 1, 1)[None]  # 6 identical blocks: every score ties
    q = torch.randn(1, 24, 2, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(1, 24, 1, head_dim, generator=generator, dtype=torch.float64)
    selected = flashmoba.moba_select(q, k, block_size, 3, causal=causal, backend="reference")
    if causal:
        # query at position 23 (own block 5): the two latest earlier blocks are 3 and 4
        assert selected[0, 23, 0].tolist() == [3, 4, 5]
        assert selected[0, 9, 0].tolist() == [0, 1, 2]
    else:
        assert selected[0, 0, 0].tolist() == [3, 4, 5]
    _assert_matches_oracle(q, k, v, block_size, 3, causal)


def _bottom_right_causal_mask(seqlen_q, seqlen_k):
    query_pos = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    return torch.arange(seqlen_k)[None, :] <= query_pos


def _masked_dense(q, k, v, mask):
    """Dense attention with a boolean [T, S] mask; rows with no visible key give 0."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~mask, -math.inf)
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", weights, v)


@pytest.mark.parametrize("causal", [True, False])
def test_topk_at_least_blocks_is_dense_attention(causal):
    q, k, v = _random_qkv(2, 50, 50, 4, 2, 16, seed=6)
    out = flashmoba.moba_attn(q, k, v, 8, 7, causal=causal, backend="reference")
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_topk_at_least_blocks_is_bottom_right_causal_dense_attention():
    q, k, v = _random_qkv(1, 21, 50, 2, 1, 16, seed=7)
    out = flashmoba.moba_attn(q, k, v, 8, 100, backend="reference")
    expected = _masked_dense(q, k, v, _bottom_right_causal_mask(21, 50))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_topk_one_is_block_diagonal_causal_attention():
    seqlen, block_size = 45, 8
    q, k, v = _random_qkv(2, seqlen, seqlen, 2, 2, 16, seed=8)
    out = flashmoba.moba_attn(q, k, v, block_size, 1, backend="reference")
    blocks = torch.arange(seqlen) // block_size
    mask = (blocks[:, None] == blocks[None, :]) & _bottom_right_causal_mask(seqlen, seqlen)
    torch.testing.assert_close(out, _masked_dense(q, k, v, mask), rtol=1e-10, atol=1e-10)


def test_gqa_equals_repeated_kv():
    q, k, v = _random_qkv(2, 40, 40, 8, 2, 16, seed=9)
    out = flashmoba.moba_attn(q, k, v, 6, 3, backend="reference")
    repeated = flashmoba.moba_attn(
        q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2), 6, 3, backend="reference"
    )
    torch.testing.assert_close(out, repeated, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_equals_per_sequence_calls(causal):
    lengths_q, lengths_k = [5, 1, 33, 0, 17], [9, 1, 33, 4, 40]
    generator = torch.Generator().manual_seed(10)
    q = torch.randn(sum(lengths_q), 4, 16, generator=generator, dtype=torch.float64)
    k = torch.randn(sum(lengths_k), 2, 16, generator=generator, dtype=torch.float64)
    v = torch.randn(sum(lengths_k), 2, 16, generator=generator, dtype=torch.float64)
    cu_q = torch.tensor([0] + torch.tensor(lengths_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lengths_k).cumsum(0).tolist(), dtype=torch.int32)
    out, lse = flashmoba.moba_attn_varlen(
        q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), 8, 3, causal=causal, return_lse=True
    )
    selected = flashmoba.moba_select(q, k, 8, 3, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for s in range(len(lengths_q)):
        rows = slice(int(cu_q[s]), int(cu_q[s + 1]))
        keys = slice(int(cu_k[s]), int(cu_k[s + 1]))
        if lengths_q[s] == 0:
            continue
        one_out, one_lse = flashmoba.moba_attn(
            q[None, rows], k[None, keys], v[None, keys], 8, 3, causal=causal, return_lse=True
        )
        torch.testing.assert_close(out[rows], one_out[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(lse[:, rows], one_lse[0], rtol=0, atol=1e-6)
        one_selected = flashmoba.moba_select(q[None, rows], k[None, keys], 8, 3, causal=causal)
        assert torch.equal(selected[rows], one_selected[0])


def test_reference_gradients_match_float64_brute_force():
    """Gradients of the float32 reference against autograd through the float64 oracle's masks."""
    q, k, v = _random_qkv(1, 30, 30, 4, 2, 8, dtype=torch.float32, seed=11)
    _, _, selections = brute_force_sequence(q[0], k[0], v[0], 4, 3, True)
    mask = torch.zeros(4, 30, 30, dtype=torch.bool)
    for (i, h), chosen in selections.items():
        for s in range(30):
            mask[h, i, s] = (s // 4 in chosen) and s <= i
    grad_out = torch.randn(1, 30, 4, 8)

    def gradients(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        fn(*leaves).backward(grad_out.to(dtype))
        return [leaf.grad for leaf in leaves]

    ours = gradients(lambda a, b, c: flashmoba.moba_attn(a, b, c, 4, 3, backend="reference"), torch.float32)
    expected = gradients(lambda a, b, c: _masked_dense(a, b, c, mask[None]), torch.float64)
    for name, got, want in zip("qkv", ours, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_reference_gradcheck_float64(monkeypatch):
    """Finite differences on the chunked, checkpointed path (selection is piecewise constant)."""
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 48)
    q, k, v = _random_qkv(1, 13, 19, 2, 1, 4, seed=12)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: flashmoba.moba_attn(a, b, c, 3, 2, backend="reference"), inputs, eps=1e-6, atol=1e-6
    )


def test_no_gradient_to_a_query_that_sees_nothing():
    q, k, v = _random_qkv(1, 10, 4, 2, 2, 8, dtype=torch.float32, seed=13)
    q.requires_grad_()
    out, lse = flashmoba.moba_attn(q, k, v, 2, 2, return_lse=True)
    assert torch.all(out[0, :6] == 0) and torch.all(torch.isneginf(lse[0, :, :6]))
    out.sum().backward()
    assert torch.all(q.grad[0, :6] == 0) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_keep_dtype_and_track_float64(dtype):
    q, k, v = _random_qkv(1, 64, 64, 2, 2, 32, dtype=dtype, seed=14)
    out, lse = flashmoba.moba_attn(q, k, v, 16, 2, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # Same (quantized) inputs in float64: only the final rounding to the input dtype differs.
    expected = flashmoba.moba_attn(q.double(), k.double(), v.double(), 16, 2)
    assert (out.double() - expected).abs().max() <= 2 * torch.finfo(dtype).eps * expected.abs().max()


@pytest.mark.parametrize("block_size", [3, 6])
@pytest.mark.parametrize("causal", [True, False])
def test_real_arithmetic_ties_with_small_integer_inputs(block_size, causal):
    """Integer inputs: block means such as 7/6 round in float, yet scores that tie exactly (the oracle
    scores in exact rationals) must tie in the reference too, and go to the later block."""
    generator = torch.Generator().manual_seed(block_size)
    q = torch.randint(-2, 3, (1, 36, 4, 4), generator=generator).double()
    k = torch.randint(-2, 3, (1, 36, 2, 4), generator=generator).double()
    v = torch.randn(1, 36, 2, 4, generator=generator, dtype=torch.float64)
    _assert_matches_oracle(q, k, v, block_size, 3, causal)
    # float32 inputs route the same way
    selected = flashmoba.moba_select(q.float(), k.float(), block_size, 3, causal=causal)
    assert torch.equal(selected, flashmoba.moba_select(q, k, block_size, 3, causal=causal))


# ----------------------------------------------------------------------------------------------------
# NaN, inf and overflow: the rule of the module docstring of flashmoba.reference
# ----------------------------------------------------------------------------------------------------

# seqlen 37, block 8, topk 3, GQA 4/2, head_dim 24: key 10 sits in block 1 (an earlier block for most
# rows, the own block of rows 8..15: rows 8 and 9 do not see it), key 29 in block 3 (rows 24..28 of that
# block come before it), key 36 in the last, partial block.
NAN_SHAPE = dict(seqlen=37, heads_q=4, heads_kv=2, head_dim=24, block_size=8, topk=3)
NAN_PLACES = {
    "v, earlier block": ("v", (10, 1, 7)),
    "v, own block": ("v", (29, 0, 2)),
    "v, last key": ("v", (36, 1, 0)),
    "k, own block": ("k", (29, 0, 5)),
    "q": ("q", (20, 1, 3)),
}


def visibility(q, k, block_size, topk, causal):
    """[B, T, Hq, S] bool twice: the keys each (row, head) attends to, and the keys of the blocks it
    selected, from the reference's own selection."""
    selected = reference.moba_select_reference(q, k, block_size, topk, causal)  # [B, T, Hq, topk]
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    key_block = torch.arange(seqlen_k) // block_size
    in_blocks = (selected[..., None] == key_block).any(dim=-2)
    visible = in_blocks
    if causal:
        visible = in_blocks & _bottom_right_causal_mask(seqlen_q, seqlen_k)[None, :, None, :]
    return visible, in_blocks


def expected_nan_masks(q, k, v, masks, bad_grad=None):
    """The NaN rule straight from its statement, with logits from float64, for the masks of
    ``visibility``: (output rows [B, T, Hq], dq rows [B, T, Hq], dk/dv rows [B, S, Hkv]) that must be
    NaN."""
    visible, in_blocks = masks
    group = q.shape[2] // k.shape[2]
    k_q, v_q = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    logits = torch.einsum("bthd,bshd->bths", q.double(), k_q.double())
    bad_key = ~torch.isfinite(v_q).all(dim=-1).transpose(1, 2)[:, None]  # [B, 1, Hq, S]
    poisoned = (visible & (~torch.isfinite(logits) | bad_key)).any(dim=-1)
    flagged = poisoned if bad_grad is None else poisoned | bad_grad
    flagged &= visible.any(dim=-1)
    touched = (in_blocks & flagged[..., None]).any(dim=1)  # [B, Hq, S]
    touched = touched.view(q.shape[0], k.shape[2], group, -1).any(dim=2).transpose(1, 2)
    return poisoned, flagged, touched


def _run_with_grads(q, k, v, block_size, topk, causal, grad_out, grad_lse):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = flashmoba.moba_attn(
        *leaves, block_size, topk, causal=causal, backend="reference", return_lse=True
    )
    torch.autograd.backward((out, lse), (grad_out, grad_lse.masked_fill(torch.isinf(lse.detach()), 0)))
    return out.detach(), lse.detach(), *(leaf.grad for leaf in leaves)


def _nan_inputs(seed=20):
    shape = NAN_SHAPE
    q, k, v = _random_qkv(
        1, shape["seqlen"], shape["seqlen"], shape["heads_q"], shape["heads_kv"], shape["head_dim"], seed=seed
    )
    generator = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(1, shape["heads_q"], shape["seqlen"], generator=generator, dtype=torch.float64)
    return q, k, v, grad_out, grad_lse


@pytest.mark.parametrize("chunk_elements", [reference.CHUNK_ELEMENTS, 300], ids=["one_chunk", "chunks"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("place", sorted(NAN_PLACES))
def test_reference_nan_rule(monkeypatch, place, value, causal, chunk_elements):
    """NaN in exactly the output, lse and gradient rows the rule names (whatever the chunking); every other
    entry as with a finite number in place of the bad one (routing aside: bad keys move centroids)."""
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk_elements)
    block_size, topk = NAN_SHAPE["block_size"], NAN_SHAPE["topk"]
    q, k, v, grad_out, grad_lse = _nan_inputs()
    tensor_name, index = NAN_PLACES[place]
    poisoned_inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    poisoned_inputs[tensor_name][(0, *index)] = value
    bad_q, bad_k, bad_v = (poisoned_inputs[name] for name in "qkv")
    got = _run_with_grads(bad_q, bad_k, bad_v, block_size, topk, causal, grad_out, grad_lse)
    out, lse, grad_q, grad_k, grad_v = got

    masks = visibility(bad_q, bad_k, block_size, topk, causal)
    poisoned, flagged, touched = expected_nan_masks(bad_q, bad_k, bad_v, masks)
    assert poisoned.any() and not poisoned.all(), "the case must poison some rows, not all"
    assert torch.equal(out.isnan().all(dim=-1), poisoned) and torch.equal(out.isnan().any(dim=-1), poisoned)
    assert torch.equal(lse.isnan(), poisoned.transpose(1, 2))
    assert torch.equal(grad_q.isnan().all(dim=-1), flagged) and torch.equal(grad_q.isnan().any(-1), flagged)
    for name, grad in (("dk", grad_k), ("dv", grad_v)):
        assert torch.equal(grad.isnan().all(dim=-1), touched), name
        assert torch.equal(grad.isnan().any(dim=-1), touched), name
    assert torch.isfinite(out[~poisoned]).all() and torch.isfinite(grad_q[~flagged]).all()
    assert torch.isfinite(grad_k[~touched]).all() and torch.isfinite(grad_v[~touched]).all()
    if tensor_name == "v" and causal:  # the own-block rows before the key see the block, not the key
        row, kv_head = index[0], index[1]
        heads = slice(kv_head * 2, kv_head * 2 + 2)
        earlier = row - row % block_size
        assert torch.isfinite(out[0, earlier:row, heads]).all() and out[0, row, heads].isnan().all()

    if tensor_name == "k":
        return  # a bad key moves its block's centroid: the routing of other rows may change
    finite_inputs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    finite_inputs[tensor_name][(0, *index)] = 0.25
    # The finite run with the poisoned rows' upstream gradients zero: their routing or their part may
    # differ there (a NaN q routes its row differently), so they must contribute nothing.
    kept_out = grad_out.masked_fill(flagged[..., None], 0)
    kept_lse = grad_lse.masked_fill(flagged.transpose(1, 2), 0)
    expected = _run_with_grads(*finite_inputs.values(), block_size, topk, causal, kept_out, kept_lse)
    for name, actual, wanted, keep in zip(
        ("out", "lse", "dq", "dk", "dv"),
        got,
        expected,
        (~poisoned, ~poisoned.transpose(1, 2), ~flagged, ~touched, ~touched),
    ):
        torch.testing.assert_close(actual[keep], wanted[keep], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
@pytest.mark.parametrize("where", ["dO", "dlse"])
def test_reference_nan_in_upstream_gradient(where, causal):
    """A NaN in one row's dO (or dlse) gives NaN in that row's dq and the dk/dv rows of the keys it sees;
    every other gradient entry is the one with that row's upstream gradient zero."""
    block_size, topk = NAN_SHAPE["block_size"], NAN_SHAPE["topk"]
    q, k, v, grad_out, grad_lse = _nan_inputs(seed=21)
    row, head = 27, 2
    bad_out, bad_lse = grad_out.clone(), grad_lse.clone()
    if where == "dO":
        bad_out[0, row, head, 4] = math.nan
    else:
        bad_lse[0, head, row] = math.nan
    got = _run_with_grads(q, k, v, block_size, topk, causal, bad_out, bad_lse)
    bad_grad = torch.zeros(1, q.shape[1], q.shape[2], dtype=torch.bool)
    bad_grad[0, row, head] = True
    _, flagged, touched = expected_nan_masks(q, k, v, visibility(q, k, block_size, topk, causal), bad_grad)
    assert flagged.sum() == 1 and touched.any() and not touched.all()
    zero_out, zero_lse = grad_out.clone(), grad_lse.clone()
    zero_out[0, row, head] = 0
    zero_lse[0, head, row] = 0
    expected = _run_with_grads(q, k, v, block_size, topk, causal, zero_out, zero_lse)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])  # the forward is untouched
    for name, actual, wanted, nan_rows in zip(
        ("dq", "dk", "dv"), got[2:], expected[2:], (flagged, touched, touched)
    ):
        assert torch.equal(actual.isnan().all(dim=-1), nan_rows), name
        assert torch.equal(actual.isnan().any(dim=-1), nan_rows), name
        torch.testing.assert_close(actual[~nan_rows], wanted[~nan_rows], rtol=1e-12, atol=1e-12, msg=name)


def test_reference_overflowing_logits_poison_their_rows():
    """Finite inputs whose products overflow float32 (to +inf or -inf) poison the rows that see them."""
    q, k, v = _random_qkv(1, 24, 24, 2, 2, 8, dtype=torch.float32, seed=22)
    q, k = q * 1e3, k.clone()
    k[0, 5] *= 1e37  # q . k of key 5 overflows, with either sign
    out, lse = flashmoba.moba_attn(q, k, v, 4, 2, backend="reference", return_lse=True)
    visible, _ = visibility(q, k, 4, 2, True)
    logits = torch.einsum("bthd,bshd->bths", q, k)
    assert (logits == -math.inf).any() and (logits == math.inf).any()
    sees_key = visible[..., 5]
    assert torch.equal(out.isnan().any(dim=-1), sees_key) and sees_key.any() and not sees_key.all()
    assert torch.equal(lse.isnan(), sees_key.transpose(1, 2))
