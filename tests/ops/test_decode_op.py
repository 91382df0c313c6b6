"""``flashmoba::moba_decode``, the Triton decode as a ``torch.library`` custom op: the same results as the
launcher, ``torch.library.opcheck``, fake tensors, and ``torch.compile(fullgraph=True)`` through
``moba_attn_with_kvcache`` (Triton's interpreter on CPU; on a CUDA machine the compiled kernels)."""

from __future__ import annotations

import shutil

import pytest
import torch

import flashmoba
from flashmoba.ops import decode
from tests.helpers import assert_close
from tests.ops.test_decode import BLOCK, CACHE_LENGTHS, HEADS, LAYOUTS, TOPK, Case, cached_lengths

pytestmark = pytest.mark.triton


def _op_arguments(case: Case, scale: float = 0.3) -> tuple:
    return case.triton_arguments(scale)


@pytest.mark.parametrize("new_kv", [True, False], ids=["new-kv", "cached"])
@pytest.mark.parametrize("layout", ["contiguous", "paged-3-shuffled"])
def test_op_equals_the_launcher_and_mutates_in_place(layout, new_kv):
    lengths = CACHE_LENGTHS if new_kv else cached_lengths(2)
    case = Case(lengths, 2, HEADS["gqa"], new_kv, LAYOUTS[layout], seed=4)
    twin = Case(lengths, 2, HEADS["gqa"], new_kv, LAYOUTS[layout], seed=4)
    addresses = [t.data_ptr() for t in (case.k_cache, case.v_cache, case.block_sums)]
    out, lse = torch.ops.flashmoba.moba_decode(*_op_arguments(case))
    expected_out, expected_lse = decode.moba_decode_triton(*_op_arguments(twin))
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    # The caches are written in place (same tensors, same contents as the launcher's).
    assert [t.data_ptr() for t in (case.k_cache, case.v_cache, case.block_sums)] == addresses
    for name in ("k_cache", "v_cache", "block_sums"):
        torch.testing.assert_close(getattr(case, name), getattr(twin, name), rtol=0, atol=0, equal_nan=True)
    if new_kv:
        case.check_appended()


def test_public_function_goes_through_the_op(monkeypatch):
    calls = []
    original = torch.ops.flashmoba.moba_decode

    def spy(*args):
        calls.append(args)
        return original(*args)

    from flashmoba.ops import autograd

    monkeypatch.setattr(autograd, "moba_decode", spy)
    case = Case(CACHE_LENGTHS, 1, HEADS["mqa"], True, None, seed=2)
    out, lse = case.run()
    assert len(calls) == 1
    expected_out, expected_lse = case.expected()
    assert_close(out, expected_out, "kernel_float32", "o")
    assert_close(lse, expected_lse, "kernel_float32", "lse")


@pytest.mark.parametrize("new_kv", [True, False], ids=["new-kv", "cached"])
def test_opcheck_decode_op(new_kv):
    lengths = (0, 1, 5, 9)
    case = Case(lengths, 1, HEADS["gqa"], new_kv, LAYOUTS["paged-B-shuffled"], capacity=16, seed=3)
    # opcheck compares runs of the op with one another: finite caches (the Case fills unused slots with
    # NaN, which never reach the output but would make equal tensors compare unequal).
    case.k_cache.nan_to_num_(0.0)
    case.v_cache.nan_to_num_(0.0)
    torch.library.opcheck(torch.ops.flashmoba.moba_decode.default, _op_arguments(case))


def test_fake_tensors_give_the_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = Case((3, 0), 2, HEADS["gqa"], True, None, seed=1)
    real = _op_arguments(case)
    with FakeTensorMode() as mode:
        arguments = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in real]
        out, lse = torch.ops.flashmoba.moba_decode(*arguments)
    batch, seqlen_q, heads_q, _ = case.q.shape
    assert out.shape == case.q.shape and out.dtype == torch.float32
    assert lse.shape == (batch, heads_q, seqlen_q) and lse.dtype == torch.float32


def test_fake_kernel_names_what_the_kernels_do_not_run():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = Case((0, 3), 1, HEADS["mqa"], True, None, block_size=1, topk=200, capacity=300)
    real = _op_arguments(case)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="keeps at most 128 blocks per query"):
        arguments = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in real]
        torch.ops.flashmoba.moba_decode(*arguments)


def _step(q, k, v, k_cache, v_cache, block_sums, cache_seqlens, block_size, topk):
    """A decode step as a model writes it: append and attend, then advance the lengths on the device."""
    out, lse = flashmoba.moba_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        block_sums,
        cache_seqlens,
        block_size,
        topk,
        k=k,
        v=v,
        backend="triton",
        return_lse=True,
    )
    cache_seqlens += q.shape[1]
    return out * 2.0, lse


def _same(a, b, name):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compile_fullgraph_traces_moba_attn_with_kvcache(compile_backend):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(8)
    eager_case, compiled_case = (Case(CACHE_LENGTHS, 1, HEADS["gqa"], True, None, seed=6) for _ in range(2))
    # Two steps: the second routes and attends over what the first appended.
    steps = [
        tuple(torch.randn(t.shape, generator=generator) for t in (eager_case.q, eager_case.k, eager_case.v))
        for _ in range(2)
    ]
    compiled = torch.compile(_step, fullgraph=True, backend=compile_backend)
    for function, case in ((_step, eager_case), (compiled, compiled_case)):
        case.results = []
        with torch.no_grad():
            for q, k, v in steps:
                arguments = (case.k_cache, case.v_cache, case.block_sums, case.cache_seqlens)
                case.results.append(function(q, k, v, *arguments, case.block_size, case.topk))
    for (eager_out, eager_lse), (compiled_out, compiled_lse) in zip(
        eager_case.results, compiled_case.results
    ):
        _same(compiled_out, eager_out, "o")
        _same(compiled_lse, eager_lse, "lse")
    for name in ("k_cache", "v_cache", "block_sums", "cache_seqlens"):
        _same(getattr(compiled_case, name), getattr(eager_case, name), name)
    assert torch.equal(compiled_case.cache_seqlens, torch.tensor(CACHE_LENGTHS, dtype=torch.int32) + 2)


@pytest.mark.skipif(
    not torch.cuda.is_available() and shutil.which("g++") is None,
    reason="Inductor on CPU needs a C++ compiler",
)
def test_inductor_calls_the_op_in_place_on_the_caches():
    """Inductor re-inplaces the functionalized op: it writes the caller's caches, no copy of them (a
    copy of a long cache per layer per step would cost more than the step)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(9)
    eager_case, compiled_case = (Case(CACHE_LENGTHS, 1, HEADS["gqa"], True, None, seed=7) for _ in range(2))
    q, k, v = (torch.randn(t.shape, generator=generator) for t in (eager_case.q, eager_case.k, eager_case.v))
    compiled = torch.compile(_step, fullgraph=True)
    with torch.no_grad():
        arguments = (compiled_case.k_cache, compiled_case.v_cache, compiled_case.block_sums)
        (out, lse), codes = run_and_get_code(
            compiled, q, k, v, *arguments, compiled_case.cache_seqlens, BLOCK, TOPK
        )
        eager_arguments = (eager_case.k_cache, eager_case.v_cache, eager_case.block_sums)
        expected = _step(q, k, v, *eager_arguments, eager_case.cache_seqlens, BLOCK, TOPK)
    _same(out, expected[0], "o")
    _same(lse, expected[1], "lse")
    for name in ("k_cache", "v_cache", "block_sums", "cache_seqlens"):
        _same(getattr(compiled_case, name), getattr(eager_case, name), name)
    calls = [line for code in codes for line in code.splitlines() if "flashmoba.moba_decode.default(" in line]
    assert len(calls) == 1, calls
    assert not any("clone" in line for code in codes for line in code.splitlines()), "a cache was copied"
