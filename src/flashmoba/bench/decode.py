"""One decode step timed against its bytes floor: MoBA with a KV cache against dense decode on the same cache.

A step is one new token per sequence (seqlen_q 1) of a batch whose sequences all hold ``cache_len`` keys
after the step, in one layer: the new key and value are appended to the cache, then attended.

Implementations (field ``impl``):

- ``moba``: with ``k``, ``v`` (append, centroid update, router, split-K attention): on the Triton backend
  ``flashmoba.ops.decode.moba_decode_triton`` itself (the launcher behind ``moba_attn_with_kvcache``'s
  custom op, the one entry point that takes a ``DecodeConfig``), on the same inputs, once per launch
  config of ``decode_configs`` (field ``decode_config``: the config's set fields, ``{}`` for the
  default); other backends: ``moba_attn_with_kvcache``;
- ``sdpa``: the new key and value written into the cache, then ``F.scaled_dot_product_attention`` of the
  query over the whole cache (every sequence is ``cache_len`` long and the query is its last position, so
  no mask is needed), ``enable_gqa``, PyTorch's own choice of SDPA backend;
- ``flex``: the same with compiled FlexAttention (its decoding kernel for short queries), no block mask;
  CUDA only: elsewhere, or where it fails, the row says so in ``error``.

Timing: warm-up calls first (compilation, autotuning, the allocator), then, on CUDA, the step is captured
in a CUDA graph and its replays are timed with CUDA events (``timing`` "cuda_graph"; "eager" where the
capture fails, with the reason in ``note``, and for FlexAttention, whose compiled step is timed as it
runs); ``eager_ms`` times the plain calls. On CPU: perf_counter. Each timed replay starts on an idle
device, so ``step_ms`` includes the graph's launch from the host (a few µs, which scatter with the
host). ``graph_step_ms`` is the step as a model's decode graph runs it, one layer's attention after the
other's: ``GRAPH_STEPS`` steps captured in one graph, its replays' median over ``GRAPH_STEPS`` (the
same step each time: the bench's step does not advance the lengths), so the launch is shared by the
steps and what remains is their kernels and the gaps between them. None where ``step_ms`` is not a
replay.

With ``profile``, each row then gets a ``profile`` field: ``PROFILE_STEPS`` more steps as timed (CUDA-graph
replays, or the eager calls) under ``torch.profiler`` (``flashmoba.bench.timing.profile_steps``): kernels
per step, device µs per step, the ``PROFILE_TOP`` heaviest kernels by name; on the CPU, operators.

Bytes floor: the bytes a step must move, divided by the card's copy rate (``copy_gbps``: read + write bytes
per second of a large device-to-device copy measured in the same run). MoBA reads the centroids of the
candidate blocks (float32), the distinct blocks of K and V its query heads select per kv head (counted
from the step's own routing, recomputed in PyTorch outside the timing), q, and writes o and the new key and
value; dense reads the whole K and V. ``floor_ratio`` = ``step_ms / floor_ms`` (1: at the floor);
``device_floor_ratio`` (with ``profile`` on CUDA, else None): the profiled kernels' device time per step
over ``floor_ms``, which leaves out what a replay adds between kernels (the replayed ``step_ms`` scatters
by ~10% between rows of one call, the device time by ~1%). With GQA the attention loads each distinct
block once per kv head (``DecodeConfig.attn_by_group``); by query head (MHA, or ``attn_by_group=0``) it
reads K and V per query head and relies on the L2 cache for blocks that several heads of a group select,
so MoBA's ratio also measures that reuse.
"""

from __future__ import annotations

import functools
import math
import statistics
import time

import torch
import torch.nn.functional as F

from flashmoba.bench.timing import card_name, profile_steps
from flashmoba.kvcache import moba_attn_with_kvcache

IMPLEMENTATIONS = ("moba", "sdpa", "flex")
DEFAULT_CACHE_LENGTHS = (8192, 32768, 131072, 524288, 1048576)
DEFAULT_BATCHES = (1, 8, 32, 64)
DEFAULT_HEADS = ((32, 8, 128), (16, 16, 64))  # (heads_q, heads_kv, head_dim)
ROW_FIELDS = (
    "card",
    "impl",
    "backend",
    "cache_len",
    "batch",
    "heads_q",
    "heads_kv",
    "head_dim",
    "block_size",
    "topk",
    "dtype",
    "decode_config",
    "step_ms",
    "graph_step_ms",
    "eager_ms",
    "timing",
    "bytes_read",
    "floor_ms",
    "floor_ratio",
    "graph_floor_ratio",
    "device_floor_ratio",
    "copy_gbps",
    "note",
    "error",
)
PROFILE_STEPS = 8  # --profile: steps profiled per row (after the timing's warm-up)
GRAPH_STEPS = 8  # steps captured in one graph for graph_step_ms
PROFILE_TOP = 10  # kernels kept per row, the heaviest first
MEMORY_FRACTION = 0.8  # of the free device memory a configuration's caches may take
_SUMS_CHUNK_BYTES = 1 << 30  # float32 keys summed at once when filling the centroid cache


# ----------------------------------------------------------------------------------------------------
# The copy rate and the bytes floor
# ----------------------------------------------------------------------------------------------------


def copy_rate_gbps(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> float:
    """Read + write bytes per second (in GB/s) of a device-to-device copy of ``nbytes`` (default 2 GiB on
    CUDA, 64 MiB on CPU), the median over repeats after one warm-up copy."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 64 << 20)
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    milliseconds = _median_ms(lambda: target.copy_(source), device, repeats, warmup=1)
    source = target = None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the 2 x nbytes go back to the device: _fits reads its free memory
    return 2 * nbytes / (milliseconds * 1e-3) / 1e9


def moba_bytes(shape: dict, distinct_blocks: int) -> int:
    """Bytes a MoBA step must move: centroids of the candidate blocks, the distinct selected K and V blocks
    (``distinct_blocks`` (sequence, kv head, block) triples), q, o and the new key and value."""
    element = shape["element_size"]
    batch, heads_q, heads_kv, head_dim = (
        shape["batch"],
        shape["heads_q"],
        shape["heads_kv"],
        shape["head_dim"],
    )
    candidates = (shape["cache_len"] - 1) // shape["block_size"]
    centroids = batch * candidates * heads_kv * head_dim * 4
    blocks = distinct_blocks * shape["block_size"] * head_dim * element * 2
    return centroids + blocks + _step_io_bytes(batch, heads_q, heads_kv, head_dim, element)


def dense_bytes(shape: dict) -> int:
    """Bytes a dense decode step must move: the whole K and V, q, o and the new key and value."""
    element, batch = shape["element_size"], shape["batch"]
    cache = batch * shape["cache_len"] * shape["heads_kv"] * shape["head_dim"] * element * 2
    return cache + _step_io_bytes(batch, shape["heads_q"], shape["heads_kv"], shape["head_dim"], element)


def _step_io_bytes(batch, heads_q, heads_kv, head_dim, element) -> int:
    return batch * (2 * heads_q + 2 * heads_kv) * head_dim * element


def distinct_selected_blocks(q, block_sums, cache_len: int, block_size: int, topk: int) -> int:
    """(sequence, kv head, block) triples that a step's query heads select together: the router's rule
    recomputed in PyTorch (scores against the centroids of the complete blocks before the own block, the
    best topk - 1, plus the own block); ties may resolve otherwise than in the kernels, which does not
    change a count of random data."""
    batch, _, heads_q, head_dim = q.shape
    heads_kv = block_sums.shape[2]
    group = heads_q // heads_kv
    own_block = (cache_len - 1) // block_size
    picks = min(topk - 1, own_block)
    if picks == 0:
        return batch * heads_kv
    queries = q[:, 0].float().view(batch, heads_kv, group, head_dim)
    used = torch.zeros(batch, heads_kv, own_block + 1, dtype=torch.bool, device=q.device)
    for b in range(batch):  # one sequence at a time: the centroids' float32 copy stays small
        scores = torch.einsum("kgd,nkd->kgn", queries[b], block_sums[b, :own_block].float())  # complete
        best = scores.topk(picks, dim=-1).indices  # [Hkv, group, picks]; the / block_size changes no order
        used[b].scatter_(-1, best.flatten(1), True)
    used[..., own_block] = True
    return int(used.sum())


# ----------------------------------------------------------------------------------------------------
# Inputs and steps
# ----------------------------------------------------------------------------------------------------


def cache_bytes(shape: dict) -> int:
    """Device bytes of one configuration's inputs: K and V caches, the centroid cache, q, k, v."""
    element, batch = shape["element_size"], shape["batch"]
    tokens = batch * shape["cache_len"] * shape["heads_kv"] * shape["head_dim"]
    sums = batch * math.ceil(shape["cache_len"] / shape["block_size"]) * shape["heads_kv"] * shape["head_dim"]
    return 2 * tokens * element + 4 * sums + _step_io_bytes(**_io_shape(shape))


def _io_shape(shape: dict) -> dict:
    return {key: shape[key] for key in ("batch", "heads_q", "heads_kv", "head_dim")} | dict(
        element=shape["element_size"]
    )


def make_inputs(shape: dict, device: torch.device, seed: int = 0) -> dict:
    """Random caches holding ``cache_len - 1`` keys per sequence, their centroid cache, and one step's
    q, k, v. The caches' capacity is ``cache_len``: the step fills them."""
    generator = torch.Generator(device=device).manual_seed(seed)
    dtype = shape["dtype"]
    batch, cache_len = shape["batch"], shape["cache_len"]
    heads_q, heads_kv, head_dim, block = (
        shape["heads_q"],
        shape["heads_kv"],
        shape["head_dim"],
        shape["block_size"],
    )

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device, dtype=dtype)

    k_cache = randn(batch, cache_len, heads_kv, head_dim)
    v_cache = randn(batch, cache_len, heads_kv, head_dim)
    cached = cache_len - 1
    block_sums = torch.zeros(
        batch, math.ceil(cache_len / block), heads_kv, head_dim, dtype=torch.float32, device=device
    )
    # Summed a few blocks of the batch at a time: the float32 copies stay under _SUMS_CHUNK_BYTES.
    chunk_blocks = max(1, _SUMS_CHUNK_BYTES // (batch * block * heads_kv * head_dim * 4))
    for first in range(0, math.ceil(cached / block), chunk_blocks):
        last = min(first + chunk_blocks, math.ceil(cached / block))
        keys = k_cache[:, first * block : min(last * block, cached)].float()
        padded = keys.new_zeros(batch, (last - first) * block, heads_kv, head_dim)
        padded[:, : keys.shape[1]] = keys
        block_sums[:, first:last] = padded.view(batch, last - first, block, heads_kv, head_dim).sum(2)
    return dict(
        q=randn(batch, 1, heads_q, head_dim),
        k=randn(batch, 1, heads_kv, head_dim),
        v=randn(batch, 1, heads_kv, head_dim),
        k_cache=k_cache,
        v_cache=v_cache,
        block_sums=block_sums,
        cache_seqlens=torch.full((batch,), cached, dtype=torch.int32, device=device),
    )


def moba_step(inputs: dict, block_size: int, topk: int, backend: str, decode_config: dict | None = None):
    """The MoBA step: append (in place at ``cache_len - 1``, the lengths not advanced: every call is the
    same step) and attend. Triton: ``moba_decode_triton`` with ``DecodeConfig(**decode_config)``; other
    backends take no config."""
    if backend == "triton":
        from flashmoba.ops.decode import DecodeConfig, moba_decode_triton

        config = DecodeConfig(**(decode_config or {}))
        k_cache = inputs["k_cache"]
        block = min(block_size, k_cache.shape[1])  # as moba_attn_with_kvcache: at most the capacity
        scale = inputs["q"].shape[-1] ** -0.5

        def triton_step():
            out, _ = moba_decode_triton(
                inputs["q"],
                k_cache,
                inputs["v_cache"],
                inputs["block_sums"],
                inputs["cache_seqlens"],
                block,
                topk,
                inputs["k"],
                inputs["v"],
                None,
                scale,
                config,
            )
            return out

        return triton_step
    if decode_config:
        raise ValueError(f"a decode config needs the triton backend, got backend {backend!r}")

    def step():
        return moba_attn_with_kvcache(
            inputs["q"],
            inputs["k_cache"],
            inputs["v_cache"],
            inputs["block_sums"],
            inputs["cache_seqlens"],
            block_size,
            topk,
            k=inputs["k"],
            v=inputs["v"],
            backend=backend,
        )

    return step


@functools.cache
def _compiled_flex_attention():
    """One compiled FlexAttention for the process: its shapes go dynamic after the first recompile, so
    a sweep compiles a few times, not once per configuration."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def dense_step(inputs: dict, impl: str):
    """The dense step: write the new key and value at the last position, attend over the whole cache."""
    if impl == "flex":
        attend = _compiled_flex_attention()
    else:
        attend = F.scaled_dot_product_attention
    k_cache, v_cache = inputs["k_cache"], inputs["v_cache"]
    last = k_cache.shape[1] - 1

    def step():
        k_cache[:, last] = inputs["k"][:, 0]
        v_cache[:, last] = inputs["v"][:, 0]
        out = attend(
            inputs["q"].transpose(1, 2),
            k_cache.transpose(1, 2),
            v_cache.transpose(1, 2),
            enable_gqa=inputs["q"].shape[2] != k_cache.shape[2],
        )
        return out.transpose(1, 2)

    return step


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def _median_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of fn(): CUDA events on CUDA (after the warm-up calls), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def time_step(
    step, device: torch.device, repeats: int, warmup: int, graphs: bool, profile: bool = False
) -> dict:
    """``eager_ms``; on CUDA with ``graphs`` also ``step_ms`` of CUDA-graph replays (else the eager
    time) and ``graph_step_ms`` (``GRAPH_STEPS`` steps in one graph, per step; else None), ``timing`` and
    ``note`` (why a capture failed). With ``profile`` also ``profile``: the one-step replays (else the
    eager calls) profiled for ``PROFILE_STEPS`` steps."""

    def profiled(result: dict, timed) -> dict:
        if profile:
            result["profile"] = profile_steps(timed, device, PROFILE_STEPS, PROFILE_TOP)
        return result

    with torch.no_grad():
        eager_ms = _median_ms(step, device, repeats, warmup)
        result = dict(eager_ms=eager_ms, step_ms=eager_ms, graph_step_ms=None, note=None)
        if device.type != "cuda":
            return profiled(dict(result, timing="perf_counter"), step)
        if not graphs:
            return profiled(dict(result, timing="eager"), step)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()  # settles the allocator for the capture
            torch.cuda.current_stream(device).wait_stream(side)
            graph, steps_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            with torch.cuda.graph(steps_graph):
                for _ in range(GRAPH_STEPS):
                    step()
        except RuntimeError as error:
            torch.cuda.synchronize(device)
            failed = dict(result, timing="eager", note=f"graph capture failed: {_first_line(error)}")
            return profiled(failed, step)
        result["step_ms"] = _median_ms(graph.replay, device, repeats, warmup=2)
        result["graph_step_ms"] = _median_ms(steps_graph.replay, device, repeats, warmup=2) / GRAPH_STEPS
        result = profiled(dict(result, timing="cuda_graph"), graph.replay)
        del graph, steps_graph
        return result


# ----------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------


def _first_line(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _row(shape: dict, impl: str, backend: str | None, copy_gbps: float, decode_config=None, **fields) -> dict:
    """A row of ``ROW_FIELDS`` (``decode_config``: MoBA rows only), then ``profile`` where given."""
    row = dict.fromkeys(ROW_FIELDS)
    sparse = impl == "moba"
    row.update(
        card=card_name() if shape["device"].type == "cuda" else "cpu",
        impl=impl,
        backend=backend if sparse else None,
        cache_len=shape["cache_len"],
        batch=shape["batch"],
        heads_q=shape["heads_q"],
        heads_kv=shape["heads_kv"],
        head_dim=shape["head_dim"],
        block_size=shape["block_size"] if sparse else None,
        topk=shape["topk"] if sparse else None,
        dtype=str(shape["dtype"]).removeprefix("torch."),
        decode_config=dict(decode_config or {}) if sparse else None,
        copy_gbps=copy_gbps,
    )
    row.update(fields)
    return row


def decode_shape(cache_len, batch, heads_q, heads_kv, head_dim, block_size, topk, dtype, device) -> dict:
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return dict(
        cache_len=cache_len,
        batch=batch,
        heads_q=heads_q,
        heads_kv=heads_kv,
        head_dim=head_dim,
        block_size=block_size,
        topk=topk,
        dtype=dtype,
        element_size=torch.empty(0, dtype=dtype).element_size(),
        device=torch.device(device),
    )


def _fits(shape: dict) -> str | None:
    """None where the configuration's inputs fit on the device; else why not."""
    if shape["device"].type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(shape["device"])
    needed = cache_bytes(shape)
    if needed > MEMORY_FRACTION * free:
        return f"skipped: the caches need {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def measure_decode(
    shape: dict,
    impls,
    *,
    backend: str = "triton",
    repeats: int = 20,
    warmup: int = 3,
    graphs: bool = True,
    copy_gbps: float | None = None,
    decode_configs=({},),
    profile: bool = False,
) -> list[dict]:
    """Time each of ``impls`` on one configuration (one set of caches shared by all); returns their rows,
    ``moba`` once per launch config of ``decode_configs`` (dicts of ``DecodeConfig`` fields; ``{}``: the
    default; non-default ones need the triton backend), with ``profile`` a ``profile`` field each. A
    configuration that does not fit, or an implementation that fails, gives rows with ``error``."""
    decode_configs = [dict(config) for config in decode_configs]
    if backend != "triton" and any(decode_configs):
        raise ValueError(f"decode configs need the triton backend, got backend {backend!r}")
    runs = [(impl, config) for impl in impls for config in (decode_configs if impl == "moba" else [None])]
    device = shape["device"]
    copy_gbps = copy_gbps if copy_gbps is not None else copy_rate_gbps(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous configuration's caches: _fits reads the free memory
    reason = _fits(shape)
    if reason is not None:
        return [_row(shape, impl, backend, copy_gbps, config, error=reason) for impl, config in runs]
    inputs = make_inputs(shape, device)
    rows = []
    for impl, config in runs:
        try:
            rows.append(
                _measure_one(
                    shape, inputs, impl, backend, repeats, warmup, graphs, copy_gbps, config, profile
                )
            )
        except (torch.OutOfMemoryError, RuntimeError, ValueError, NotImplementedError, ImportError) as error:
            rows.append(_row(shape, impl, backend, copy_gbps, config, error=_first_line(error)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _measure_one(
    shape, inputs, impl, backend, repeats, warmup, graphs, copy_gbps, decode_config=None, profile=False
) -> dict:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    device = shape["device"]
    if impl == "flex" and device.type != "cuda":
        return _row(shape, impl, backend, copy_gbps, error="FlexAttention's decoding kernel needs CUDA")
    if impl == "moba":
        step = moba_step(inputs, shape["block_size"], shape["topk"], backend, decode_config)
        distinct = distinct_selected_blocks(
            inputs["q"], inputs["block_sums"], shape["cache_len"], shape["block_size"], shape["topk"]
        )
        bytes_read = moba_bytes(shape, distinct)
    else:
        step = dense_step(inputs, impl)
        bytes_read = dense_bytes(shape)
    # Compiled FlexAttention runs eagerly: a capture that fails inside its generated code could leave the
    # stream capturing and fail every later row.
    timed = time_step(step, device, repeats, warmup, graphs and impl != "flex", profile)
    if impl == "flex" and graphs and device.type == "cuda":
        timed["note"] = "compiled, not captured in a CUDA graph"
    floor_ms = bytes_read / (copy_gbps * 1e9) * 1e3
    profiled = timed.get("profile")
    device_floor_ratio = None
    if profiled is not None and profiled["activity"] == "cuda_kernels":
        device_floor_ratio = profiled["device_us_per_step"] / 1e3 / floor_ms
    return _row(
        shape,
        impl,
        backend,
        copy_gbps,
        decode_config,
        bytes_read=bytes_read,
        floor_ms=floor_ms,
        floor_ratio=timed["step_ms"] / floor_ms,
        graph_floor_ratio=None if timed["graph_step_ms"] is None else timed["graph_step_ms"] / floor_ms,
        device_floor_ratio=device_floor_ratio,
        **timed,
    )
