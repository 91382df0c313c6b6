"""Compile every Triton kernel launch of flashmoba's forward and backward for Hopper (sm_90), without a GPU.

CI has no GPU. Triton's interpreter runs the kernels' arithmetic on CPU tensors, but it never runs the GPU
compiler, and that compiler rejects some code the interpreter accepts: Triton 3.6's software pipeliner
fails on a loop whose body takes a reduction's result out of an ``if`` (see "compile_hopper: what the
interpreter does not catch" in benchmarks/NOTES.md).
This script runs the library's launchers with each kernel replaced by a recorder. The recorder derives the
launch's signature, constants and argument attributes the way Triton's own launcher does for an H100, and
launches nothing. Then it compiles each distinct launch with ``triton.compile`` for sm_90, down to a cubin
(the Triton wheel ships ptxas), and reports its registers and spill bytes from ptxas's log. Nothing is
executed, so outputs hold garbage; the launchers read no device values on the host, so every launch still
happens with the shapes of a real run.

The cases cover each path the launchers choose by shape: the router's three list lengths (8, 16 and 32
slots, the last with 128-row tiles from 1024 blocks on), GQA with atomics and the deterministic path,
head dims 64 and 256, float16 and float32, and non-causal routing. The script fails if any kernel of
``flashmoba.ops`` is never launched, so a new kernel cannot go unchecked.

It must run without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted ones), and it
uses two internals of Triton 3.6, the version pyproject.toml pins: ``create_function_from_signature``
and ``JITFunction._pack_args``.

    python tools/compile_hopper.py          # one JSON line per compiled launch; exit status 1 on failure
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

# A fresh cache: every launch is compiled, so ptxas runs and its log gives registers and spills.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_hopper_")

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/compile_hopper.py: run it without TRITON_INTERPRET=1 (kernels must be JIT functions)")

from flashmoba import ops
from flashmoba.ops import backward, decode, forward, index, router, work_items

TARGET = GPUTarget("cuda", 90, 32)  # H100 and H200
BACKEND = CUDABackend(TARGET)
KERNEL_MODULES = (router, index, work_items, forward, backward, decode)

# name -> keyword arguments of run_case (batch 1; the shapes only choose the launchers' paths)
CASES = {
    # 128 and 256 blocks: the router's centroid tiles are as wide as at the benchmark's lengths.
    "B128/k8": dict(seqlen=16384, block_size=128, topk=8),
    "B64/k16": dict(seqlen=16384, block_size=64, topk=16),
    "B32/k32, 1250 blocks": dict(seqlen=40000, block_size=32, topk=32),
    "GQA 8/2 k16": dict(seqlen=2048, block_size=64, topk=16, heads_q=8, heads_kv=2),
    "GQA 8/2 k16 deterministic": dict(
        seqlen=4096, block_size=64, topk=16, heads_q=8, heads_kv=2, deterministic=True
    ),
    "head_dim 64": dict(seqlen=2048, block_size=64, topk=8, head_dim=64),
    # The 340m model's MoBA layers: 128 gathered rows per forward tile.
    "head_dim 64 B128/k8": dict(seqlen=32768, block_size=128, topk=8, head_dim=64),
    "head_dim 256": dict(seqlen=2048, block_size=64, topk=8, head_dim=256),
    "float16": dict(seqlen=2048, block_size=128, topk=8, dtype=torch.float16),
    "float32": dict(seqlen=1024, block_size=64, topk=4, dtype=torch.float32),
    "non-causal": dict(seqlen=2048, block_size=64, topk=8, causal=False),
}


# name -> keyword arguments of run_decode_case: decode with a KV cache (flashmoba.ops.decode), one step
# (seqlen_q 1) or a prefill chunk, contiguous or paged, at the serving shapes.
DECODE_CASES = {
    "decode 32/8 d128 B128 k8": dict(batch=4, capacity=32768, heads_q=32, heads_kv=8, head_dim=128),
    "decode 16/16 d64 B128 k8": dict(batch=4, capacity=32768, heads_q=16, heads_kv=16, head_dim=64),
    # One sequence of 128K: the router splits each kv head's 16 centroid tiles over 4 programs and merges.
    "decode split router 32/8 d128 128K": dict(
        batch=1, capacity=131072, heads_q=32, heads_kv=8, head_dim=128
    ),
    "decode paged 32/8 d128": dict(batch=4, capacity=32768, heads_q=32, heads_kv=8, head_dim=128, paged=True),
    "decode chunk 4B 32/8 d128": dict(
        batch=1, capacity=32768, heads_q=32, heads_kv=8, head_dim=128, seqlen_q=512
    ),
    "decode float16 d256 k16": dict(
        batch=2, capacity=8192, heads_q=8, heads_kv=2, head_dim=256, topk=16, dtype=torch.float16
    ),
    "decode float32 d64": dict(
        batch=2, capacity=4096, heads_q=8, heads_kv=2, head_dim=64, dtype=torch.float32
    ),
    # Launch settings off by default, for the benchmark's --decode-configs sweeps.
    "decode 32/8 d128 append kernel (fold_append off)": dict(
        batch=4,
        capacity=32768,
        heads_q=32,
        heads_kv=8,
        head_dim=128,
        config=decode.DecodeConfig(fold_append=False),
    ),
    "decode 32/8 d128 by query head": dict(
        batch=4,
        capacity=32768,
        heads_q=32,
        heads_kv=8,
        head_dim=128,
        config=decode.DecodeConfig(attn_by_group=False),
    ),
    "decode 32/8 d128 by group, key tiles of 64": dict(
        batch=4,
        capacity=32768,
        heads_q=32,
        heads_kv=8,
        head_dim=128,
        config=decode.DecodeConfig(attn_block_n=64),
    ),
    "decode float32 d128 by group": dict(
        batch=2, capacity=4096, heads_q=8, heads_kv=2, head_dim=128, dtype=torch.float32
    ),
    "decode 16/16 d64 B128 k8 without PDL": dict(
        batch=4, capacity=32768, heads_q=16, heads_kv=16, head_dim=64, config=decode.DecodeConfig(pdl=False)
    ),
}


def ptxas_usage(log: str, kernel_name: str) -> dict:
    """Registers and spill bytes of the entry function ``kernel_name`` from ptxas's verbose log."""
    entry = log.split(f"Compiling entry function '{kernel_name}'", 1)[-1]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
    registers = re.search(r"Used (\d+) registers", entry)
    if spills is None or registers is None:
        raise RuntimeError(f"no ptxas usage for {kernel_name} in its log: {log[-500:]!r}")
    return dict(
        registers=int(registers.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2))
    )


class Recording:
    """The distinct launches seen so far, each with the case that first made it."""

    def __init__(self):
        self.launches: dict = {}  # (kernel name, specialisation) -> (kernel, case, options, signature, ...)
        self.case = ""


class LaunchRecorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records what Triton would compile."""

    def __init__(self, kernel: JITFunction, recording: Recording):
        self.kernel = kernel
        self.recording = recording
        self.binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound_args, specialization, options = self.binder(*args, **kwargs)
            options, signature, constexprs, attrs = self.kernel._pack_args(
                BACKEND, kwargs, bound_args, specialization, options
            )
            key = (self.kernel.__name__, repr((signature, constexprs, attrs, options)))
            entry = (self.kernel, self.recording.case, options, signature, constexprs, attrs)
            self.recording.launches.setdefault(key, entry)

        return launch


def install_recorders(recording: Recording) -> dict[str, LaunchRecorder]:
    """Replace every kernel of KERNEL_MODULES (the JIT functions named ``*_kernel``; the others are device
    helpers they call) by a recorder, in its module, where the launchers look it up."""
    recorders = {}
    for module in KERNEL_MODULES:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                recorders[name] = LaunchRecorder(value, recording)
                setattr(module, name, recorders[name])
    return recorders


def run_case(
    seqlen,
    block_size,
    topk,
    heads_q=4,
    heads_kv=4,
    head_dim=128,
    dtype=torch.bfloat16,
    causal=True,
    deterministic=False,
) -> None:
    """One forward and backward through the library's Triton path on CPU tensors (nothing runs)."""
    q = torch.zeros(1, seqlen, heads_q, head_dim, dtype=dtype, requires_grad=True)
    k = torch.zeros(1, seqlen, heads_kv, head_dim, dtype=dtype, requires_grad=True)
    v = torch.zeros(1, seqlen, heads_kv, head_dim, dtype=dtype, requires_grad=True)
    out, lse = ops.moba_attn_triton(q, k, v, block_size, topk, causal, head_dim**-0.5, deterministic)
    (out.float().sum() + lse.sum()).backward()


def run_decode_case(
    batch,
    capacity,
    heads_q,
    heads_kv,
    head_dim,
    seqlen_q=1,
    block_size=128,
    topk=8,
    dtype=torch.bfloat16,
    paged=False,
    config=decode.DEFAULT_DECODE_CONFIG,
) -> None:
    """One append + route + attend through the decode launchers on CPU tensors (nothing runs)."""
    q = torch.zeros(batch, seqlen_q, heads_q, head_dim, dtype=dtype)
    k = torch.zeros(batch, seqlen_q, heads_kv, head_dim, dtype=dtype)
    if paged:
        max_pages = capacity // block_size
        cache_shape = (batch * max_pages, block_size, heads_kv, head_dim)
        block_table = torch.zeros(batch, max_pages, dtype=torch.int32)
    else:
        cache_shape, block_table = (batch, capacity, heads_kv, head_dim), None
    k_cache = torch.zeros(cache_shape, dtype=dtype)
    sums = torch.zeros(batch, capacity // block_size, heads_kv, head_dim, dtype=torch.float32)
    seqlens = torch.zeros(batch, dtype=torch.int32)
    decode.moba_decode_triton(
        q,
        k_cache,
        k_cache.clone(),
        sums,
        seqlens,
        block_size,
        topk,
        k,
        k.clone(),
        block_table,
        head_dim**-0.5,
        config,
    )


def main() -> int:
    knobs.nvidia.dump_ptxas_log = True
    recording = Recording()
    recorders = install_recorders(recording)
    for case, arguments in CASES.items():
        recording.case = case
        run_case(**arguments)
    # The target is sm_90, which takes programmatic dependent launches: the decode launchers choose them
    # as they would on an H100 or H200 (their CPU tensors alone would say no).
    decode.supports_pdl = lambda device: True
    for case, arguments in DECODE_CASES.items():
        recording.case = case
        run_decode_case(**arguments)
    launched = {kernel.__name__ for kernel, *_ in recording.launches.values()}
    never_launched = sorted(set(recorders) - launched)
    failures = 0
    for (name, _), (kernel, case, options, signature, constexprs, attrs) in recording.launches.items():
        started = time.perf_counter()
        row = dict(kernel=name, case=case, num_warps=options.num_warps, num_stages=options.num_stages)
        try:
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            ptxas_log = io.StringIO()  # Triton prints ptxas's log with dump_ptxas_log
            with contextlib.redirect_stdout(ptxas_log):
                compiled = triton.compile(source, target=TARGET, options=options.__dict__)
            row.update(
                status="ok", cubin_bytes=len(compiled.asm["cubin"]), shared_bytes=compiled.metadata.shared
            )
            row.update(ptxas_usage(ptxas_log.getvalue(), name))
        except Exception as error:  # noqa: BLE001 (report every failing launch, not only the first)
            failures += 1
            row.update(
                status="error",
                error=f"{type(error).__name__}: {error}"[-2000:],
                traceback=traceback.format_exc()[-3000:],
            )
        row["seconds"] = round(time.perf_counter() - started, 2)
        print(json.dumps(row), flush=True)
    if never_launched:
        print(
            json.dumps(dict(status="error", error=f"kernels no case launched: {never_launched}")), flush=True
        )
    return 1 if failures or never_launched else 0


if __name__ == "__main__":
    try:
        status = main()
    finally:
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    sys.exit(status)
