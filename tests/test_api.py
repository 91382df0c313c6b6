"""Bad input gets a clear error naming the argument; the package imports without Triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import flashmoba


def _qkv(batch=1, seqlen=8, heads_q=4, heads_kv=2, head_dim=16, dtype=torch.float32):
    q = torch.randn(batch, seqlen, heads_q, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen, heads_kv, head_dim, dtype=dtype)
    return q, k, torch.randn_like(k)


def _packed(lengths=(3, 5), heads_q=4, heads_kv=2, head_dim=16):
    total = sum(lengths)
    q = torch.randn(total, heads_q, head_dim)
    k = torch.randn(total, heads_kv, head_dim)
    cu = torch.tensor([0, lengths[0], total], dtype=torch.int32)
    return q, k, torch.randn_like(k), cu


BAD_PADDED = [
    ("q", lambda q, k, v: dict(q=q[0]), ValueError, "4 dimensions"),
    ("k", lambda q, k, v: dict(k=k[..., None]), ValueError, "4 dimensions"),
    ("q", lambda q, k, v: dict(q=q.numpy()), TypeError, "torch.Tensor"),
    (
        "heads_q",
        lambda q, k, v: dict(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)),
        ValueError,
        "multiple",
    ),
    ("head_dim", lambda q, k, v: dict(k=k[..., :8], v=v[..., :8]), ValueError, "head_dim"),
    ("dtype", lambda q, k, v: dict(v=v.double()), TypeError, "dtype"),
    ("int dtype", lambda q, k, v: dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "float16"),
    ("v shape", lambda q, k, v: dict(v=v[:, :5]), ValueError, "v must have k's shape"),
    ("batch", lambda q, k, v: dict(k=torch.cat([k, k]), v=torch.cat([v, v])), ValueError, "batch"),
    ("block_size", lambda q, k, v: dict(block_size=0), ValueError, "block_size"),
    ("block_size type", lambda q, k, v: dict(block_size=4.0), TypeError, "block_size"),
    ("topk", lambda q, k, v: dict(topk=0), ValueError, "topk"),
    ("topk type", lambda q, k, v: dict(topk=True), TypeError, "topk"),
    ("backend", lambda q, k, v: dict(backend="cuda"), ValueError, "backend"),
    ("softmax_scale", lambda q, k, v: dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
]


@pytest.mark.parametrize("name,change,error,message", BAD_PADDED, ids=[b[0] for b in BAD_PADDED])
def test_bad_padded_inputs(name, change, error, message):
    q, k, v = _qkv()
    arguments = dict(q=q, k=k, v=v, block_size=4, topk=2)
    arguments.update(change(q, k, v))
    with pytest.raises(error, match=message):
        flashmoba.moba_attn(**arguments)


def test_device_mismatch_is_reported():
    q, k, v = _qkv()
    meta_v = v.to("meta")
    with pytest.raises(ValueError, match="device"):
        flashmoba.moba_attn(q, k, meta_v, 4, 2)


BAD_VARLEN = [
    ("not int32", lambda cu: dict(cu_seqlens_q=cu.long()), TypeError, "cu_seqlens_q must be int32"),
    ("not a tensor", lambda cu: dict(cu_seqlens_k=[0, 3, 8]), TypeError, "cu_seqlens_k"),
    (
        "decreasing",
        lambda cu: dict(
            cu_seqlens_q=torch.tensor([0, 6, 5, 8], dtype=torch.int32),
            cu_seqlens_k=torch.tensor([0, 3, 5, 8], dtype=torch.int32),
        ),
        ValueError,
        "non-decreasing",
    ),
    (
        "wrong end",
        lambda cu: dict(cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32)),
        ValueError,
        "end at",
    ),
    (
        "wrong start",
        lambda cu: dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)),
        ValueError,
        "start at 0",
    ),
    (
        "wrong length",
        lambda cu: dict(cu_seqlens_q=torch.tensor([0, 1, 3, 8], dtype=torch.int32)),
        ValueError,
        "same length",
    ),
    ("2-D", lambda cu: dict(cu_seqlens_q=cu[None]), ValueError, "1-D"),
    (
        "max_seqlen_q too small",
        lambda cu: dict(max_seqlen_q=4),
        ValueError,
        "max_seqlen_q must be >= the longest",
    ),
    ("max_seqlen_k too small", lambda cu: dict(max_seqlen_k=2), ValueError, "max_seqlen_k"),
    ("max_seqlen type", lambda cu: dict(max_seqlen_k=5.0), TypeError, "max_seqlen_k"),
]


@pytest.mark.parametrize("name,change,error,message", BAD_VARLEN, ids=[b[0] for b in BAD_VARLEN])
def test_bad_varlen_inputs(name, change, error, message):
    q, k, v, cu = _packed()
    arguments = dict(
        q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5, block_size=4, topk=2
    )
    arguments.update(change(cu))
    with pytest.raises(error, match=message):
        flashmoba.moba_attn_varlen(**arguments)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_check_cu_seqlens_false_skips_only_the_value_read(backend, count_host_reads):
    q, k, v, cu = _packed()
    expected = flashmoba.moba_attn_varlen(q, k, v, cu, cu, 5, 5, 4, 2, backend=backend)
    reads = count_host_reads(cu)
    flashmoba.moba_attn_varlen(q, k, v, cu, cu, 5, 5, 4, 2, backend=backend)
    checked_reads = len(reads)
    assert checked_reads >= 1
    got = flashmoba.moba_attn_varlen(q, k, v, cu, cu, 5, 5, 4, 2, backend=backend, check_cu_seqlens=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if backend == "triton":  # the reference loops over the sequences on the host anyway
        assert len(reads) == checked_reads
    # Checks that need no host read still run; wrong values pass unchecked (the caller's promise).
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        flashmoba.moba_attn_varlen(q, k, v, cu.long(), cu, 5, 5, 4, 2, check_cu_seqlens=False)
    with pytest.raises(TypeError, match="check_cu_seqlens must be a bool"):
        flashmoba.moba_attn_varlen(q, k, v, cu, cu, 5, 5, 4, 2, check_cu_seqlens=None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_kernel_config_of_a_wrong_type_is_refused(backend):
    # Refused on every backend, before any work; checked without importing flashmoba.ops (Triton).
    q, k, v = _qkv()
    packed_q, packed_k, packed_v, cu = _packed()
    for wrong in ({"rows_per_item": 4096}, 4096, "default"):
        message = f"kernel_config must be a flashmoba.ops.KernelConfig or None, got {type(wrong).__name__}"
        with pytest.raises(TypeError, match=message):
            flashmoba.moba_attn(q, k, v, 4, 2, backend=backend, kernel_config=wrong)
        with pytest.raises(TypeError, match=message):
            flashmoba.moba_attn_varlen(
                packed_q, packed_k, packed_v, cu, cu, 5, 5, 4, 2, backend=backend, kernel_config=wrong
            )


def test_kernel_config_check_does_not_import_triton():
    code = (
        "import sys, torch, flashmoba\n"
        "q = torch.randn(1, 8, 2, 16)\n"
        "try:\n"
        "    flashmoba.moba_attn(q, q, q, 4, 2, kernel_config={'rows_per_item': 1})\n"
        "except TypeError as error:\n"
        "    assert 'kernel_config' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('no TypeError')\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_varlen_wrong_ndim():
    q, k, v, cu = _packed()
    with pytest.raises(ValueError, match="3 dimensions"):
        flashmoba.moba_attn_varlen(q[None], k, v, cu, cu, 5, 5, 4, 2)


def test_select_bad_inputs():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match="given together"):
        flashmoba.moba_select(q[0], k[0], 4, 2, cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="topk"):
        flashmoba.moba_select(q, k, 4, -1)
    with pytest.raises(ValueError, match="4 dimensions"):
        flashmoba.moba_select(q[0], k, 4, 2)


def test_explicit_triton_backend_on_cpu_never_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="CUDA"):
        flashmoba.moba_attn(q, k, v, 4, 2, backend="triton")


def test_output_shapes():
    q, k, v = _qkv(batch=2, seqlen=9)
    out, lse = flashmoba.moba_attn(q, k, v, 4, 2, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    selected = flashmoba.moba_select(q, k, 4, 2)
    assert selected.shape == (2, 9, 4, 2) and selected.dtype == torch.int32
    q, k, v, cu = _packed()
    out, lse = flashmoba.moba_attn_varlen(q, k, v, cu, cu, 5, 5, 4, 2, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, 8)
    assert flashmoba.moba_select(q, k, 4, 3, cu_seqlens_q=cu, cu_seqlens_k=cu).shape == (8, 4, 3)


def test_non_contiguous_inputs():
    qkv = torch.randn(1, 20, 3, 4, 16)
    q, k, v = qkv.unbind(dim=2)
    out = flashmoba.moba_attn(q, k, v, 4, 2)
    expected = flashmoba.moba_attn(q.contiguous(), k.contiguous(), v.contiguous(), 4, 2)
    assert torch.equal(out, expected)


def test_import_does_not_import_triton():
    code = "import sys, flashmoba; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_backend_choice():
    from types import SimpleNamespace

    from flashmoba.api import _resolve_backend

    def tensor_on(device, dtype):  # _resolve_backend reads only these two attributes
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    assert _resolve_backend("auto", tensor_on("cpu", torch.bfloat16)) == "reference"
    assert _resolve_backend("auto", tensor_on("cuda", torch.bfloat16)) == "triton"
    assert _resolve_backend("auto", tensor_on("cuda", torch.float64)) == "reference"
    assert _resolve_backend("reference", tensor_on("cuda", torch.float16)) == "reference"
