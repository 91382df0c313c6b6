"""The Triton sparse attention (forward, lse, dq, dk, dv) against the float64 reference, on CPU.

The kernels run in Triton's interpreter (TRITON_INTERPRET=1) on small float32 shapes, with float32 dots
in "ieee" precision, so they must match the float64 reference to float32 rounding. The selection is the
reference router's on the float64 inputs, the same one the float64 reference then uses, so near-ties
cannot make the two disagree. Buffers the library allocates with ``torch.empty`` are filled with NaN
first, so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

import flashmoba
from flashmoba import reference
from flashmoba.ops import autograd as triton_autograd
from flashmoba.ops.config import KernelConfig
from flashmoba.ops.forward import forward_tiles
from flashmoba.ops.partials import chunking
from flashmoba.ops.utils import interpreting
from tests.helpers import assert_close, cu_seqlens

DEVICE = "cpu" if interpreting() else "cuda"
pytestmark = [
    pytest.mark.triton,
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.usefixtures("poison_empty"),  # conftest.py: unwritten scratch shows as NaN
]


def _cu(lengths):
    return cu_seqlens(lengths, DEVICE)


def _make(lengths_q, lengths_k, heads_q, heads_kv, head_dim, seed=0, layout="contiguous"):
    generator = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lengths_q), sum(lengths_k)

    def tensor(rows, heads):
        if layout == "heads_major":  # [H, T, D] storage seen as [T, H, D]: strided rows
            return torch.randn(heads, rows, head_dim, generator=generator).transpose(0, 1).to(DEVICE)
        if layout == "strided_dim":  # every other element of the last dimension
            return torch.randn(rows, heads, 2 * head_dim, generator=generator)[..., ::2].to(DEVICE)
        return torch.randn(rows, heads, head_dim, generator=generator).to(DEVICE)

    q, k, v = tensor(total_q, heads_q), tensor(total_k, heads_kv), tensor(total_k, heads_kv)
    grad_out = torch.randn(total_q, heads_q, head_dim, generator=generator).to(DEVICE)
    grad_lse = torch.randn(heads_q, total_q, generator=generator).to(DEVICE)
    return q, k, v, grad_out, grad_lse


def _loss(out, lse, grad_out, grad_lse):
    # lse is -inf for rows that see nothing; its gradient there is zero in both implementations.
    return (out * grad_out).sum() + (lse.masked_fill(torch.isinf(lse), 0) * grad_lse).sum()


def _triton_run(
    q,
    k,
    v,
    grad_out,
    grad_lse,
    selected,
    cu_q,
    cu_k,
    block_size,
    causal,
    scale,
    deterministic=False,
    config=None,
):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = triton_autograd.sparse_attention_varlen(
        *leaves, selected, cu_q, cu_k, block_size, causal, scale, deterministic, config
    )
    _loss(out, lse, grad_out, grad_lse).backward()
    return out, lse, *(leaf.grad for leaf in leaves)


def check_against_reference(
    lengths_q,
    lengths_k,
    heads_q,
    heads_kv,
    head_dim,
    block_size,
    topk,
    causal,
    deterministic=False,
    layout="contiguous",
    seed=0,
    config=None,
):
    q, k, v, grad_out, grad_lse = _make(lengths_q, lengths_k, heads_q, heads_kv, head_dim, seed, layout)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    scale = head_dim**-0.5
    selected = reference.moba_select_reference(q.double(), k.double(), block_size, topk, causal, cu_q, cu_k)
    got = _triton_run(
        q, k, v, grad_out, grad_lse, selected, cu_q, cu_k, block_size, causal, scale, deterministic, config
    )

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = reference.moba_attn_varlen_reference(*leaves, cu_q, cu_k, block_size, topk, causal, scale)
    _loss(out, lse, grad_out.double(), grad_lse.double()).backward()
    expected = (out, lse, *(leaf.grad for leaf in leaves))

    for name, actual, wanted in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert actual.shape == wanted.shape, name
        assert not torch.isnan(actual).any(), f"{name} has NaN (an element was not written)"
        assert_close(actual, wanted.detach(), "kernel_float32", name=name)
    return got


# ----------------------------------------------------------------------------------------------------
# Coverage against the reference
# ----------------------------------------------------------------------------------------------------

B = 16
CASES = [
    # id, lengths_q, lengths_k, heads_q, heads_kv, head_dim, block_size, topk, causal
    ("len1", [1], [1], 2, 2, 32, B, 2, True),
    ("len_B-1", [B - 1], [B - 1], 2, 2, 32, B, 2, True),
    ("len_B+1", [B + 1], [B + 1], 2, 2, 32, B, 2, True),
    ("len_3B+7_gqa4", [3 * B + 7], [3 * B + 7], 4, 1, 32, B, 2, True),
    ("ragged_varlen_gqa", [1, 5, 40, 17, 0, 23], [1, 5, 40, 17, 0, 23], 4, 2, 32, B, 3, True),
    ("mqa_noncausal", [30, 19], [30, 19], 4, 1, 32, B, 2, False),
    ("noncausal_ragged", [7, 33], [40, 9], 2, 1, 32, B, 2, False),
    ("prefill_q_shorter", [9, 20], [30, 45], 2, 1, 32, B, 3, True),
    ("q_longer_than_k", [30], [12], 2, 1, 32, B, 2, True),
    ("topk1_block_diagonal", [50], [50], 2, 2, 32, B, 1, True),
    ("topk_ge_blocks_dense", [45], [45], 2, 1, 32, B, 8, True),
    ("topk_ge_blocks_noncausal", [45], [37], 2, 1, 32, B, 5, False),
    ("head_dim_96", [40], [40], 2, 1, 96, B, 2, True),
    ("block_48_two_key_tiles", [100], [100], 2, 1, 32, 48, 2, True),
    ("block_5_not_multiple_of_16", [37], [37], 2, 1, 32, 5, 3, True),
    ("block_64_noncausal", [90], [130], 2, 2, 32, 64, 2, False),
    ("many_rows_per_block_topk6", [96], [96], 2, 1, 32, B, 6, True),
]


@pytest.mark.parametrize(
    "lengths_q,lengths_k,heads_q,heads_kv,head_dim,block_size,topk,causal",
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_matches_reference(lengths_q, lengths_k, heads_q, heads_kv, head_dim, block_size, topk, causal):
    check_against_reference(lengths_q, lengths_k, heads_q, heads_kv, head_dim, block_size, topk, causal)


@pytest.mark.parametrize("layout", ["heads_major", "strided_dim"])
def test_non_contiguous_inputs(layout):
    check_against_reference([21, 30], [21, 30], 4, 2, 32, B, 2, True, layout=layout)


def test_deterministic_matches_reference_and_is_bitwise_reproducible():
    args = ([5, 40, 23], [5, 40, 23], 4, 2, 32, B, 3, True)
    first = check_against_reference(*args, deterministic=True)
    second = check_against_reference(*args, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_partials_in_head_groups():
    # One head's float32 partials take 70 rows x 3 slots x (32 x 4 + 4) bytes; room for two heads gives
    # chunks of heads {0, 1} and {2}, every row in each.
    config = KernelConfig(partial_buffer_bytes=2 * 70 * 3 * (32 * 4 + 4))
    assert chunking(70, 3, 3, 32, torch.float32, config=config) == (2, 70, 1)
    check_against_reference([3, 40, 27], [3, 40, 27], 3, 1, 32, B, 3, True, config=config)
    check_against_reference([3, 40, 27], [3, 40, 27], 3, 1, 32, B, 3, True, deterministic=True, config=config)


def test_partials_in_row_chunks():
    # Less than one head's partials: each head is split into row chunks of 14 rows.
    config = KernelConfig(partial_buffer_bytes=14 * 3 * (32 * 4 + 4))
    assert chunking(70, 2, 3, 32, torch.float32, config=config) == (1, 14, 5)
    check_against_reference([3, 40, 27], [3, 40, 27], 2, 1, 32, B, 3, True, config=config)
    check_against_reference([3, 40, 27], [3, 40, 27], 2, 1, 32, B, 3, True, deterministic=True, config=config)


@pytest.mark.parametrize("stored_partials", [True, False], ids=["dq_stored_partials", "dq_atomics"])
def test_dq_paths(stored_partials):
    # B = 16 is one key tile: dQ goes through stored partials unless switched off (then float32 atomics).
    config = KernelConfig(dq_by_stored_partials=stored_partials)
    check_against_reference([5, 40, 23], [5, 40, 23], 4, 2, 32, B, 3, True, config=config)


def test_dq_partials_in_kv_head_groups():
    # Room for one kv head's two query heads (68 rows x 3 slots x (32 x 4 + 4) bytes each): the dK/dV
    # programs run in two launches, each storing and summing the dQ partials of its query heads.
    config = KernelConfig(partial_buffer_bytes=2 * 68 * 3 * (32 * 4 + 4))
    assert chunking(68, 4, 3, 32, torch.float32, group=2, config=config) == (2, 68, 1)
    args = ([5, 40, 23], [5, 40, 23], 4, 2, 32, B, 3, True)
    check_against_reference(*args, config=config)
    first = check_against_reference(*args, deterministic=True, config=config)
    second = check_against_reference(*args, deterministic=True, config=config)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stored_partials", [True, False], ids=["dq_stored_partials", "dq_atomics"])
def test_selection_with_holes_and_no_blocks(stored_partials):
    """Rows with no selected block get o = 0, lse = -inf and zero gradients; -1 slots are skipped."""
    # poison_empty makes the kernels' scratch NaN: a partial that no kernel writes or clears would show.
    config = KernelConfig(dq_by_stored_partials=stored_partials)
    q, k, v, grad_out, grad_lse = _make([20], [20], 2, 1, 32)
    cu = _cu([20])
    selected = torch.full((20, 2, 3), -1, dtype=torch.int32, device=DEVICE)
    selected[5:, :, 0] = 0
    selected[10:, 0, 1] = 1  # non-causal: all keys of the chosen blocks are visible
    out, lse, grad_q, grad_k, grad_v = _triton_run(
        q, k, v, grad_out, grad_lse, selected, cu, cu, B, False, 0.2, config=config
    )
    assert torch.all(out[:5] == 0) and torch.all(torch.isneginf(lse[:, :5])) and torch.all(grad_q[:5] == 0)
    for row in (5, 12):
        for head in range(2):
            keys = torch.cat(
                [torch.arange(b * B, min(20, (b + 1) * B)) for b in selected[row, head].tolist() if b >= 0]
            )
            query = q[row, head].detach().clone().requires_grad_()
            logits = (query @ k[keys, 0].T) * 0.2
            expected_out, expected_lse = torch.softmax(logits, 0) @ v[keys, 0], torch.logsumexp(logits, 0)
            torch.testing.assert_close(out[row, head], expected_out, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[head, row], expected_lse, atol=1e-5, rtol=1e-5)
            (expected_out @ grad_out[row, head] + expected_lse * grad_lse[head, row]).backward()
            torch.testing.assert_close(grad_q[row, head], query.grad, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Errors, torch.library
# ----------------------------------------------------------------------------------------------------


def test_unsupported_inputs_raise_before_launch():
    q, k, v, _, _ = _make([8], [8], 2, 1, 32)
    cu = _cu([8])
    selected = reference.moba_select_reference(q, k, B, 2, True, cu, cu)
    with pytest.raises(ValueError, match="float64"):
        triton_autograd.sparse_attention_varlen(
            q.double(), k.double(), v.double(), selected, cu, cu, B, True, 0.1
        )
    wide = torch.randn(8, 2, 288, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim up to 256"):
        triton_autograd.sparse_attention_varlen(
            wide, wide[:, :1], wide[:, :1], selected, cu, cu, B, True, 0.1
        )


def test_opcheck_attention_ops():
    q, k, v, grad_out, _ = _make([9, 20], [9, 20], 2, 1, 32)
    cu = _cu([9, 20])
    selected = reference.moba_select_reference(q, k, B, 2, True, cu, cu)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.flashmoba.sparse_attn_fwd.default, (q, k, v, selected, cu, cu, B, True, 0.17, False)
    )
    with torch.no_grad():
        out, lse, entries, offsets = torch.ops.flashmoba.sparse_attn_fwd(
            q, k, v, selected, cu, cu, B, True, 0.17, True
        )
    torch.library.opcheck(
        torch.ops.flashmoba.sparse_attn_bwd.default,
        (
            grad_out,
            None,
            q.detach(),
            k.detach(),
            v.detach(),
            out,
            lse,
            entries,
            offsets,
            cu,
            cu,
            B,
            True,
            0.17,
            True,
        ),
    )


def test_compile_fullgraph_traces_the_ops():
    q, k, v, _, _ = _make([9, 20], [9, 20], 2, 1, 32)
    cu = _cu([9, 20])
    selected = reference.moba_select_reference(q, k, B, 2, True, cu, cu)

    def attention(q, k, v):
        out, lse = triton_autograd.sparse_attention_varlen(q, k, v, selected, cu, cu, B, True, 0.17)
        return out * 2, lse

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    expected = attention(q, k, v)
    got = compiled(q, k, v)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


# ----------------------------------------------------------------------------------------------------
# The public API end to end (router + attention)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_public_padded_api(causal):
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 37, 4, 32, generator=generator).to(DEVICE)
    k = torch.randn(2, 41, 2, 32, generator=generator).to(DEVICE)
    v = torch.randn(2, 41, 2, 32, generator=generator).to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flashmoba.moba_attn(*leaves, B, 2, causal=causal, backend="triton", return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 37)
    selected = flashmoba.moba_select(q, k, B, 2, causal=causal, backend="triton")
    expected_selected = flashmoba.moba_select(q, k, B, 2, causal=causal, backend="reference")
    assert torch.equal(selected, expected_selected)  # these seeds have no near-tie
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = flashmoba.moba_attn(
        *ref_leaves, B, 2, causal=causal, backend="reference", return_lse=True
    )
    assert_close(out, ref_out, name="out")
    assert_close(lse, ref_lse, name="lse")
    grad_out = torch.randn(q.shape, generator=generator).to(DEVICE)
    (out * grad_out).sum().backward()
    (ref_out * grad_out.double()).sum().backward()
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        assert_close(leaf.grad, ref_leaf.grad, name="grad")


def test_public_varlen_api():
    lengths = [1, 20, 7]
    q, k, v, _, _ = _make(lengths, lengths, 4, 1, 32, seed=5)
    cu = _cu(lengths)
    out = flashmoba.moba_attn_varlen(q, k, v, cu, cu, 20, 20, B, 2, backend="triton")
    selected = flashmoba.moba_select(q, k, B, 2, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="triton")
    expected_selected = flashmoba.moba_select(
        q, k, B, 2, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="reference"
    )
    assert torch.equal(selected, expected_selected)  # these seeds have no near-tie
    expected = flashmoba.moba_attn_varlen(
        q.double(), k.double(), v.double(), cu, cu, 20, 20, B, 2, backend="reference"
    )
    assert_close(out, expected)


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_public_api_kernel_config_splits_columns_exactly(layout):
    """kernel_config=KernelConfig(rows_per_item=1): every work item is one row tile (1 rounds up to a
    tile), so each column with more routed rows than a tile splits. Outputs and gradients still match the
    float64 reference, and the default launch settings, on odd lengths."""
    topk, seqlen = 3, 77
    if layout == "padded":
        generator = torch.Generator().manual_seed(7)
        q, k, v, grad_out = (
            torch.randn(2, seqlen, heads, 32, generator=generator).to(DEVICE) for heads in (4, 2, 2, 4)
        )
        packing = {}

        def attention(q, k, v, **options):
            return flashmoba.moba_attn(q, k, v, B, topk, **options)

    else:
        lengths = [seqlen, 1, 45]
        q, k, v, grad_out, _ = _make(lengths, lengths, 4, 2, 32, seed=7)
        cu = _cu(lengths)
        packing = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)

        def attention(q, k, v, **options):
            return flashmoba.moba_attn_varlen(q, k, v, cu, cu, seqlen, seqlen, B, topk, **options)

    selected = flashmoba.moba_select(q, k, B, topk, backend="triton", **packing)
    expected_selected = flashmoba.moba_select(q, k, B, topk, backend="reference", **packing)
    assert torch.equal(selected, expected_selected)  # these seeds have no near-tie
    # The first sequence's hottest (head, block) column holds more rows than a forward tile: it splits.
    first = selected[0] if layout == "padded" else selected[:seqlen]
    rows_per_column = [(first[:, head] == block).sum() for head in range(4) for block in range(5)]
    assert max(rows_per_column) > forward_tiles(32, B)["BLOCK_M"]

    def run(tensors, backend, **options):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = attention(*leaves, backend=backend, **options)
        (out * grad_out.to(out.dtype)).sum().backward()
        return out.detach(), *(leaf.grad for leaf in leaves)

    config = KernelConfig(rows_per_item=1)
    got = run((q, k, v), "triton", kernel_config=config)
    with_defaults = run((q, k, v), "triton")
    # The reference backend takes kernel_config and ignores it.
    expected = run([t.double() for t in (q, k, v)], "reference", kernel_config=config)
    for name, actual, default, wanted in zip(("out", "dq", "dk", "dv"), got, with_defaults, expected):
        assert_close(actual, wanted, name=name)
        assert_close(actual, default, name=f"{name} against the default launch settings")


def test_opcheck_router_op():
    q, k, _, _, _ = _make([9, 20], [9, 20], 2, 1, 32)
    cu = _cu([9, 20])
    torch.library.opcheck(torch.ops.flashmoba.select_varlen.default, (q, k, cu, cu, 20, 20, B, 2, True))


def test_topk_far_above_the_block_count_is_dense_attention():
    """topk >= number of blocks means dense attention, whatever topk's size (no topk-sized buffers)."""
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 40, 2, 32, generator=generator).to(DEVICE) for _ in range(3))
    out = flashmoba.moba_attn(q, k, v, B, 10**9, backend="triton")
    expected = flashmoba.moba_attn(q.double(), k.double(), v.double(), B, 10**9, backend="reference")
    assert_close(out, expected)
    selected = flashmoba.moba_select(q, k, B, 40, backend="triton")
    assert selected.shape == (1, 40, 2, 40) and torch.all(selected[..., 3:] == -1)


def test_float16_forward_and_its_partials():
    """float16 through the interpreter (bfloat16 tl.dot is wrong there), against float64 on the same inputs.

    Measured as mean error over the output's own float16 rounding error (1.0 is the best a float16 output
    can do): float32 partials stay close to it; float16 partials add one rounding per partial, so they
    are worse, yet bounded (the merge is a convex combination of them)."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 160, 2, 32, generator=generator).half() for _ in range(3))
    expected, _ = reference.moba_attn_reference(q.double(), k.double(), v.double(), B, 4, causal=True)
    own_rounding = (expected.half().double() - expected).abs().mean()
    relative_error = {}
    for partials_in_input_dtype in (False, True):
        config = KernelConfig(partials_in_input_dtype=partials_in_input_dtype)
        # moba_attn(q, k, v, B, 4, causal=True, backend="triton") with this config (its scale: 1/sqrt(D))
        got, _ = triton_autograd.moba_attn_triton(q, k, v, B, 4, True, 32**-0.5, config=config)
        assert got.dtype == torch.float16
        relative_error[partials_in_input_dtype] = (
            (got.double() - expected).abs().mean() / own_rounding
        ).item()
    assert relative_error[False] <= 1.5, relative_error
    assert relative_error[False] < relative_error[True] <= 2.2, relative_error


# ----------------------------------------------------------------------------------------------------
# NaN, inf and overflow: NaN exactly where the reference has it (the rule in flashmoba.reference)
# ----------------------------------------------------------------------------------------------------

# One sequence of 37 (block 8, topk 3, GQA 4/2, head_dim 24), as in tests/test_reference.py: key 10 sits
# in block 1, which rows 8 and 9 attend to without seeing key 10; key 29 in block 3, after rows 24..28
# of that block; key 36 is the last, in a partial block; row 20 is in block 2, before its keys 21..23.
NAN_PLACES = {
    "v, earlier block": ("v", (10, 1, 7)),
    "v, own block": ("v", (29, 0, 2)),
    "v, last key": ("v", (36, 1, 0)),
    "k, own block": ("k", (29, 0, 5)),
    "q": ("q", (20, 1, 3)),
    "dO": ("grad_out", (27, 2, 4)),
    "dlse": ("grad_lse", (2, 27)),
}


EDGE_OF_FLOAT32 = 1e35  # float32's largest value is 3.4e38


def _nan_compare(got, expected, what):
    """The NaN entries of each result are the reference's, the others agree with it; the reference has
    NaN somewhere and finite values somewhere in dq, dk and dv."""
    for name, actual, wanted in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        wanted = wanted.detach()
        nan = wanted.isnan()
        assert torch.equal(actual.isnan(), nan), (
            f"{what}, {name}: NaN at {actual.isnan().nonzero().tolist()[:8]}..., "
            f"the reference's at {nan.nonzero().tolist()[:8]}..."
        )
        # In a row (a head's vector) whose terms come within a few decades of float32's largest value,
        # whether a sum overflows depends on its order (the interpreter's numpy matmul against torch's,
        # per CPU), even where the terms cancel to a smaller result: there the kernel may give an
        # infinity; everywhere else it must agree with the reference.
        row_peak = wanted.nan_to_num(0.0).abs().amax(-1, keepdim=True)
        edge = ~nan & (row_peak > EDGE_OF_FLOAT32).expand_as(wanted)
        finite = ~nan & ~(edge & actual.isinf())
        assert_close(actual[finite], wanted[finite], "kernel_float32", name=f"{what}, {name}")
    assert all(x.isnan().any() and not x.isnan().all() for x in expected[2:]), "the case must poison some"


def check_non_finite(
    place, value, causal, lengths=(37,), block_size=8, topk=3, deterministic=False, config=None, poison=0
):
    """The kernels and the float64 reference on inputs with one bad entry at NAN_PLACES[place] in the
    sequence ``poison`` of ``lengths``; returns the kernels' results."""
    lengths = list(lengths)
    q, k, v, grad_out, grad_lse = _make(lengths, lengths, 4, 2, 24, seed=4)
    tensors = dict(q=q, k=k, v=v, grad_out=grad_out, grad_lse=grad_lse)
    name, index = NAN_PLACES[place]
    start = sum(lengths[:poison])
    index = (index[0], start + index[1]) if name == "grad_lse" else (start + index[0], *index[1:])
    tensors[name][index] = value
    cu = _cu(lengths)
    scale = 24**-0.5
    selected = reference.moba_select_reference(q.double(), k.double(), block_size, topk, causal, cu, cu)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = triton_autograd.sparse_attention_varlen(
        *leaves, selected, cu, cu, block_size, causal, scale, deterministic, config
    )
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    got = (out.detach(), lse.detach(), *(leaf.grad for leaf in leaves))
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.moba_attn_varlen_reference(
        *ref_leaves, cu, cu, block_size, topk, causal, scale
    )
    torch.autograd.backward((ref_out, ref_lse), (grad_out.double(), grad_lse.double()))
    expected = (ref_out, ref_lse, *(leaf.grad for leaf in ref_leaves))
    _nan_compare(got, expected, f"{place} = {value}, causal={causal}")
    return got


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non_causal"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("place", sorted(NAN_PLACES))
def test_non_finite_entries_give_nan_where_the_reference_does(place, value, causal):
    check_non_finite(place, value, causal)


@pytest.mark.parametrize(
    "deterministic,config",
    [
        (False, KernelConfig(dq_by_stored_partials=False)),  # dQ by float32 atomics
        (True, KernelConfig(dq_by_stored_partials=False)),  # dQ by the second, per-pair pass
        (False, KernelConfig(partial_buffer_bytes=14 * 3 * (24 * 4 + 4))),  # partials in row chunks
    ],
    ids=["dq_atomics", "dq_second_pass", "row_chunks"],
)
@pytest.mark.parametrize("place", ["v, own block", "q", "dO"])
def test_non_finite_entries_on_every_dq_path(place, deterministic, config):
    check_non_finite(place, float("nan"), True, deterministic=deterministic, config=config)


@pytest.mark.parametrize("deterministic", [False, True], ids=["dq_atomics", "dq_second_pass"])
@pytest.mark.parametrize("place", ["v, own block", "q", "dO"])
def test_non_finite_entries_with_blocks_of_several_key_tiles(place, deterministic):
    # Blocks of 40 keys are two of the interpreter's 32-key tiles: the forward's key loop and the
    # backward's per-tile programs; key 29 is then in the first block's second tile.
    check_non_finite(
        place, float("inf"), True, lengths=(97,), block_size=40, topk=2, deterministic=deterministic
    )


def test_overflowing_logits_give_nan_where_the_reference_does():
    """q . k overflowing float32 (to +inf and to -inf) poisons the rows that see the key."""
    lengths = [37]
    q, k, v, grad_out, grad_lse = _make(lengths, lengths, 4, 2, 24, seed=6)
    k = k.clone()
    k[29, 0] *= 1e38
    assert torch.isfinite(k).all()  # finite inputs: only their products overflow
    cu, scale = _cu(lengths), 24**-0.5
    # The float32 routing, which the float32 reference below does (float64 scores would not overflow).
    selected = reference.moba_select_reference(q, k, 8, 3, True, cu, cu)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = triton_autograd.sparse_attention_varlen(*leaves, selected, cu, cu, 8, True, scale, False, None)
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    got = (out.detach(), lse.detach(), *(leaf.grad for leaf in leaves))
    # The float32 reference: its logits overflow as the kernels' do (float64 would not overflow).
    ref_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference.moba_attn_varlen_reference(*ref_leaves, cu, cu, 8, 3, True, scale)
    torch.autograd.backward((ref_out, ref_lse), (grad_out, grad_lse))
    expected = (ref_out, ref_lse, *(leaf.grad for leaf in ref_leaves))
    logits = torch.einsum("td,sd->ts", q[:, 0], k[:, 0])
    assert (logits[:, 29] == float("inf")).any() and (logits[:, 29] == float("-inf")).any()
    _nan_compare(got, expected, "overflow")


@pytest.mark.parametrize("place", ["v, own block", "k, own block", "q", "dO"])
def test_a_nan_in_one_packed_sequence_leaves_the_others_bitwise_unchanged(place):
    """Sequences 0 and 2 of a packed batch: the same bits with a NaN in sequence 1 as without it."""
    lengths = (13, 37, 9)
    poisoned = check_non_finite(place, float("nan"), True, lengths=lengths, poison=1)
    q, k, v, grad_out, grad_lse = _make(list(lengths), list(lengths), 4, 2, 24, seed=4)
    cu = _cu(list(lengths))
    selected = reference.moba_select_reference(q.double(), k.double(), 8, 3, True, cu, cu)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = triton_autograd.sparse_attention_varlen(
        *leaves, selected, cu, cu, 8, True, 24**-0.5, False, None
    )
    torch.autograd.backward((out, lse), (grad_out, grad_lse))
    finite = (out.detach(), lse.detach(), *(leaf.grad for leaf in leaves))
    others = torch.cat([torch.arange(0, 13), torch.arange(50, 59)])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), poisoned, finite):
        rows = (slice(None), others) if name == "lse" else (others,)
        assert torch.equal(a[rows], b[rows]), f"{name} of the other sequences changed"
