"""``flashmoba bench``: flashmoba against dense attention, latency and peak memory over sequence length.

Rows (one per implementation, sequence length, head_dim and block size / topk pair) come from
``flashmoba.bench.measure``: ``flashmoba`` (Triton, routing included), ``sdpa_flash``, ``sdpa_cudnn`` and
``flex`` (FlexAttention with a MoBA BlockMask). Results go to ``benchmarks/results/<card>.json`` (a list
of rows: card, impl, seqlen, batch, heads, head_dim, block_size, topk, causal, route_ms, fwd_ms,
fwd_bwd_ms, peak_mem_gib) with a plot beside it. Without CUDA it says so and compares the reference with
the Triton interpreter on a small case.

``flashmoba bench model [flags]``: end-to-end training steps of the hybrid LM, dense against MoBA, by
preset, sequence length, block size / topk pair and the MoBA kernels' ``rows_per_item``
(``flashmoba.bench.model``): tokens/s, the step split into attention, matrix products, other kernels and
GPU idle, peak memory and MFU, to ``benchmarks/results/model_<card>.json`` with a plot beside it and a
markdown table on stdout.

``flashmoba bench decode [flags]``: one decode step (seqlen_q 1: append, route, attend) of MoBA with a KV
cache against dense decode on the same cache (SDPA, FlexAttention), by cache length, batch and head
configuration (``flashmoba.bench.decode``): latency (CUDA-graph replays), the bytes floor at the copy
rate measured in the same run and the ratio to it, to ``benchmarks/results/decode_<card>.json`` with a
plot beside it and a markdown table on stdout; ``--decode-configs`` sweeps the Triton kernels' launch
settings (``DecodeConfig``, one MoBA row per config), ``--profile`` adds each row's kernels per step.

``flashmoba bench generate [flags]``: ``HybridLM.generate`` end to end, dense against MoBA global layers,
by prompt length (``flashmoba.bench.generate``): prefill and decode tokens/s, to
``benchmarks/results/generate_<card>.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from flashmoba._checks import bool_fields, check_choice
from flashmoba.api import moba_attn
from flashmoba.bench import DEFAULT_SEQLENS, IMPLEMENTATIONS, card_name, measure, router_tflops
from flashmoba.bench.timing import _file_stem
from flashmoba.cli._flags import int_at_least, ints_at_least


def _repeats(seqlen: int, requested: int | None) -> int:
    """Fewer repeats where one call takes seconds (dense attention at 256K+ takes tens of seconds)."""
    if requested is not None:
        return requested
    return 20 if seqlen <= 32768 else 5 if seqlen <= 131072 else 2


def print_table(rows: list[dict]) -> None:
    dense = {
        (r["seqlen"], r["head_dim"], r["batch"], r["heads"]): r for r in rows if r["impl"] == "sdpa_flash"
    }
    header = (
        f"{'impl':<10} {'N':>7} {'B':>4} {'k':>3} {'route ms':>9} {'fwd ms':>9} {'fwd+bwd':>9} "
        f"{'fwd x':>7} {'f+b x':>7} {'GiB':>6} {'route TF/s':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.get("error"):
            print(f"{row['impl']:<10} {row['seqlen']:>7} {'':>4} {'':>3}  failed: {row['error'][:60]}")
            continue
        base = dense.get((row["seqlen"], row["head_dim"], row["batch"], row["heads"]))
        print(
            f"{row['impl']:<10} {row['seqlen']:>7} {_number(row['block_size'], 'd'):>4} "
            f"{_number(row['topk'], 'd'):>3} "
            f"{_number(row['route_ms']):>9} {_number(row['fwd_ms']):>9} {_number(row['fwd_bwd_ms']):>9} "
            f"{_speedup(base, row, 'fwd_ms'):>7} {_speedup(base, row, 'fwd_bwd_ms'):>7} "
            f"{_number(row['peak_mem_gib']):>6} {_number(router_tflops(row), '.0f'):>10}"
        )


def _speedup(base: dict | None, row: dict, field: str) -> str:
    """How many times faster ``row`` is than the dense row ``base`` in ``field``, or "-"."""
    if base is None or base.get(field) is None or row.get(field) is None:
        return "-"
    return f"{base[field] / row[field]:.1f}x"


def _number(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def plot(rows: list[dict], path: Path) -> None:
    """Latency and peak memory against N (the shape of the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("error"):
            continue
        label = (
            row["impl"]
            if row["block_size"] is None
            else f"{row['impl']} B={row['block_size']} k={row['topk']}"
        )
        series.setdefault(f"{label} d={row['head_dim']}", []).append(row)
    for label, points in series.items():
        points.sort(key=lambda r: r["seqlen"])
        seqlens = [r["seqlen"] for r in points]
        for axis, field in zip(axes, ("fwd_ms", "fwd_bwd_ms", "peak_mem_gib")):
            axis.plot(seqlens, [r[field] for r in points], marker="o", label=label)
    for axis, title in zip(axes, ("forward (ms)", "forward + backward (ms)", "peak memory fwd+bwd (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length N")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"flashmoba vs dense attention on {rows[0]['card'] if rows else '?'}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def cpu_comparison() -> int:
    """No CUDA: compare the reference with the Triton kernels in Triton's interpreter on a small case."""
    print(
        "flashmoba bench: no CUDA device here; the GPU benchmark needs one. Running a small CPU comparison "
        "instead: the PyTorch reference against the Triton kernels in Triton's interpreter."
    )
    os.environ["TRITON_INTERPRET"] = "1"
    generator = torch.Generator().manual_seed(0)
    batch, seqlen, heads, head_dim, block_size, topk = 1, 256, 2, 32, 32, 3
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, generator=generator) for _ in range(3))
    results = {}
    for backend in ("reference", "triton"):
        start = time.perf_counter()
        try:
            results[backend] = moba_attn(q, k, v, block_size, topk, backend=backend)
        except NotImplementedError as error:
            print(f"  {backend}: not available ({error})")
            continue
        print(
            f"  {backend:<9} forward {1e3 * (time.perf_counter() - start):8.1f} ms  "
            f"(B={batch} N={seqlen} H={heads} d={head_dim} block {block_size} topk {topk}, float32)"
        )
    if len(results) == 2:
        error = (results["triton"] - results["reference"]).abs().max().item()
        print(f"  max |triton - reference| = {error:.2e}")
        return 0 if error < 1e-4 else 1
    return 0


def _impls(text: str) -> list[str]:
    """An argparse ``type``: a comma list of names from IMPLEMENTATIONS, each once."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names from {IMPLEMENTATIONS}, got {text!r}"
        )
    for name in names:
        try:
            check_choice("", name, IMPLEMENTATIONS)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).strip()) from None
        if names.count(name) > 1:
            raise argparse.ArgumentTypeError(f"names {name!r} more than once, got {text!r}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmoba bench",
        description=__doc__.splitlines()[0],
        epilog="'flashmoba bench model --help': training throughput of the hybrid LM, dense against MoBA; "
        "'flashmoba bench decode --help': one decode step with a KV cache, MoBA against dense; "
        "'flashmoba bench generate --help': generation with the hybrid LM, MoBA against dense",
    )
    positive, positives = int_at_least(1), ints_at_least(1)
    parser.add_argument("--seqlens", type=positives, default=list(DEFAULT_SEQLENS))
    _add_block_flags(parser)
    parser.add_argument("--head-dims", type=positives, default=[128])
    parser.add_argument("--batch", type=positive, default=2)
    parser.add_argument("--heads", type=positive, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument(
        "--non-causal", action="store_true", help="benchmark non-causal MoBA (dense stays causal)"
    )
    parser.add_argument(
        "--impls", type=_impls, default=list(IMPLEMENTATIONS), help=f"comma list from {IMPLEMENTATIONS}"
    )
    parser.add_argument(
        "--dense-max-seqlen",
        type=int_at_least(0),
        default=1 << 20,
        help="skip dense baselines above this N (0: skip them all)",
    )
    parser.add_argument(
        "--flex-max-seqlen",
        type=int_at_least(0),
        default=65536,
        help="skip FlexAttention above this N (0: skip it)",
    )
    parser.add_argument(
        "--repeats", type=positive, default=None, help="default: 20 up to 32K, 5 up to 128K, then 2"
    )
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<card>.json")
    _add_replot_flag(parser)
    return parser


def _add_block_flags(parser: argparse.ArgumentParser) -> None:
    """--block-sizes and --topks, paired position by position (``_check_pairs``)."""
    positives = ints_at_least(1)
    parser.add_argument(
        "--block-sizes",
        type=positives,
        default=[128],
        help="comma list; paired with --topks position by position",
    )
    parser.add_argument("--topks", type=positives, default=[8])


def _add_replot_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help="only redraw the plot and table of an existing results file",
    )


def _check_pairs(parser: argparse.ArgumentParser, args) -> None:
    """--block-sizes and --topks pair up position by position."""
    if len(args.block_sizes) != len(args.topks):
        parser.error(
            f"argument --topks: must have as many entries as --block-sizes ({len(args.block_sizes)}), "
            f"got {len(args.topks)}: --block-sizes {args.block_sizes} vs --topks {args.topks}"
        )


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """What one flag alone cannot say; runs before any work, with or without CUDA."""
    _check_pairs(parser, args)
    if args.out is not None and args.out.is_dir():
        parser.error(f"argument --out: must be a file path, got the directory {str(args.out)!r}")
    if args.replot is not None and not args.replot.is_file():
        parser.error(f"argument --replot: no such file, got {str(args.replot)!r}")


def _read_rows(parser: argparse.ArgumentParser, path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        parser.error(f"argument --replot: cannot read {str(path)!r} as JSON ({error})")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        parser.error(f"argument --replot: {str(path)!r} must hold a list of result rows")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["model"]:
        return model_main(argv[1:])
    if argv[:1] == ["decode"]:
        return decode_main(argv[1:])
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    if args.replot is not None:
        rows = _read_rows(parser, args.replot)
        plot(rows, args.replot.with_suffix(".png"))
        print_table(rows)
        return 0

    if not torch.cuda.is_available():
        return cpu_comparison()
    out = args.out or Path("benchmarks/results") / f"{_file_stem(card_name())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    rows = _run_jobs(_jobs(args, args.impls), args.repeats, out)
    try:
        plot(rows, out.with_suffix(".png"))
    except ImportError as error:  # a GPU image without matplotlib: replot elsewhere with --replot
        print(f"no plot ({error}); run 'flashmoba bench --replot {out}' where matplotlib is installed")
    print(
        f"\n{card_name()}, {args.dtype}, batch {args.batch}, {args.heads} heads; speedups against sdpa_flash "
        f"in this run; results in {out}"
    )
    print_table(rows)
    return 0


def _jobs(args, impls: list[str]) -> list[tuple[str, dict]]:
    """(implementation, configuration) pairs in run order; dense baselines ignore block size and topk."""
    jobs = []
    for seqlen in args.seqlens:
        for head_dim in args.head_dims:
            base = dict(
                batch=args.batch,
                seqlen=seqlen,
                heads=args.heads,
                head_dim=head_dim,
                causal=not args.non_causal,
                dtype=args.dtype,
            )
            for impl in impls:
                if impl in ("sdpa_flash", "sdpa_cudnn"):
                    if seqlen <= args.dense_max_seqlen:
                        jobs.append((impl, dict(base, block_size=None, topk=None)))
                    continue
                if impl == "flex" and seqlen > args.flex_max_seqlen:
                    continue
                for block_size, topk in zip(args.block_sizes, args.topks):
                    jobs.append((impl, dict(base, block_size=block_size, topk=topk)))
    return jobs


def _run_jobs(jobs: list[tuple[str, dict]], repeats: int | None, out: Path) -> list[dict]:
    """Measure each job; a job that fails leaves a row with its error. The file is rewritten after each
    job, so that a later run that dies keeps the partial results."""
    rows = []
    for impl, config in tqdm(jobs, desc="flashmoba bench", unit="run"):
        try:
            row = measure(impl, config, _repeats(config["seqlen"], repeats))
        except (torch.OutOfMemoryError, RuntimeError, ValueError, NotImplementedError) as error:
            row = _failed_row(impl, config, error)
        rows.append(row)
        torch.cuda.empty_cache()
        out.write_text(json.dumps(rows, indent=1))
    return rows


def _failed_row(impl: str, config: dict, error: Exception) -> dict:
    return dict(
        card=card_name(),
        impl=impl,
        causal=config["causal"],
        **{key: config[key] for key in ("seqlen", "batch", "heads", "head_dim", "block_size", "topk")},
        route_ms=None,
        fwd_ms=None,
        fwd_bwd_ms=None,
        peak_mem_gib=None,
        error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
    )


# ----------------------------------------------------------------------------------------------------
# flashmoba bench model
# ----------------------------------------------------------------------------------------------------

MODEL_DEFAULT_SEQLENS = (4096, 8192, 16384, 32768)


def _names(choices: tuple[str, ...]):
    """An argparse ``type``: a comma list of names from ``choices``, each once."""

    def parse(text: str) -> list[str]:
        names = [item.strip() for item in text.split(",") if item.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {choices}, got {text!r}")
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(f"must be names from {choices}, got {name!r}")
            if names.count(name) > 1:
                raise argparse.ArgumentTypeError(f"names {name!r} more than once, got {text!r}")
        return names

    return parse


def _device_name(text: str) -> str:
    from flashmoba.training.runtime import check_device_name

    try:
        return check_device_name("", text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).strip()) from None


def _add_run_flags(parser: argparse.ArgumentParser, stem: str) -> None:
    """--device, --out (default ``benchmarks/results/<stem>_<card>.json``) and --overwrite, as the model,
    decode and generate benchmarks take them."""
    parser.add_argument(
        "--device", type=_device_name, default="auto", help="auto (CUDA if present), cpu, cuda"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"default benchmarks/results/{stem}_<card>.json"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def _model_parser() -> argparse.ArgumentParser:
    from flashmoba.api import BACKENDS
    from flashmoba.bench.model import ATTENTIONS, DENSE_KERNELS
    from flashmoba.models.hybrid import MODEL_PRESETS
    from flashmoba.training.runtime import COMPILE_MODES

    parser = argparse.ArgumentParser(
        prog="flashmoba bench model",
        description="Training throughput of the hybrid LM (forward, backward, AdamW step), dense against "
        "MoBA: tokens/s, the step split (attention, matrix products, other kernels, GPU idle), peak "
        "memory and MFU. Rows go to benchmarks/results/model_<card>.json with a plot beside it.",
    )
    positive, positives = int_at_least(1), ints_at_least(1)
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="340m")
    parser.add_argument("--seqlens", type=positives, default=list(MODEL_DEFAULT_SEQLENS))
    _add_block_flags(parser)
    parser.add_argument(
        "--attentions",
        type=_names(ATTENTIONS),
        default=list(ATTENTIONS),
        help=f"comma list from {ATTENTIONS}",
    )
    parser.add_argument(
        "--dense-kernels",
        type=_names(DENSE_KERNELS),
        default=None,
        metavar="KERNELS",
        help=f"comma list from {DENSE_KERNELS}: the dense model's global layers on PyTorch's flash varlen "
        "kernel (as flashmoba train) or on SDPA with cuDNN alone, one dense row per kernel (default: "
        "both on CUDA, flash_varlen elsewhere)",
    )
    parser.add_argument(
        "--rows-per-item",
        type=ints_at_least(0),
        default=None,
        metavar="R[,R,...]",
        help="KernelConfig.rows_per_item of the MoBA kernels, one MoBA row per value (0: never split a "
        "column; default: KernelConfig's default); dense rows run once",
    )
    parser.add_argument(
        "--kernel-configs",
        type=_kernel_configs,
        default=[{}],
        metavar="CONFIGS",
        help="';'-separated launch configs of the MoBA kernels, each a ','-separated list of field=int of "
        "flashmoba.ops.KernelConfig ('default': the defaults; bools 0 or 1), one MoBA row per config and "
        "--rows-per-item value; dense rows run once",
    )
    parser.add_argument("--batch", type=positive, default=1, help="documents (rows) per step")
    parser.add_argument("--steps", type=positive, default=10, help="measured steps (their median is timed)")
    parser.add_argument(
        "--warmup", type=positive, default=3, help="untimed steps first (compilation, autotuning)"
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="flashmoba backend of MoBA layers"
    )
    parser.add_argument(
        "--compile-blocks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile each block (default: as flashmoba train, on CUDA only)",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default=None,
        help="torch.compile mode of the blocks (default: flashmoba train's, reduce-overhead)",
    )
    parser.add_argument(
        "--compile-head",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the head and loss (default: where the blocks are compiled, as flashmoba train)",
    )
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute each block in backward"
    )
    _add_run_flags(parser, stem="model")
    _add_replot_flag(parser)
    return parser


def _check_model_args(parser: argparse.ArgumentParser, args, stem: str = "model") -> None:
    """What one flag alone cannot say; runs before any work. Sets ``args.device`` (resolved) and
    ``args.out`` (``benchmarks/results/<stem>_<card>.json`` when not given)."""
    _check_pairs(parser, args)
    if args.replot is not None:
        if not args.replot.is_file():
            parser.error(f"argument --replot: no such file, got {str(args.replot)!r}")
        return
    from flashmoba.training.runtime import resolve_device

    try:
        args.device = resolve_device(args.device, 0, setting="--device")
    except ValueError as error:
        parser.error(f"argument --device: {error}")
    card = card_name() if args.device.type == "cuda" else "cpu"
    args.out = args.out or Path("benchmarks/results") / f"{stem}_{_file_stem(card)}.json"
    if args.out.is_dir():
        parser.error(f"argument --out: must be a file path, got the directory {str(args.out)!r}")
    if args.out.exists() and not args.overwrite:
        parser.error(f"argument --out: {str(args.out)!r} exists; pass --overwrite to replace it")


def _check_dense_kernels(parser: argparse.ArgumentParser, args) -> None:
    """``--dense-kernels`` of ``bench model`` against the resolved device; the default: both kernels on
    CUDA, flash_varlen's path elsewhere (cuDNN is CUDA's)."""
    if args.dense_kernels is None:
        args.dense_kernels = ["flash_varlen", "cudnn"] if args.device.type == "cuda" else ["flash_varlen"]
    elif "cudnn" in args.dense_kernels and args.device.type != "cuda":
        parser.error(f"argument --dense-kernels: cudnn needs a CUDA device, got {str(args.device)!r}")


def _model_jobs(args) -> list[dict]:
    """Keyword arguments of ``measure_model`` in run order: per sequence length, dense on each
    ``--dense-kernels`` kernel, then each MoBA (block size, topk) pair with each ``--rows-per-item`` value
    (None: KernelConfig's default) and each ``--kernel-configs`` config."""
    rows_per_item_values = [None] if args.rows_per_item is None else args.rows_per_item
    jobs = []
    for seqlen in args.seqlens:
        for attention in args.attentions:
            if attention == "moba":
                settings = [
                    ("flash_varlen", block_size, topk, rows_per_item, kernel_settings)
                    for block_size, topk in zip(args.block_sizes, args.topks)
                    for rows_per_item in rows_per_item_values
                    for kernel_settings in args.kernel_configs
                ]
            else:  # kernel settings of MoBA: dense runs once per dense kernel
                settings = [(dense_kernel, None, None, None, None) for dense_kernel in args.dense_kernels]
            for dense_kernel, block_size, topk, rows_per_item, kernel_settings in settings:
                jobs.append(
                    dict(
                        preset=args.preset,
                        seqlen=seqlen,
                        attention=attention,
                        dense_kernel=dense_kernel,
                        block_size=block_size,
                        topk=topk,
                        rows_per_item=rows_per_item,
                        kernel_settings=kernel_settings,
                        batch=args.batch,
                        steps=args.steps,
                        warmup=args.warmup,
                        device=args.device,
                        backend=args.backend,
                        compile_blocks=args.compile_blocks,
                        compile_mode=args.compile_mode,
                        compile_head=args.compile_head,
                        activation_checkpointing=args.activation_checkpointing,
                    )
                )
    return jobs


def _run_model_jobs(jobs: list[dict], out: Path) -> list[dict]:
    """Measure each job; one that fails leaves a row with its error. The file is rewritten after each
    job, so that a run that dies keeps the rows before it."""
    from flashmoba.bench.model import ROW_FIELDS, measure_model

    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for job in tqdm(jobs, desc="flashmoba bench model", unit="run"):
        try:
            row = measure_model(**job)
        except (torch.OutOfMemoryError, RuntimeError, ValueError, NotImplementedError) as error:
            row = dict.fromkeys(ROW_FIELDS)
            # rows_per_item as asked (None for a MoBA row: KernelConfig's default)
            row.update(
                {
                    key: job[key]
                    for key in (
                        "preset",
                        "seqlen",
                        "attention",
                        "block_size",
                        "topk",
                        "rows_per_item",
                        "kernel_settings",
                    )
                }
            )
            row.update(
                dense_kernel=job["dense_kernel"] if job["attention"] == "dense" else None,
                card=card_name() if job["device"].type == "cuda" else "cpu",
                batch=job["batch"],
                steps=job["steps"],
                warmup=job["warmup"],
                error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            )
        rows.append(row)
        if job["device"].type == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(rows, indent=1))
    return rows


def _model_label(row: dict) -> str:
    """The attention, and how the step ran when not the default: eager blocks, recomputed blocks."""
    label = "dense" if row["attention"] == "dense" else f"moba B={row['block_size']} k={row['topk']}"
    if row.get("dense_kernel") not in (None, "flash_varlen"):  # absent from files before the choice
        label += f" {row['dense_kernel']}"
    if row.get("card") != "cpu" and "compile_mode" in row:
        mode = row["compile_mode"]
        label += " eager" if mode is None else ("" if mode == "reduce-overhead" else f" {mode}")
        if mode is not None and "head_compile_mode" in row and row["head_compile_mode"] is None:
            label += " eager-head"
    if row.get("activation_checkpointing"):
        label += " recompute"
    if row.get("kernel_settings"):
        label += " " + ",".join(f"{name}={value}" for name, value in row["kernel_settings"].items())
    return label


def _model_series_label(row: dict) -> str:
    """``_model_label`` with the MoBA kernels' rows_per_item, which tells apart rows of one attention
    (the table gives rows_per_item a column of its own)."""
    label = _model_label(row)
    if row.get("rows_per_item") is not None:
        label += f" rows_per_item={row['rows_per_item']}"
    return label


MODEL_TABLE_COLUMNS = (
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("step ms", "step_ms", ".1f"),
    ("host ms", "host_ms", ".1f"),
    ("attention ms", "attention_ms", ".1f"),
    ("matmul ms", "matmul_ms", ".1f"),
    ("other ms", "other_ms", ".1f"),
    ("idle ms", "idle_ms", ".1f"),
    ("peak GiB", "peak_gib", ".1f"),
    ("MFU", "mfu", ".1%"),
    ("TFLOP/step", "model_tflop_per_step", ".3g"),
    ("MoBA layer ms", "moba_layer_ms", ".2f"),
    ("kernels alone ms", "kernel_bench_ms", ".2f"),
)


def model_table(rows: list[dict]) -> str:
    """The rows as a markdown table under a line naming the card, preset and batch (for the README).
    The split (attention .. idle) is of one profiled step; "-": not measured (CPU) or unknown."""
    first = rows[0] if rows else {}
    lines = [
        f"Card: **{first.get('card', '?')}**, preset {first.get('preset', '?')}, "
        f"batch {first.get('batch', '?')} document(s) per step",
        "",
        "| attention | N | rows_per_item | "
        + " | ".join(title for title, _, _ in MODEL_TABLE_COLUMNS)
        + " |",
        "|---|---:|---:|" + "---:|" * len(MODEL_TABLE_COLUMNS),
    ]
    for row in rows:
        if row.get("error"):
            cells = [f"failed: {row['error'][:60]}"] + [""] * (len(MODEL_TABLE_COLUMNS) - 1)
        else:
            cells = [_number(row.get(field), fmt) for _, field, fmt in MODEL_TABLE_COLUMNS]
        # rows_per_item: None for dense rows, absent from a results file that does not record it
        rows_per_item = _number(row.get("rows_per_item"), "d")
        lines.append(
            f"| {_model_label(row)} | {row['seqlen']} | {rows_per_item} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def heaviest_kernels(rows: list[dict], count: int = 6) -> str:
    """Per measured row, its ``count`` heaviest kernels of the profiled step (launches, ms)."""
    lines = []
    for row in rows:
        if not row.get("top_kernels"):
            continue
        lines.append(f"{_model_series_label(row)}, N = {row['seqlen']}:")
        for name, kind, launches, ms in row["top_kernels"][:count]:
            lines.append(f"  {ms:8.2f} ms {launches:5d}x  {kind:9s} {name[:90]}")
    return "\n".join(lines)


def model_plot(rows: list[dict], path: Path) -> None:
    """Training tokens/s against sequence length, one line per attention (dense, each MoBA pair and
    rows_per_item)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for row in rows:
        if not row.get("error") and row.get("tokens_per_s") is not None:
            series.setdefault(_model_series_label(row), []).append(row)
    for label, points in series.items():
        points.sort(key=lambda r: r["seqlen"])
        axis.plot([r["seqlen"] for r in points], [r["tokens_per_s"] for r in points], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("sequence length N")
    axis.set_ylabel("training tokens/s")
    axis.grid(True, which="both", alpha=0.3)
    if series:
        axis.legend(fontsize=8)
    first = rows[0] if rows else {}
    axis.set_title(f"{first.get('preset', '?')} training throughput on {first.get('card', '?')}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_or_say(plot, rows: list[dict], out: Path, command: str) -> None:
    """``plot(rows, <out>.png)``, or where matplotlib is missing (a GPU image) how to replot elsewhere."""
    try:
        plot(rows, out.with_suffix(".png"))
    except ImportError as error:
        replot = f"flashmoba bench {command} --replot {out}"
        print(f"no plot ({error}); run '{replot}' where matplotlib is installed")


def model_main(argv: list[str]) -> int:
    parser = _model_parser()
    args = parser.parse_args(argv)
    _check_model_args(parser, args)
    if args.replot is not None:
        rows = _read_rows(parser, args.replot)
        _plot_or_say(model_plot, rows, args.replot, "model")
        print(model_table(rows))
        return 0
    _check_dense_kernels(parser, args)
    rows = _run_model_jobs(_model_jobs(args), args.out)
    _plot_or_say(model_plot, rows, args.out, "model")
    print(f"\nresults in {args.out}\n")
    print(model_table(rows))
    print(heaviest_kernels(rows))
    return 0


# ----------------------------------------------------------------------------------------------------
# flashmoba bench decode
# ----------------------------------------------------------------------------------------------------


def _head_configs(text: str) -> list[tuple[int, int, int]]:
    """An argparse ``type``: a comma list of ``heads_q/heads_kv/head_dim`` triples, heads_q a multiple of
    heads_kv."""
    configs = []
    for item in (item.strip() for item in text.split(",")):
        if not item:
            continue
        parts = item.split("/")
        try:
            heads_q, heads_kv, head_dim = (int(part) for part in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected heads_q/heads_kv/head_dim triples such as 32/8/128, got {item!r}"
            ) from None
        if min(heads_q, heads_kv, head_dim) < 1 or heads_q % heads_kv:
            raise argparse.ArgumentTypeError(
                f"heads_q, heads_kv, head_dim must be >= 1 and heads_q a multiple of heads_kv, got {item!r}"
            )
        configs.append((heads_q, heads_kv, head_dim))
    if not configs:
        raise argparse.ArgumentTypeError(f"expected heads_q/heads_kv/head_dim triples, got {text!r}")
    return configs


def _launch_configs(text: str, config_class) -> list[dict]:
    """A ``;``-separated list of launch configs, each a ``,``-separated list of ``field=int`` of the
    dataclass ``config_class`` (``default`` or nothing: the default config; a bool field takes 0 or 1),
    each config once; returns the configs' set fields as dicts (argparse errors name what is wrong)."""
    names = tuple(field.name for field in dataclasses.fields(config_class))
    flags = bool_fields(config_class)
    class_name = config_class.__name__
    configs = []
    for item in (item.strip() for item in text.split(";")):
        config = {}
        for part in (part.strip() for part in item.split(",")):
            if part in ("", "default"):
                continue
            name, equals, value = (piece.strip() for piece in part.partition("="))
            if not equals:
                raise argparse.ArgumentTypeError(
                    f"expected field=int pairs such as num_splits=2, got {part!r}"
                )
            if name not in names:
                raise argparse.ArgumentTypeError(
                    f"unknown {class_name} field {name!r}; fields: {', '.join(names)}"
                )
            if name in config:
                raise argparse.ArgumentTypeError(f"field {name!r} set twice in {item!r}")
            try:
                config[name] = int(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name} must be an integer, got {value!r}") from None
            if name in flags:
                if config[name] not in (0, 1):
                    raise argparse.ArgumentTypeError(f"{name} must be 0 or 1, got {value!r}")
                config[name] = bool(config[name])
        try:
            config_class(**config)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(f"{item!r}: {error}") from None
        if config in configs:
            raise argparse.ArgumentTypeError(f"config {item!r} more than once, got {text!r}")
        configs.append(config)
    return configs


def _decode_configs(text: str) -> list[dict]:
    """An argparse ``type``: ``_launch_configs`` of ``flashmoba.ops.decode.DecodeConfig``."""
    from flashmoba.ops.decode import DecodeConfig

    return _launch_configs(text, DecodeConfig)


def _kernel_configs(text: str) -> list[dict]:
    """An argparse ``type``: ``_launch_configs`` of ``flashmoba.ops.KernelConfig`` (the MoBA kernels'
    launch settings); ``rows_per_item`` has its own flag."""
    from flashmoba.ops import KernelConfig

    configs = _launch_configs(text, KernelConfig)
    if any("rows_per_item" in config for config in configs):
        raise argparse.ArgumentTypeError("rows_per_item has its own flag, --rows-per-item")
    return configs


def _decode_parser() -> argparse.ArgumentParser:
    from flashmoba.bench import decode

    parser = argparse.ArgumentParser(
        prog="flashmoba bench decode",
        description="One decode step with a KV cache (seqlen_q 1: append, route, attend), MoBA against "
        "dense decode on the same cache: latency, the bytes floor at the copy rate measured in the same "
        "run, and the ratio to it. Rows go to benchmarks/results/decode_<card>.json with a plot beside it.",
    )
    positive, positives = int_at_least(1), ints_at_least(1)
    parser.add_argument(
        "--cache-lens",
        type=ints_at_least(2),
        default=list(decode.DEFAULT_CACHE_LENGTHS),
        help="keys per sequence after the step; configurations that do not fit in memory are skipped",
    )
    parser.add_argument("--batches", type=positives, default=list(decode.DEFAULT_BATCHES))
    parser.add_argument(
        "--heads",
        type=_head_configs,
        default=list(decode.DEFAULT_HEADS),
        help="comma list of heads_q/heads_kv/head_dim (default 32/8/128,16/16/64)",
    )
    _add_block_flags(parser)
    parser.add_argument(
        "--impls",
        type=_names(decode.IMPLEMENTATIONS),
        default=list(decode.IMPLEMENTATIONS),
        help=f"comma list from {decode.IMPLEMENTATIONS}",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--backend", choices=("triton", "reference", "auto"), default="triton", help="of the MoBA step"
    )
    parser.add_argument("--repeats", type=positive, default=20, help="timed calls (their median)")
    parser.add_argument("--warmup", type=positive, default=3, help="untimed calls first")
    parser.add_argument("--no-graphs", action="store_true", help="time eager calls only (no CUDA graphs)")
    parser.add_argument(
        "--decode-configs",
        type=_decode_configs,
        default=[{}],
        help="launch configs of the Triton decode kernels, one MoBA row each: ';'-separated configs, each "
        "a ','-separated list of field=int of flashmoba.ops.decode.DecodeConfig ('default': the default "
        "config; fold_append=0/1), e.g. 'default;num_splits=1;num_splits=2,attn_num_stages=3,fold_append=1' "
        "(default: the default config only; needs --backend triton)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each row's timing, profile a few more steps as timed (CUDA-graph replays) under "
        "torch.profiler: kernels per step, device µs per step per kernel (top 10), in the row's "
        "'profile' field, and printed",
    )
    _add_run_flags(parser, stem="decode")
    _add_replot_flag(parser)
    return parser


def _check_decode_args(parser: argparse.ArgumentParser, args) -> None:
    """As ``_check_model_args``: resolves ``args.device`` and ``args.out``; refuses to overwrite. Launch
    configs other than the default need the Triton backend."""
    if args.replot is None and args.backend != "triton" and any(args.decode_configs):
        parser.error(f"argument --decode-configs: launch configs need --backend triton, got {args.backend!r}")
    _check_model_args(parser, args, stem="decode")


def _decode_jobs(args) -> list[dict]:
    """Keyword arguments of ``decode_shape`` in run order: head configuration, batch, cache length,
    block size / topk pair."""
    jobs = []
    for heads_q, heads_kv, head_dim in args.heads:
        for batch in args.batches:
            for cache_len in args.cache_lens:
                for block_size, topk in zip(args.block_sizes, args.topks):
                    jobs.append(
                        dict(
                            cache_len=cache_len,
                            batch=batch,
                            heads_q=heads_q,
                            heads_kv=heads_kv,
                            head_dim=head_dim,
                            block_size=block_size,
                            topk=topk,
                            dtype=args.dtype,
                            device=args.device,
                        )
                    )
    return jobs


def _run_decode_jobs(args, jobs: list[dict]) -> list[dict]:
    """Measure each configuration (dense impls once per configuration, beside its first block / topk
    pair); the file is rewritten after each, so that a run that dies keeps the rows before it."""
    from flashmoba.bench import decode

    copy_gbps = decode.copy_rate_gbps(args.device)
    card = decode.card_name() if args.device.type == "cuda" else "cpu"
    print(f"copy rate: {copy_gbps:,.0f} GB/s (read + write) on {card}")
    rows, dense_done = [], set()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for job in tqdm(jobs, desc="flashmoba bench decode", unit="config"):
        key = tuple(job[name] for name in ("cache_len", "batch", "heads_q", "heads_kv", "head_dim"))
        impls = [impl for impl in args.impls if impl == "moba" or key not in dense_done]
        dense_done.add(key)
        rows += decode.measure_decode(
            decode.decode_shape(**job),
            impls,
            backend=args.backend,
            repeats=args.repeats,
            warmup=args.warmup,
            graphs=not args.no_graphs,
            copy_gbps=copy_gbps,
            decode_configs=args.decode_configs,
            profile=args.profile,
        )
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


def _config_label(config: dict | None) -> str:
    """A launch config as ``field=value,..`` ("" for the default, and for rows from before configs)."""
    return ",".join(f"{name}={value}" for name, value in (config or {}).items())


def _decode_label(row: dict) -> str:
    if row["impl"] == "moba":
        config = _config_label(row.get("decode_config"))
        return f"moba B={row['block_size']} k={row['topk']}" + (f" {config}" if config else "")
    return row["impl"]


def _heads_label(row: dict) -> str:
    return f"{row['heads_q']}/{row['heads_kv']} d{row['head_dim']}"


DECODE_TABLE_COLUMNS = (
    ("step ms", "step_ms", ".4f"),
    ("in-graph step ms", "graph_step_ms", ".4f"),
    ("eager ms", "eager_ms", ".4f"),
    ("floor ms", "floor_ms", ".4f"),
    ("x floor", "floor_ratio", ".1f"),
    ("x floor, in graph", "graph_floor_ratio", ".1f"),
    ("x floor, device time", "device_floor_ratio", ".1f"),
    ("MB read", "megabytes", ".4g"),
)


def decode_table(rows: list[dict]) -> str:
    """The rows as a markdown table under a line naming the card and copy rate; "vs sdpa": how many times
    faster than the sdpa row of the same cache, batch and heads."""
    first = rows[0] if rows else {}
    copy = first.get("copy_gbps")
    dense = {
        (r["cache_len"], r["batch"], _heads_label(r)): r
        for r in rows
        if r["impl"] == "sdpa" and r.get("step_ms") is not None
    }
    lines = [
        f"Card: **{first.get('card', '?')}**, {first.get('dtype', '?')}, copy rate "
        f"{_number(copy, ',.0f')} GB/s (read + write); one decode step, seqlen_q 1",
        "",
        "| impl | heads | batch | cache | "
        + " | ".join(title for title, _, _ in DECODE_TABLE_COLUMNS)
        + " | vs sdpa | timing |",
        "|---|---|---:|---:|" + "---:|" * len(DECODE_TABLE_COLUMNS) + "---:|---|",
    ]
    for row in rows:
        head = f"| {_decode_label(row)} | {_heads_label(row)} | {row['batch']} | {row['cache_len']} | "
        if row.get("error"):
            cells = [f"{row['error'][:70]}"] + [""] * len(DECODE_TABLE_COLUMNS)
            lines.append(head + " | ".join(cells) + " | |")
            continue
        values = dict(row, megabytes=None if row.get("bytes_read") is None else row["bytes_read"] / 1e6)
        cells = [_number(values.get(field), fmt) for _, field, fmt in DECODE_TABLE_COLUMNS]
        base = dense.get((row["cache_len"], row["batch"], _heads_label(row)))
        cells.append(_speedup(base, row, "step_ms"))
        timing = row.get("timing") or "-"
        if row.get("note"):
            timing += f" ({row['note'][:50]})"
        lines.append(head + " | ".join(cells) + f" | {timing} |")
    return "\n".join(lines)


def profile_table(profile: dict, title: str) -> str:
    """A ``profile`` field (``flashmoba.bench.timing.profile_steps``) as a markdown table under ``title``
    and its totals."""
    time_label = "device µs/step" if profile["activity"] == "cuda_kernels" else "self CPU µs/step"
    lines = [
        f"{title}: {profile['kernels_per_step']:.0f} {profile['activity']} per step, "
        f"{profile['device_us_per_step']:.0f} µs per step ({profile['steps']} steps)",
        "",
        f"| {profile['activity']} | calls/step | {time_label} |",
        "|---|---:|---:|",
    ]
    for entry in profile["top"]:
        name = entry["name"].replace("|", "/")
        lines.append(f"| {name} | {entry['calls_per_step']:.1f} | {entry['us_per_step']:.1f} |")
    return "\n".join(lines)


def decode_profile_tables(rows: list[dict]) -> str:
    """Each profiled row's kernels (``bench decode --profile``), one table per row."""
    tables = [
        profile_table(
            row["profile"],
            f"Profile of {_decode_label(row)}, {_heads_label(row)}, batch {row['batch']}, cache "
            f"{row['cache_len']}, {row.get('timing')}",
        )
        for row in rows
        if row.get("profile")
    ]
    return "\n\n".join(tables)


def decode_plot(rows: list[dict], path: Path) -> None:
    """Step latency against cache length, one panel per head configuration, one line per impl and batch;
    MoBA's bytes floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({_heads_label(row) for row in rows}) or ["?"]
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        series: dict[str, list[dict]] = {}
        for row in rows:
            if _heads_label(row) == panel and not row.get("error") and row.get("step_ms") is not None:
                series.setdefault(f"{_decode_label(row)} batch {row['batch']}", []).append(row)
        for label, points in series.items():
            points.sort(key=lambda r: r["cache_len"])
            lengths = [r["cache_len"] for r in points]
            (line,) = axis.plot(lengths, [r["step_ms"] for r in points], marker="o", label=label)
            if points[0]["impl"] == "moba":
                floors = [r["floor_ms"] for r in points]
                axis.plot(lengths, floors, linestyle="--", color=line.get_color(), alpha=0.6)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("cache length")
        axis.set_ylabel("ms per decode step (dashed: MoBA's bytes floor)")
        axis.set_title(panel)
        axis.grid(True, which="both", alpha=0.3)
        if series:
            axis.legend(fontsize=7)
    first = rows[0] if rows else {}
    figure.suptitle(f"decode step with a KV cache on {first.get('card', '?')}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def decode_main(argv: list[str]) -> int:
    parser = _decode_parser()
    args = parser.parse_args(argv)
    _check_decode_args(parser, args)
    if args.replot is not None:
        rows = _read_rows(parser, args.replot)
        _plot_or_say(decode_plot, rows, args.replot, "decode")
        print(decode_table(rows))
        _print_profiles(rows)
        return 0
    rows = _run_decode_jobs(args, _decode_jobs(args))
    _plot_or_say(decode_plot, rows, args.out, "decode")
    print(f"\nresults in {args.out}\n")
    print(decode_table(rows))
    _print_profiles(rows)
    return 0


def _print_profiles(rows: list[dict]) -> None:
    tables = decode_profile_tables(rows)
    if tables:
        print("\n" + tables)


# ----------------------------------------------------------------------------------------------------
# flashmoba bench generate
# ----------------------------------------------------------------------------------------------------


def _generate_parser() -> argparse.ArgumentParser:
    from flashmoba.bench.generate import ATTENTIONS
    from flashmoba.models.generation import DECODE_MODES
    from flashmoba.models.hybrid import MODEL_PRESETS

    parser = argparse.ArgumentParser(
        prog="flashmoba bench generate",
        description="End-to-end generation of the hybrid LM with a KV cache, dense against MoBA global "
        "layers: prefill and decode tokens/s by prompt length. Rows go to "
        "benchmarks/results/generate_<card>.json.",
    )
    parser.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="340m")
    parser.add_argument("--prompt-lens", type=ints_at_least(1), default=[32768, 131072])
    _add_block_flags(parser)
    parser.add_argument(
        "--attentions",
        type=_names(ATTENTIONS),
        default=list(ATTENTIONS),
        help=f"comma list from {ATTENTIONS}",
    )
    parser.add_argument("--batch", type=int_at_least(1), default=1, help="prompts generated at once")
    parser.add_argument("--new-tokens", type=int_at_least(2), default=32, help="tokens generated per prompt")
    parser.add_argument(
        "--decode-modes",
        type=_names(DECODE_MODES),
        default=["auto"],
        help=(
            f"comma list from {DECODE_MODES} (auto: cuda_graph on CUDA, eager elsewhere; compiled_graph: "
            "the step's forward compiled by Inductor, then replayed as a CUDA graph)"
        ),
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each row's timing, profile steady decode steps of the same decoder (torch.profiler): "
        "kernels per step, device time per step and the top kernels, in the row's 'profile' field",
    )
    _add_run_flags(parser, stem="generate")
    parser.set_defaults(replot=None)
    return parser


GENERATE_TABLE_COLUMNS = (
    ("prefill s", "prefill_s", ".2f"),
    ("prefill tokens/s", "prefill_tokens_per_s", ",.0f"),
    ("decode tokens/s", "decode_tokens_per_s", ",.1f"),
    ("ms per step", "decode_ms_per_step", ".2f"),
    ("steady ms per step", "steady_decode_ms_per_step", ".2f"),
    ("peak GiB", "peak_gib", ".1f"),
)


def generate_table(rows: list[dict]) -> str:
    """The rows as a markdown table, with each MoBA row's decode speedup over dense at its prompt length
    and decode mode."""
    first = rows[0] if rows else {}
    dense = {
        (row["prompt_len"], row.get("decode_mode")): row
        for row in rows
        if row["attention"] == "dense" and not row.get("error")
    }
    lines = [
        f"Card: **{first.get('card', '?')}**, preset {first.get('preset', '?')}, "
        f"batch {first.get('batch', '?')}, {first.get('new_tokens', '?')} new tokens per prompt",
        "",
        "| attention | prompt | decode mode | "
        + " | ".join(t for t, _, _ in GENERATE_TABLE_COLUMNS)
        + " | decode vs dense |",
        "|---|---:|---|" + "---:|" * (len(GENERATE_TABLE_COLUMNS) + 1),
    ]
    for row in rows:
        label = "dense" if row["attention"] == "dense" else f"moba B={row['block_size']} k={row['topk']}"
        if row.get("error"):
            lines.append(
                f"| {label} | {row['prompt_len']} | {row.get('decode_mode')} | failed: {row['error'][:60]} |"
            )
            continue
        cells = [_number(row.get(field), fmt) for _, field, fmt in GENERATE_TABLE_COLUMNS]
        base = dense.get((row["prompt_len"], row.get("decode_mode")))
        speedup = (
            f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.1f}x"
            if base
            and row["attention"] == "moba"
            and row["decode_tokens_per_s"]
            and base["decode_tokens_per_s"]
            else ""
        )
        lines.append(
            f"| {label} | {row['prompt_len']} | {row.get('decode_mode')} | "
            + " | ".join(cells)
            + f" | {speedup} |"
        )
    return "\n".join(lines)


def generate_profile_table(row: dict) -> str:
    """A row's ``profile`` field (``flashmoba.bench.generate.profile_decode_steps``) as a markdown table."""
    label = "dense" if row["attention"] == "dense" else f"moba B={row['block_size']} k={row['topk']}"
    title = f"Profile of {label}, prompt {row['prompt_len']}, {row['decode_mode']}, batch {row['batch']}"
    return profile_table(row["profile"], title)


def generate_main(argv: list[str]) -> int:
    from flashmoba.bench.generate import ROW_FIELDS, measure_generate

    parser = _generate_parser()
    args = parser.parse_args(argv)
    _check_model_args(parser, args, stem="generate")
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jobs = [
        dict(attention=attention, block_size=block_size, topk=topk, prompt_len=prompt_len, decode_mode=mode)
        for prompt_len in args.prompt_lens
        for mode in args.decode_modes
        for attention in args.attentions
        for block_size, topk in (zip(args.block_sizes, args.topks) if attention == "moba" else [(None, None)])
    ]
    for job in jobs:
        try:
            row = measure_generate(
                args.preset,
                batch=args.batch,
                new_tokens=args.new_tokens,
                device=args.device,
                profile=args.profile,
                **job,
            )
        except (torch.OutOfMemoryError, RuntimeError, ValueError) as error:
            row = dict.fromkeys(ROW_FIELDS)
            row.update(job, preset=args.preset, batch=args.batch, new_tokens=args.new_tokens)
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        rows.append(row)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        args.out.write_text(json.dumps(rows, indent=1))  # a run that dies keeps the rows before it
    print(f"\nresults in {args.out}\n")
    print(generate_table(rows))
    for row in rows:
        if row.get("profile"):
            print("\n" + generate_profile_table(row))
    return 0
