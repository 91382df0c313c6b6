"""End-to-end generation speed of the hybrid LM: one row of ``benchmarks/results/generate_<card>.json``.

A row is ``HybridLM.generate`` (``flashmoba.models.generation``) of a preset with random weights in bf16
on CUDA (float32 on CPU), greedy, on ``batch`` random prompts of ``prompt_len`` tokens, ``new_tokens``
tokens each: the prompt is one prefill call (MoBA layers: ``MoBAKVCache.prefill``, i.e. ``moba_attn``;
dense layers: SDPA), then one call per token (MoBA: the Triton decode kernels; dense: SDPA against the
whole cache, preallocated), in ``decode_mode`` (``flashmoba.models.generation.DECODE_MODES``:
"cuda_graph" replays each step as one CUDA graph, "compiled_graph" replays the Inductor-compiled step as
one, "eager" launches every kernel from Python). A first generation of 4 tokens at the same prompt length
warms up (Triton and Inductor compilation, allocator growth, a first capture) and is not counted; the
measured one still captures its own graph (and may recompile, for a new decoder's guards), which its
decode time includes; ``steady_decode_ms_per_step`` leaves out the first ``WARM_DECODE_STEPS`` decode
steps (the eager or compiling one and the capture). Tokens/s are summed over the batch; the decode rate
leaves out the first new token, which comes with the prefill. Random weights decode as fast as trained
ones: nothing here depends on what the tokens are.

With ``profile``, the measured generation then runs ``PROFILE_WARM_STEPS`` more steps and
``PROFILE_STEPS`` steady ones under ``torch.profiler`` (the same decoder and cache, through
``generate``'s ``after_decode``: the step the timing measured, not a second decode loop), and the row
gets a ``profile`` field (``profile_decode_steps``). On CUDA it counts device activities (kernels,
memcpys and memsets, CUPTI sees them inside CUDA-graph replays too); on the CPU, operators.
"""

from __future__ import annotations

import torch

from flashmoba.bench.timing import (  # noqa: F401 (PROFILE_*: re-exported, bench generate's names)
    PROFILE_FIELDS,
    PROFILE_NAME_CHARS,
    PROFILE_TOP_FIELDS,
    card_name,
    profile_steps,
)
from flashmoba.models.generation import DECODE_MODES, WARM_DECODE_STEPS, generate
from flashmoba.models.hybrid import HybridLM, model_config_from_preset

ATTENTIONS = ("dense", "moba")
ROW_FIELDS = (
    "card",
    "preset",
    "attention",
    "block_size",
    "topk",
    "prompt_len",
    "decode_mode",
    "batch",
    "new_tokens",
    "prefill_s",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "decode_ms_per_step",
    "steady_decode_ms_per_step",
    "peak_gib",
)
# --profile: steps run unprofiled first (a step that is still a first eager run or a capture would
# count its Triton launches and capture work), then the profiled steady steps and the entries kept.
PROFILE_WARM_STEPS = WARM_DECODE_STEPS
PROFILE_STEPS = 8
PROFILE_TOP = 15


def profile_decode_steps(
    step, token: torch.Tensor, device: torch.device, steps: int = PROFILE_STEPS, top: int = PROFILE_TOP
) -> dict:
    """Profile ``steps`` calls of the decode ``step`` (``token [batch]`` -> logits) after
    ``PROFILE_WARM_STEPS`` unprofiled ones: ``flashmoba.bench.timing.profile_steps`` (per step: the device
    kernels and their time, the ``top`` entries; CPU operators on the CPU)."""
    for _ in range(PROFILE_WARM_STEPS):
        step(token)
    return profile_steps(lambda: step(token), device, steps, top)


def measure_generate(
    preset: str,
    prompt_len: int,
    attention: str,
    *,
    block_size: int | None = None,
    topk: int | None = None,
    batch: int = 1,
    new_tokens: int = 32,
    device: torch.device | str = "cpu",
    decode_mode: str = "auto",
    profile: bool = False,
) -> dict:
    """Time ``generate`` of preset ``preset`` with ``attention`` global layers ("dense", or "moba" with
    ``block_size`` and ``topk``); returns a results row (with ``profile``: and its ``profile`` field,
    ``profile_decode_steps`` of the measured generation's decoder after the timing)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
    device = torch.device(device)
    if decode_mode == "auto":
        decode_mode = "cuda_graph" if device.type == "cuda" else "eager"
    overrides = dict(global_attention=attention)
    if attention == "moba":
        overrides.update(moba_block_size=block_size, moba_topk=topk)
    config = model_config_from_preset(preset, **overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = HybridLM(config).to(device=device, dtype=dtype).eval()
    prompts = torch.randint(config.vocab_size, (batch, prompt_len), device=device)
    if decode_mode in ("compiled", "compiled_graph"):
        # Every row compiles its own step: torch.compile's recompile limit counts the rows' shapes and
        # models together, and past it a step would silently run eagerly under the compiled label.
        torch._dynamo.reset()
    generate(model, prompts, 4, decode_mode=decode_mode)  # warm-up at the measured shapes
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    stats: dict = {}
    profiled: dict = {}

    def profile_after_decode(step, token):
        profiled.update(profile_decode_steps(step, token, device))

    generate(
        model,
        prompts,
        new_tokens,
        stats=stats,
        decode_mode=decode_mode,
        after_decode=profile_after_decode if profile else None,
        after_decode_steps=PROFILE_WARM_STEPS + PROFILE_STEPS if profile else 0,
    )
    decode_steps = stats["decode_tokens"] // batch if batch else 0
    row = dict(
        card=card_name() if device.type == "cuda" else "cpu",
        preset=preset,
        attention=attention,
        block_size=block_size if attention == "moba" else None,
        topk=topk if attention == "moba" else None,
        prompt_len=prompt_len,
        decode_mode=decode_mode,
        batch=batch,
        new_tokens=new_tokens,
        prefill_s=stats["prefill_seconds"],
        prefill_tokens_per_s=stats["prefill_tokens"] / stats["prefill_seconds"],
        decode_tokens_per_s=stats["decode_tokens"] / stats["decode_seconds"] if decode_steps else None,
        decode_ms_per_step=stats["decode_seconds"] * 1e3 / decode_steps if decode_steps else None,
        steady_decode_ms_per_step=(
            stats["steady_decode_seconds"] * 1e3 * batch / stats["steady_decode_tokens"]
            if stats["steady_decode_tokens"]
            else None
        ),
        peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    )
    row = {field: row[field] for field in ROW_FIELDS}
    if profile:
        row["profile"] = profiled
    return row
