"""Probes of the public functions with bad or unusual inputs, run in a subprocess per input class so that
a crash (a segmentation fault in a kernel, an abort) fails one test instead of killing the test run.

``python -m tests.probes.library CLASS`` runs every case of one class and prints one JSON line per case
*before* running it ("start") and one after ("done", with the outcome), so that the test can name the case
a crash happened in. Each case returns ``None`` when it holds and raises ``AssertionError`` otherwise; an
expected error is checked by ``expect_error``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels in the interpreter on CPU tensors

import numpy as np  # noqa: E402
import torch  # noqa: E402

import flashmoba  # noqa: E402
from flashmoba import moba_attn, moba_attn_varlen, moba_select  # noqa: E402

BACKENDS = ("reference", "triton", "auto")
CASES: dict[str, dict[str, Callable[[], None]]] = {}


def case(input_class: str, name: str):
    def register(function):
        CASES.setdefault(input_class, {})[name] = function
        return function

    return register


def expect_error(error_type: type, names: tuple[str, ...], function: Callable, *args, **kwargs) -> None:
    """``function(*args, **kwargs)`` raises ``error_type`` and its message names each of ``names``."""
    try:
        function(*args, **kwargs)
    except error_type as error:
        message = str(error)
        missing = [name for name in names if name not in message]
        assert not missing, f"{error_type.__name__} does not name {missing}: {message}"
        return
    except Exception as error:  # noqa: BLE001 - the wrong kind of error is the finding
        raise AssertionError(
            f"expected {error_type.__name__}, got {type(error).__name__}: {error}"
        ) from error
    raise AssertionError(f"expected {error_type.__name__}, got no error")


def random_qkv(batch, seqlen_q, seqlen_k, heads=2, heads_kv=1, head_dim=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return tensor(batch, seqlen_q, heads, head_dim), *(
        tensor(batch, seqlen_k, heads_kv, head_dim) for _ in "kv"
    )


def packed(lengths, heads=2, heads_kv=1, head_dim=8, seed=0):
    total = sum(lengths)
    q, k, v = (x[0] for x in random_qkv(1, total, total, heads, heads_kv, head_dim, seed=seed))
    offsets = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return q, k, v, offsets


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=3e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}"
    )


def reference_varlen(q, k, v, offsets, block_size, topk, **kwargs):
    longest = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    return moba_attn_varlen(
        q.double(),
        k.double(),
        v.double(),
        offsets,
        offsets,
        longest,
        longest,
        block_size,
        topk,
        backend="reference",
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------
# 1. cu_seqlens that are views: strided, or with a storage offset
# ----------------------------------------------------------------------------------------------------


def _offset_views():
    q, k, v, offsets = packed([5, 0, 9, 3])
    strided = torch.stack([offsets, torch.full_like(offsets, -7)], dim=1)[:, 0]  # stride 2
    with_offset = torch.cat([torch.tensor([99, 98], dtype=torch.int32), offsets])[2:]  # storage offset 2
    return q, k, v, offsets, {"strided": strided, "storage offset": with_offset}


for _backend in BACKENDS:
    for _view in ("strided", "storage offset"):

        @case("cu_seqlens_views", f"{_backend}: {_view} cu_seqlens")
        def _(backend=_backend, view=_view):
            q, k, v, offsets, views = _offset_views()
            assert not views[view].is_contiguous() or views[view].storage_offset() > 0
            expected = reference_varlen(q, k, v, offsets, 4, 2)
            got = moba_attn_varlen(q, k, v, views[view], views[view], 9, 9, 4, 2, backend=backend)
            assert_close(got, expected, "output")
            selected = moba_select(
                q, k, 4, 2, cu_seqlens_q=views[view], cu_seqlens_k=views[view], backend=backend
            )
            assert torch.equal(selected, moba_select(q, k, 4, 2, cu_seqlens_q=offsets, cu_seqlens_k=offsets))


# ----------------------------------------------------------------------------------------------------
# 2. Empty inputs: outputs and gradients of the right shapes (zeros), forward and backward
# ----------------------------------------------------------------------------------------------------


def _check_empty_padded(backend, batch, seqlen_q, seqlen_k):
    q, k, v = (x.requires_grad_() for x in random_qkv(batch, seqlen_q, seqlen_k))
    out, lse = moba_attn(q, k, v, 4, 2, backend=backend, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype, out.shape
    assert lse.shape == (batch, q.shape[2], seqlen_q) and lse.dtype == torch.float32, lse.shape
    assert (out == 0).all() and (lse == -math.inf).all()
    (out.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    for name, leaf in (("q", q), ("k", k), ("v", v)):
        assert leaf.grad is not None and leaf.grad.shape == leaf.shape, f"{name}.grad {leaf.grad}"
        assert (leaf.grad == 0).all(), f"{name}.grad is not zero"
    selected = moba_select(q, k, 4, 2, backend=backend)
    assert selected.shape == (batch, seqlen_q, q.shape[2], 2) and (selected == -1).all()


for _backend in BACKENDS:
    for _shape in ((0, 5, 5), (2, 0, 5), (2, 5, 0), (2, 0, 0)):

        @case("empty", f"{_backend}: padded batch, seqlen_q, seqlen_k = {_shape}")
        def _(backend=_backend, shape=_shape):
            _check_empty_padded(backend, *shape)

    @case("empty", f"{_backend}: packed batch of no sequences and of empty sequences")
    def _(backend=_backend):
        for lengths in ([], [0, 0]):
            q, k, v, offsets = packed(lengths)
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            out, lse = moba_attn_varlen(
                q, k, v, offsets, offsets, 0, 0, 4, 2, backend=backend, return_lse=True
            )
            assert out.shape == q.shape and lse.shape == (q.shape[1], 0)
            out.sum().backward()
            assert q.grad is not None and q.grad.shape == q.shape

    @case("empty", f"{_backend}: zero heads are a ValueError naming the heads")
    def _(backend=_backend):
        q, k, v = random_qkv(1, 5, 5, heads=0, heads_kv=0)
        expect_error(ValueError, ("head",), moba_attn, q, k, v, 4, 2, backend=backend)


# ----------------------------------------------------------------------------------------------------
# 3. Huge block_size or topk: one block per sequence, or dense attention, with nothing sized by them
# ----------------------------------------------------------------------------------------------------

for _backend in BACKENDS:

    @case("huge_sizes", f"{_backend}: block_size 2**62 is one block per sequence")
    def _(backend=_backend):
        q, k, v = random_qkv(2, 7, 11)
        expected = moba_attn(q.double(), k.double(), v.double(), 11, 1, backend="reference")
        assert_close(moba_attn(q, k, v, 2**62, 3, backend=backend), expected, "padded")
        q, k, v, offsets = packed([7, 11, 1])
        expected = reference_varlen(q, k, v, offsets, 11, 1)
        assert_close(
            moba_attn_varlen(q, k, v, offsets, offsets, 11, 11, 2**62, 3, backend=backend), expected, "packed"
        )
        selected = moba_select(q, k, 2**62, 3, cu_seqlens_q=offsets, cu_seqlens_k=offsets, backend=backend)
        assert (selected[:, :, 0] == 0).all() and (selected[:, :, 1:] == -1).all()

    @case("huge_sizes", f"{_backend}: topk 2**62 is dense attention")
    def _(backend=_backend):
        q, k, v = random_qkv(2, 9, 13)
        for causal in (True, False):
            expected = moba_attn(q.double(), k.double(), v.double(), 3, 5, causal=causal, backend="reference")
            got = moba_attn(q, k, v, 3, 2**62, causal=causal, backend=backend)
            assert_close(got, expected, f"causal={causal}")

    @case("huge_sizes", f"{_backend}: moba_select with topk 2**62 is a ValueError naming topk")
    def _(backend=_backend):
        q, k, _ = random_qkv(1, 9, 13)
        expect_error(ValueError, ("topk",), moba_select, q, k, 3, 2**62, backend=backend)


# ----------------------------------------------------------------------------------------------------
# 4. Flags and scalars checked by type; NumPy integers and reals accepted
# ----------------------------------------------------------------------------------------------------

for _backend in BACKENDS:
    for _flag, _value in (("causal", "False"), ("return_lse", 1), ("deterministic", "yes"), ("causal", None)):

        @case("types", f"{_backend}: {_flag}={_value!r} is a TypeError naming {_flag}")
        def _(backend=_backend, flag=_flag, value=_value):
            q, k, v = random_qkv(1, 6, 6)
            expect_error(
                TypeError, (flag, "bool"), moba_attn, q, k, v, 4, 2, backend=backend, **{flag: value}
            )

    @case("types", f"{_backend}: check_cu_seqlens='no' is a TypeError naming it")
    def _(backend=_backend):
        q, k, v, offsets = packed([6])
        expect_error(
            TypeError,
            ("check_cu_seqlens",),
            moba_attn_varlen,
            q,
            k,
            v,
            offsets,
            offsets,
            6,
            6,
            4,
            2,
            backend=backend,
            check_cu_seqlens="no",
        )

    for _scale in (math.nan, math.inf, -math.inf):

        @case("types", f"{_backend}: softmax_scale={_scale} is a ValueError naming softmax_scale")
        def _(backend=_backend, scale=_scale):
            q, k, v = random_qkv(1, 6, 6)
            expect_error(
                ValueError,
                ("softmax_scale", "finite"),
                moba_attn,
                q,
                k,
                v,
                4,
                2,
                softmax_scale=scale,
                backend=backend,
            )

    @case("types", f"{_backend}: softmax_scale='0.5' and block_size=True are TypeErrors naming them")
    def _(backend=_backend):
        q, k, v = random_qkv(1, 6, 6)
        expect_error(
            TypeError, ("softmax_scale",), moba_attn, q, k, v, 4, 2, softmax_scale="0.5", backend=backend
        )
        expect_error(TypeError, ("block_size",), moba_attn, q, k, v, True, 2, backend=backend)
        expect_error(TypeError, ("topk",), moba_attn, q, k, v, 4, 2.0, backend=backend)

    @case("types", f"{_backend}: NumPy integers and reals give the same answer as Python ones")
    def _(backend=_backend):
        q, k, v = random_qkv(1, 10, 10)
        expected = moba_attn(q, k, v, 4, 2, softmax_scale=0.3, backend=backend)
        got = moba_attn(q, k, v, np.int64(4), np.int32(2), softmax_scale=np.float64(0.3), backend=backend)
        assert torch.equal(got, expected)
        q, k, v, offsets = packed([10, 3])
        expected = moba_attn_varlen(q, k, v, offsets, offsets, 10, 10, 4, 2, backend=backend)
        got = moba_attn_varlen(
            q, k, v, offsets, offsets, np.int64(10), np.int64(10), np.int64(4), np.int64(2), backend=backend
        )
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------
# 5. NaN, inf and overflow in q, k, v and dO: NaN in exactly the output rows and gradient rows where the
#    reference has it (the rule in flashmoba.reference's docstring), the reference's values elsewhere
# ----------------------------------------------------------------------------------------------------

NON_FINITE_KINDS = (
    "NaN in a query row",
    "NaN in a key",
    "inf in a key",
    "-inf in a query row",
    "q . k overflowing float32",
    "NaN in a value",
    "inf in a value",
    "-inf in a value",
    "NaN in dO",
)


def _poisoned_inputs(kind: str, seed: int = 0):
    q, k, v = random_qkv(1, 16, 16, heads=2, heads_kv=2, head_dim=8, seed=seed)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    if kind == "NaN in a query row":
        q[0, 3, 1, 0] = math.nan
    elif kind == "NaN in a key":
        k[0, 5, 0, 2] = math.nan
    elif kind == "inf in a key":
        k[0, 5, 0, 2] = math.inf
    elif kind == "-inf in a query row":
        q[0, 6, 0, 1] = -math.inf
    elif kind == "q . k overflowing float32":
        q, k = q * 1e20, k * 1e20
    elif kind == "NaN in a value":  # key 6: in block 1, after rows 4 and 5 of that block
        v[0, 6, 1, 3] = math.nan
    elif kind == "inf in a value":
        v[0, 9, 0, 0] = math.inf
    elif kind == "-inf in a value":
        v[0, 15, 1, 7] = -math.inf
    elif kind == "NaN in dO":
        grad_out[0, 10, 1, 2] = math.nan
    return q, k, v, grad_out


def _with_gradients(q, k, v, grad_out, backend, **kwargs):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = moba_attn(*leaves, 4, 2, backend=backend, **kwargs)
    out.backward(grad_out)
    return out.detach(), *(leaf.grad for leaf in leaves)


for _backend in BACKENDS:
    for _kind in NON_FINITE_KINDS:

        @case("non_finite", f"{_backend}: {_kind}")
        def _(backend=_backend, kind=_kind):
            q, k, v, grad_out = _poisoned_inputs(kind)
            for causal in (True, False):
                expected = _with_gradients(q, k, v, grad_out, "reference", causal=causal)
                got = _with_gradients(q, k, v, grad_out, backend, causal=causal)
                assert any(x.isnan().any() for x in expected), "the case must poison something"
                # The gradients' NaN rows follow the blocks a poisoned row selects. Non-finite scores
                # are ranked by the routers' rule for NaN bits, whose sign differs between CPUs (the
                # interpreter) and GPUs: compare them where both backends route alike, which they must
                # when only v or dO hold the bad value.
                same_routing = torch.equal(
                    moba_select(q, k, 4, 2, causal=causal, backend=backend),
                    moba_select(q, k, 4, 2, causal=causal, backend="reference"),
                )
                assert same_routing or kind.split()[-1] not in ("value", "dO"), "the routing differs"
                for name, actual, wanted in list(zip(("out", "dq", "dk", "dv"), got, expected))[
                    : 4 if same_routing else 1
                ]:
                    # Per row: every entry of a poisoned output, dq, dk or dv row is NaN.
                    nan_rows, expected_rows = actual.isnan().any(-1), wanted.isnan().any(-1)
                    assert torch.equal(nan_rows, expected_rows), (
                        f"causal={causal}, {name}: NaN rows {nan_rows.nonzero().tolist()}, "
                        f"the reference's {expected_rows.nonzero().tolist()}"
                    )
                    assert torch.equal(actual.isnan(), wanted.isnan()), f"{name}: NaN in part of a row"
                    finite = ~expected_rows
                    assert_close(actual[finite], wanted[finite], f"causal={causal}, the other {name} rows")

    @case("non_finite", f"{_backend}: a NaN in one packed sequence never reaches another")
    def _(backend=_backend):
        q, k, v, offsets = packed([7, 9, 5])
        k[8, 0, 1] = math.nan  # in the second sequence
        out = moba_attn_varlen(q, k, v, offsets, offsets, 9, 9, 4, 2, backend=backend)
        assert out[7:16].isnan().any(), "the poisoned sequence must show it"
        assert not out[:7].isnan().any() and not out[16:].isnan().any()

    for _tensor in ("v", "dO"):

        @case("non_finite", f"{_backend}: a NaN in {_tensor} of one sequence leaves the others' bits alone")
        def _(backend=_backend, tensor=_tensor):
            """Packed and padded: outputs and gradients of the other sequences are bitwise the same."""
            q, k, v, offsets = packed([7, 9, 5])
            grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
            bad_v, bad_grad = v.clone(), grad_out.clone()
            if tensor == "v":
                bad_v[10, 0, 3] = math.nan  # in the second sequence
            else:
                bad_grad[12, 1, 0] = math.nan
            results = []
            for v_, grad_ in ((v, grad_out), (bad_v, bad_grad)):
                leaves = [x.clone().requires_grad_() for x in (q, k, v_)]
                out = moba_attn_varlen(*leaves, offsets, offsets, 9, 9, 4, 2, backend=backend)
                out.backward(grad_)
                results.append([out.detach(), *(leaf.grad for leaf in leaves)])
            others = torch.cat([torch.arange(0, 7), torch.arange(16, 21)])
            for name, clean, poisoned in zip(("out", "dq", "dk", "dv"), *results):
                if name != "out" or tensor == "v":
                    assert poisoned[7:16].isnan().any(), f"{name}: the poisoned sequence must show it"
                assert torch.equal(clean[others], poisoned[others]), f"packed {name} of another sequence"
            # Padded: batch element 1 poisoned, 0 and 2 unchanged.
            q, k, v = random_qkv(3, 11, 11, heads=2, heads_kv=1, head_dim=8, seed=3)
            grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
            bad_v, bad_grad = v.clone(), grad_out.clone()
            if tensor == "v":
                bad_v[1, 5, 0, 2] = math.nan
            else:
                bad_grad[1, 6, 0, 0] = math.nan
            results = []
            for v_, grad_ in ((v, grad_out), (bad_v, bad_grad)):
                results.append(_with_gradients(q, k, v_, grad_, backend))
            for name, clean, poisoned in zip(("out", "dq", "dk", "dv"), *results):
                if name != "out" or tensor == "v":
                    assert poisoned[1].isnan().any(), f"{name}: the poisoned batch element must show it"
                assert torch.equal(clean[[0, 2]], poisoned[[0, 2]]), f"padded {name} of another element"


# ----------------------------------------------------------------------------------------------------
# 6. 16-bit inputs (in Triton's interpreter too): the float64 reference's answer within 16-bit rounding
# ----------------------------------------------------------------------------------------------------

for _backend in BACKENDS:
    for _dtype in (torch.bfloat16, torch.float16):

        @case("half_precision", f"{_backend}: {_dtype} forward and backward track the float64 reference")
        def _(backend=_backend, dtype=_dtype):
            inputs = random_qkv(2, 37, 37, heads=4, heads_kv=2, head_dim=16)
            low = [x.to(dtype).requires_grad_() for x in inputs]
            exact = [x.to(dtype).double().requires_grad_() for x in inputs]
            grad = torch.randn(low[0].shape, generator=torch.Generator().manual_seed(1))
            out = moba_attn(*low, 8, 3, backend=backend)
            expected = moba_attn(*exact, 8, 3, backend="reference")
            out.backward(grad.to(dtype))
            expected.backward(grad.double())
            # A few units of the last place of 16-bit values of magnitude ~1 (2**-8 for bfloat16).
            tolerance = 4e-2 if dtype == torch.bfloat16 else 5e-3
            for name, got, want in [("out", out, expected)] + [
                (f"grad {n}", a.grad, b.grad) for n, a, b in zip("qkv", low, exact)
            ]:
                error = float((got.double() - want.detach()).abs().max())
                assert out.dtype == dtype and error < tolerance, f"{name}: max error {error:.3g}"


# ----------------------------------------------------------------------------------------------------
# 7. Meta tensors: shapes only
# ----------------------------------------------------------------------------------------------------

for _backend in BACKENDS:

    @case("meta", f"{_backend}: meta tensors give outputs of the right shapes")
    def _(backend=_backend):
        q = torch.empty(9, 4, 8, device="meta")
        k = torch.empty(9, 2, 8, device="meta")
        offsets = torch.empty(3, dtype=torch.int32, device="meta")
        out, lse = moba_attn_varlen(q, k, k, offsets, offsets, 9, 9, 4, 2, backend=backend, return_lse=True)
        assert out.is_meta and out.shape == q.shape and lse.shape == (4, 9) and lse.dtype == torch.float32
        selected = moba_select(
            q,
            k,
            4,
            2,
            cu_seqlens_q=offsets,
            cu_seqlens_k=offsets,
            max_seqlen_q=9,
            max_seqlen_k=9,
            backend=backend,
        )
        assert selected.is_meta and selected.shape == (9, 4, 2) and selected.dtype == torch.int32
        out, lse = moba_attn(q[None], k[None], k[None], 4, 2, backend=backend, return_lse=True)
        assert out.is_meta and out.shape == (1, 9, 4, 8) and lse.shape == (1, 4, 9)


def run(input_class: str) -> int:
    """Run one class's cases, one JSON line before and after each."""
    if input_class not in CASES:
        print(f"unknown class {input_class!r}; known: {sorted(CASES)}", file=sys.stderr)
        return 2
    for name, function in CASES[input_class].items():
        print(json.dumps({"case": name, "event": "start"}), flush=True)
        try:
            function()
            outcome = {"passed": True}
        except Exception as error:  # noqa: BLE001 - every failure is reported, not raised
            outcome = {"passed": False, "error": f"{type(error).__name__}: {error}"[:2000]}
        print(json.dumps({"case": name, "event": "done", **outcome}), flush=True)
    return 0


if __name__ == "__main__":
    assert flashmoba  # the package under test, imported before any case runs
    sys.exit(run(sys.argv[1]))
