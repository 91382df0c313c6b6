"""End-to-end training throughput of the hybrid LM: one row of ``benchmarks/results/model_<card>.json``.

A *step* is one full training step as ``flashmoba.training.loop.train_step`` takes it with one micro-step:
forward under the training autocast policy (bf16 on CUDA, float32 on CPU), backward, gradient clipping,
AdamW as ``make_optimizer`` builds it, zero_grad. The batch is ``batch`` rows of ``seqlen`` random tokens,
each row one document, fed packed with ``cu_seqlens`` as the trainer feeds its batches (so dense and
sliding-window layers take the same kernels as in training).

- **Timing.** ``warmup`` steps first (Triton compilation and autotuning, allocator growth), then ``steps``
  measured steps, each timed with CUDA events on CUDA (``perf_counter`` around a synchronised step on
  CPU); ``step_ms`` is their median, ``tokens_per_s`` = tokens per step / ``step_ms``. Each step is
  synchronised, as the trainer's log steps are (every step by default). ``host_ms`` is the median of the
  host's part of a step: from its start until the step's Python returned, before the synchronisation;
  on CUDA a ``host_ms`` near ``step_ms`` says the host's launches bound the step (the GPU waits for
  them: ``idle_ms``), on CPU it is the step. ``peak_gib`` is
  ``torch.cuda.max_memory_allocated`` over the warm-up and measured steps (weights, gradients and AdamW
  state included; the warm-up because CUDA graphs allocate when recorded, not when replayed); None on
  CPU.
- **Split.** One more step runs under ``torch.profiler`` (CPU + CUDA). Its device kernels are classed by
  name (``KERNEL_CLASSES``) into attention, matrix products and other kernels, summed per class;
  ``idle_ms`` is ``step_ms`` minus the *union* of all kernel intervals (the time in which no kernel ran;
  0 at least). It is taken against the unprofiled ``step_ms`` because profiling slows the host's launches
  (on an H200 the profiled 340M step took about twice ``step_ms`` at 4K tokens) and so inflates the gaps,
  not the kernels; ``profiled_step_ms`` is the profiled step's wall time, so that step's own idle is
  ``profiled_step_ms`` minus the kernel union. On CPU there are no device kernels: the split is None.
- **MFU.** ``model_flops_per_step`` (below) / ``step_ms`` / the card's peak dense bf16 rate
  (``PEAK_BF16_FLOPS``); None for a card not in the table and on CPU.
- **The MoBA layer against the kernels.** ``moba_layer_ms`` is the profiled step's flashmoba kernels
  (``FLASHMOBA_KERNELS``) per MoBA layer; ``kernel_bench_ms`` is ``moba_attn_varlen`` forward + backward
  alone on inputs of the layer's shape (bf16, the Triton backend), timed in the same run; their ratio is
  what the layer costs beyond the kernels. ``top_kernels`` lists the step's heaviest kernels
  ([name, class, launches, ms]), which also names the kernel dense attention ran on.
- **Kernel settings.** ``rows_per_item``: ``KernelConfig.rows_per_item`` of the MoBA layers' Triton
  kernels (``HybridLM.set_kernel_config``), and ``kernel_settings``: the other ``KernelConfig`` fields a
  row sets (``{}``: the defaults), the same in the model's step and in ``kernel_bench_ms``. None for
  dense rows; the reference backend ignores them. ``dense_kernel``: the kernel of a dense row's global
  layers (``DENSE_KERNELS``), None for MoBA rows.
- **Settings.** ``compile_mode``: the ``torch.compile`` mode the blocks ran in
  (``HybridLM.compile_blocks``), None when eager; by default what ``flashmoba train`` takes
  (``TrainConfig.compile_mode`` on CUDA, through ``blocks_compile_mode``), eager on CPU. The optimizer is
  ``make_optimizer``'s (fused AdamW on CUDA); ``activation_checkpointing`` recomputes each block in
  backward. Offsets stay on the host as the trainer passes them, so no step waits for the GPU; the batch
  (one document per row) has static shapes, as CUDA graphs want.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterable

import torch

from flashmoba.bench.timing import card_name, time_cuda_ms
from flashmoba.models.hybrid import HybridLM, ModelConfig, is_global_layer, model_config_from_preset
from flashmoba.training.config import TrainConfig
from flashmoba.training.loop import make_optimizer
from flashmoba.training.runtime import autocast, begin_graph_iteration, blocks_compile_mode, head_compile_mode

ATTENTIONS = ("dense", "moba")
# The kernel of the dense model's global layers: "flash_varlen" as flashmoba train runs them (PyTorch's
# packed flash kernel, FlashAttention-2 code), or "cudnn" (SDPA per document with only cuDNN's backend
# enabled: on Hopper the fastest dense attention PyTorch has). The sliding-window layers of both models
# stay on flash varlen (SDPA's cuDNN backend takes no window).
DENSE_KERNELS = ("flash_varlen", "cudnn")
SPLIT_FIELDS = ("attention_ms", "matmul_ms", "other_ms", "idle_ms")
ROW_FIELDS = (
    "card",
    "preset",
    "seqlen",
    "batch",
    "attention",
    "dense_kernel",
    "block_size",
    "topk",
    "rows_per_item",
    "kernel_settings",
    "tokens_per_s",
    "step_ms",
    "host_ms",
    "profiled_step_ms",
    *SPLIT_FIELDS,
    "peak_gib",
    "mfu",
    "model_tflop_per_step",
    "moba_layer_ms",
    "kernel_bench_ms",
    "compile_mode",
    "head_compile_mode",
    "activation_checkpointing",
    "steps",
    "warmup",
    "top_kernels",
)


# flashmoba's own Triton kernels (ops/forward, backward, router, index): what a MoBA layer runs.
FLASHMOBA_KERNELS = re.compile(r"^_(moba|route|block|sort_keys)_")
TOP_KERNELS = 12

# Device kernels by name, first match wins (case-insensitive ``re.search``); a kernel no pattern matches is
# "other" (elementwise, reductions, norms, softmax of the loss, optimizer, memcpy/memset). Attention comes
# first because attention kernels often carry matmul words too (``fmha_cutlassF...``).
KERNEL_CLASSES: tuple[tuple[str, re.Pattern], ...] = (
    (
        "attention",
        re.compile(
            FLASHMOBA_KERNELS.pattern
            # dense and sliding-window attention: FlashAttention, cuDNN SDPA, memory-efficient (fmha)
            + r"|flash|fmha|sdpa|attention|attn",
            re.IGNORECASE,
        ),
    ),
    # cuBLAS / CUTLASS matrix products (nvjet: cuBLAS's Hopper kernels since CUDA 12.8)
    ("matmul", re.compile(r"gemm|gemv|matmul|cutlass|cublas|xmma|nvjet", re.IGNORECASE)),
)

# Peak dense (no sparsity) bf16 tensor-core FLOP/s by card name, first match wins (``re.search`` on
# ``torch.cuda.get_device_name()``), from the vendor's data sheets.
PEAK_BF16_FLOPS: tuple[tuple[re.Pattern, float], ...] = (
    (re.compile(r"H200|GH200"), 989e12),
    (re.compile(r"H100.*(PCIe)", re.IGNORECASE), 756e12),
    (re.compile(r"H100.*NVL", re.IGNORECASE), 835e12),
    (re.compile(r"H100"), 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (re.compile(r"A100"), 312e12),
    (re.compile(r"L40S"), 362e12),
)


# ----------------------------------------------------------------------------------------------------
# Model FLOPs
# ----------------------------------------------------------------------------------------------------


def attention_pairs(kind: str, seqlen: int, *, window: int = 0, block_size: int = 0, topk: int = 0) -> int:
    """(query, key) pairs one causal layer attends over one sequence of ``seqlen`` tokens.

    - ``dense``: query i sees keys 0..i: ``seqlen * (seqlen + 1) / 2``;
    - ``sliding``: query i sees ``min(i + 1, window)`` keys;
    - ``moba``: query i in block j (``j = i // block_size``) sees its own block causally (``i - j *
      block_size + 1`` keys) and ``min(topk - 1, j)`` earlier whole blocks (topk counts its own block).
    """
    if kind == "dense":
        return seqlen * (seqlen + 1) // 2
    if kind == "sliding":
        head = min(seqlen, window)
        return head * (head + 1) // 2 + (seqlen - head) * window
    if kind == "moba":
        pairs = 0
        for start in range(0, seqlen, block_size):
            size = min(block_size, seqlen - start)
            past_blocks = min(topk - 1, start // block_size)
            pairs += size * past_blocks * block_size + size * (size + 1) // 2
        return pairs
    raise ValueError(f"kind must be 'dense', 'sliding' or 'moba', got {kind!r}")


def matmul_parameters(model: HybridLM) -> int:
    """Parameters used in matrix products: all but the input embedding (a lookup, no FLOPs); the output
    head is a product and counts, tied or not."""
    count = model.num_parameters() - model.embed.weight.numel()
    return count + (model.embed.weight.numel() if model.config.tie_embeddings else 0)


def model_flops_per_step(config: ModelConfig, matmul_params: int, seqlen: int, batch: int) -> float:
    """Model FLOPs of one training step (forward + backward) on ``batch`` documents of ``seqlen`` tokens:

        6 * matmul_params * tokens                                       (weights: 2 fwd + 4 bwd per MAC)
      + sum over layers of 3 * 4 * head_dim * num_heads * pairs * batch  (attention)

    where ``pairs`` = ``attention_pairs`` of the layer (sliding window on even layers, ``global_attention``
    on odd ones): the keys each query actually attends, so MoBA counts only its selected blocks. Per
    (query, key, head) the forward does 2 * head_dim for Q K^T and 2 * head_dim for P V; the backward
    twice that (dV, dP, dQ, dK), hence 3 * 4 * head_dim. Not counted: softmax and norms, the router's
    block scores (forward only, no gradient), FlashAttention's recomputation in backward.
    """
    tokens = seqlen * batch
    flops = 6.0 * matmul_params * tokens
    for layer in range(config.num_layers):
        if is_global_layer(layer):
            pairs = attention_pairs(
                config.global_attention, seqlen, block_size=config.moba_block_size, topk=config.moba_topk
            )
        else:
            pairs = attention_pairs("sliding", seqlen, window=config.window_size)
        flops += 3 * 4 * config.head_dim * config.num_heads * pairs * batch
    return flops


def peak_bf16_flops(card: str) -> float | None:
    """The card's peak dense bf16 FLOP/s from ``PEAK_BF16_FLOPS``; None when unknown (and for "cpu")."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if pattern.search(card):
            return flops
    return None


# ----------------------------------------------------------------------------------------------------
# The profiled split
# ----------------------------------------------------------------------------------------------------


def classify_kernel(name: str) -> str:
    """ "attention", "matmul" or "other": the first class of ``KERNEL_CLASSES`` whose pattern ``name``
    matches."""
    for kind, pattern in KERNEL_CLASSES:
        if pattern.search(name):
            return kind
    return "other"


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the union of ``(start, end)`` intervals (overlaps counted once)."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def kernel_split(kernels: Iterable[tuple[str, float, float]], window: tuple[float, float]) -> dict:
    """Per-class kernel time (ms) of ``kernels`` (name, start us, end us) within ``window`` (start us, end
    us), kernels clipped to the window; ``busy_ms`` = the union of kernels, ``idle_ms`` = window - busy."""
    begin, finish = window
    times = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    per_name: dict[str, list] = {}  # name -> [launches, us]
    clipped = []
    for name, start, end in kernels:
        start, end = max(start, begin), min(end, finish)
        if end > start:
            times[classify_kernel(name)] += end - start
            clipped.append((start, end))
            launches_and_time = per_name.setdefault(name, [0, 0.0])
            launches_and_time[0] += 1
            launches_and_time[1] += end - start
    busy = union_length(clipped)
    heaviest = sorted(per_name.items(), key=lambda item: -item[1][1])[:TOP_KERNELS]
    flashmoba_us = sum(us for name, (_, us) in per_name.items() if FLASHMOBA_KERNELS.search(name))
    return {
        "attention_ms": times["attention"] / 1e3,
        "matmul_ms": times["matmul"] / 1e3,
        "other_ms": times["other"] / 1e3,
        "idle_ms": (finish - begin - busy) / 1e3,
        "busy_ms": busy / 1e3,
        "profiled_step_ms": (finish - begin) / 1e3,
        "flashmoba_ms": flashmoba_us / 1e3,
        "top_kernels": [[name, classify_kernel(name), count, us / 1e3] for name, (count, us) in heaviest],
    }


STEP_RANGE = "flashmoba_bench_step"


def device_kernels(events) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the CUDA device activities among profiler ``events`` (kernels, memcpy,
    memset), leaving out user annotations (``record_function`` ranges mirrored on the GPU)."""
    from torch.autograd import DeviceType

    return [
        (event.name, event.time_range.start, event.time_range.end)
        for event in events
        if event.device_type == DeviceType.CUDA and not event.is_user_annotation
    ]


def step_window(events) -> tuple[float, float]:
    """(start us, end us) of the CPU range ``STEP_RANGE`` (the step ends with a device synchronisation)."""
    from torch.autograd import DeviceType

    for event in events:
        if event.name == STEP_RANGE and event.device_type == DeviceType.CPU:
            return event.time_range.start, event.time_range.end
    raise RuntimeError(f"the profile holds no {STEP_RANGE!r} range")


def profiled_split(step: Callable[[], None], device: torch.device) -> dict | None:
    """The split of one profiled ``step`` (``kernel_split``); None off CUDA (no device kernels)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        with record_function(STEP_RANGE):
            step()
            torch.cuda.synchronize(device)
    events = profiler.events()
    return kernel_split(device_kernels(events), step_window(events))


# ----------------------------------------------------------------------------------------------------
# One training step and its timing
# ----------------------------------------------------------------------------------------------------


def synthetic_batch(vocab_size: int, seqlen: int, batch: int, device: torch.device) -> dict:
    """``batch`` documents of ``seqlen`` random tokens, packed: input_ids/targets ``[batch * seqlen]`` on
    ``device``; ``cu_seqlens`` on the host, as the trainer passes it."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab_size, (batch, seqlen + 1), generator=generator)
    return dict(
        input_ids=tokens[:, :-1].reshape(-1).to(device),
        targets=tokens[:, 1:].reshape(-1).to(device),
        cu_seqlens=torch.arange(batch + 1, dtype=torch.int32) * seqlen,
        max_seqlen=seqlen,
    )


def make_train_step(
    model: HybridLM,
    optimizer,
    batch: dict,
    device: torch.device,
    grad_clip: float,
    compile_mode: str | None = None,
):
    """``train_step``'s work with one micro-step and a fixed batch: forward, backward, clip, AdamW.
    ``compile_mode``: the blocks' (None: eager); with CUDA graphs each step begins a new iteration of
    them, as in ``train_step`` (without it, cudagraph trees leave their fast path, and the host's part
    of every step grows)."""

    def step() -> None:
        begin_graph_iteration(compile_mode)
        with autocast(device):
            _, loss = model(
                batch["input_ids"],
                targets=batch["targets"],
                cu_seqlens=batch["cu_seqlens"],
                max_seqlen=batch["max_seqlen"],
                return_logits=False,  # as training's batch_loss: the loss alone, no float32 logits
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps_ms(
    step: Callable[[], None], steps: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Milliseconds of each of ``steps`` calls (CUDA events on CUDA, perf_counter on CPU), and of the host's
    part of each (perf_counter until ``step`` returned, before the synchronisation)."""
    times, host_times = [], []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            begin = time.perf_counter()
            step()
            host_times.append((time.perf_counter() - begin) * 1e3)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
            host_times.append(times[-1])
    return times, host_times


def on_dense_kernel(model: HybridLM, step: Callable[[], None], dense_kernel: str) -> Callable[[], None]:
    """``step`` with the dense global layers of ``model`` on ``dense_kernel`` (``DENSE_KERNELS``). For
    "cudnn" the layers leave flash varlen for SDPA, and every call of the step (compilation included,
    which fixes the SDPA kernel a compiled graph calls) runs with cuDNN the only SDPA backend, so that
    the row fails rather than quietly timing another kernel."""
    if dense_kernel == "flash_varlen":
        return step
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for block in model.blocks:
        if block.attn.attention == "dense":
            block.attn.use_flash_varlen = False

    def cudnn_step() -> None:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            step()

    return cudnn_step


def moba_kernel_config(rows_per_item: int | None, kernel_settings: dict | None = None):
    """The ``KernelConfig`` of a MoBA row: the defaults with ``rows_per_item`` (None: its default) and the
    fields of ``kernel_settings`` (None or {}: none). Imported here, for MoBA rows only: ``flashmoba.ops``
    imports Triton."""
    from flashmoba.ops.config import KernelConfig

    settings = dict(kernel_settings or {})
    if rows_per_item is not None:
        settings["rows_per_item"] = rows_per_item
    return KernelConfig(**settings)


def moba_kernel_bench_ms(
    config: ModelConfig, seqlen: int, batch: int, kernel_config=None, repeats: int = 10
) -> float:
    """``moba_attn_varlen`` forward + backward alone (median ms, CUDA events) on bf16 inputs of a MoBA
    layer's shape in the model: ``batch`` packed documents of ``seqlen`` tokens, the config's heads,
    the kernels launched with ``kernel_config`` (a ``KernelConfig``; None: the defaults)."""
    from flashmoba.api import moba_attn_varlen

    generator = torch.Generator(device="cuda").manual_seed(0)
    total = seqlen * batch

    def randn(heads: int) -> torch.Tensor:
        shape = (total, heads, config.head_dim)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()

    q, k, v = randn(config.num_heads), randn(config.num_kv_heads), randn(config.num_kv_heads)
    grad_out = torch.randn_like(q)
    cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * seqlen

    def forward_backward() -> None:
        q.grad = k.grad = v.grad = None
        out = moba_attn_varlen(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            seqlen,
            seqlen,
            config.moba_block_size,
            config.moba_topk,
            softmax_scale=config.head_dim**-0.5,
            backend="triton",
            check_cu_seqlens=False,
            kernel_config=kernel_config,
        )
        out.backward(grad_out)

    return time_cuda_ms(forward_backward, repeats, warmup=2)


def measure_model(
    preset: str,
    seqlen: int,
    attention: str,
    *,
    block_size: int | None = None,
    topk: int | None = None,
    rows_per_item: int | None = None,
    kernel_settings: dict | None = None,
    dense_kernel: str = "flash_varlen",
    batch: int = 1,
    steps: int = 10,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    compile_blocks: bool | None = None,
    compile_mode: str | None = None,
    compile_head: bool | None = None,
    activation_checkpointing: bool = False,
) -> dict:
    """Measure training steps of preset ``preset`` with ``attention`` ("dense", or "moba" with
    ``block_size``, ``topk``, the kernels' ``rows_per_item`` (None: ``KernelConfig``'s default) and other
    ``KernelConfig`` fields in ``kernel_settings``) on
    ``batch`` documents of ``seqlen`` tokens; returns a results row. ``dense_kernel``: the dense global
    layers' kernel (``DENSE_KERNELS``; "cudnn" on CUDA only), ignored for MoBA.
    ``compile_blocks`` and ``compile_mode`` None: as ``flashmoba train`` on one process (compiled on CUDA
    in ``TrainConfig``'s default mode, eager on CPU). ``compile_head`` None: the head and loss compiled
    where the blocks are (``head_compile_mode``), as in training; False: eager (the step before they
    were compiled)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if dense_kernel not in DENSE_KERNELS:
        raise ValueError(f"dense_kernel must be one of {DENSE_KERNELS}, got {dense_kernel!r}")
    device = torch.device(device)
    dense_kernel = dense_kernel if attention == "dense" else None
    if dense_kernel == "cudnn" and device.type != "cuda":
        raise ValueError(f"dense_kernel 'cudnn' needs a CUDA device, got {str(device)!r}")
    if compile_blocks is None:
        compile_blocks = device.type == "cuda"
    if compile_blocks:
        requested = TrainConfig.compile_mode if compile_mode is None else compile_mode
        compile_mode = blocks_compile_mode(requested, activation_checkpointing, world=1)
    else:
        compile_mode = None
    if compile_head is None:
        compile_head = compile_mode is not None
    if compile_head and compile_mode is None:
        raise ValueError("compile_head needs compiled blocks (compile_blocks on a CUDA device)")
    head_mode = head_compile_mode(compile_mode) if compile_head else None
    overrides = dict(global_attention=attention, backend=backend)
    if attention == "moba":
        overrides.update(moba_block_size=block_size, moba_topk=topk)
    config = model_config_from_preset(preset, **overrides)
    # A launch setting, not part of the model: set on its MoBA layers, never in ModelConfig.
    kernel_config = moba_kernel_config(rows_per_item, kernel_settings) if attention == "moba" else None
    card = card_name() if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    model = HybridLM(config).to(device)
    model.train()
    model.activation_checkpointing = activation_checkpointing
    model.set_kernel_config(kernel_config)  # before the first step: a change would recompile the blocks
    if compile_mode is not None:
        model.compile_blocks(mode=compile_mode)
    if head_mode is not None:
        model.compile_head(mode=head_mode)
    train_config = TrainConfig(preset=preset, model=config)
    optimizer = make_optimizer(model, train_config)
    step = make_train_step(
        model,
        optimizer,
        synthetic_batch(config.vocab_size, seqlen, batch, device),
        device,
        train_config.grad_clip,
        compile_mode,
    )
    if dense_kernel is not None:
        step = on_dense_kernel(model, step, dense_kernel)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    # The peak spans the warm-up: CUDA graphs take their memory when recorded there, and replays
    # allocate nothing, so a peak of the measured steps alone would leave out the activations.
    time_steps_ms(step, warmup, device)
    step_times, host_times = time_steps_ms(step, steps, device)
    step_ms, host_ms = statistics.median(step_times), statistics.median(host_times)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    split = profiled_split(step, device)
    flops = model_flops_per_step(config, matmul_parameters(model), seqlen, batch)
    moba_layers = len(model.moba_layers())
    moba_layer_ms = kernel_bench_ms = top_kernels = None
    if split is not None:  # idle against the unprofiled step (see the module's docstring)
        split["idle_ms"] = max(step_ms - split.pop("busy_ms"), 0.0)
        flashmoba_ms, top_kernels = split.pop("flashmoba_ms"), split.pop("top_kernels")
        if moba_layers:
            moba_layer_ms = flashmoba_ms / moba_layers
            del model, optimizer, step  # the kernel benchmark runs alone on the card
            torch.cuda.empty_cache()
            kernel_bench_ms = moba_kernel_bench_ms(config, seqlen, batch, kernel_config)

    peak_flops = peak_bf16_flops(card) if device.type == "cuda" else None
    row = dict(
        card=card,
        preset=preset,
        seqlen=seqlen,
        batch=batch,
        attention=attention,
        dense_kernel=dense_kernel,
        block_size=block_size if attention == "moba" else None,
        topk=topk if attention == "moba" else None,
        rows_per_item=kernel_config.rows_per_item if kernel_config is not None else None,
        kernel_settings=dict(kernel_settings or {}) if attention == "moba" else None,
        tokens_per_s=seqlen * batch / (step_ms / 1e3),
        step_ms=step_ms,
        host_ms=host_ms,
        **(split or dict.fromkeys(("profiled_step_ms", *SPLIT_FIELDS))),
        peak_gib=peak_gib,
        mfu=None if peak_flops is None else flops / (step_ms / 1e3) / peak_flops,
        model_tflop_per_step=flops / 1e12,
        moba_layer_ms=moba_layer_ms,
        kernel_bench_ms=kernel_bench_ms,
        compile_mode=compile_mode,
        head_compile_mode=head_mode,
        activation_checkpointing=activation_checkpointing,
        steps=steps,
        warmup=warmup,
        top_kernels=top_kernels,
    )
    return {field: row[field] for field in ROW_FIELDS}
