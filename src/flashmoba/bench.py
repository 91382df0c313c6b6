"""``flashmoba bench``: flashmoba against dense attention, latency and peak memory over sequence length.

Implementations (rows of the results file, field ``impl``):

- ``flashmoba``: ``moba_attn`` on the Triton backend; its forward includes routing;
- ``sdpa_flash``: PyTorch SDPA with the flash backend (FlashAttention-2 code), dense causal;
- ``sdpa_cudnn``: PyTorch SDPA with the cuDNN backend, dense causal;
- ``flex``: FlexAttention with a MoBA ``BlockMask`` built from flashmoba's own router indices (what a
  PyTorch user would otherwise write); mask construction is not timed.

Each implementation is warmed up first (autotuning and compilation excluded), then timed with CUDA events
as the median over repeats. Peak memory is measured above the inputs during forward + backward. Results go
to ``benchmarks/results/<card>.json`` (a list of rows: card, impl, seqlen, batch, heads, head_dim,
block_size, topk, causal, route_ms, fwd_ms, fwd_bwd_ms, peak_mem_gib) with a plot beside it.
Without CUDA it says so and compares the reference with the Triton interpreter on a small case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import flashmoba

IMPLEMENTATIONS = ("flashmoba", "sdpa_flash", "sdpa_cudnn", "flex")
DEFAULT_SEQLENS = (8192, 16384, 32768, 65536, 131072, 262144, 524288)


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _file_stem(card: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_")


def _repeats(seqlen: int, requested: int | None) -> int:
    """Fewer repeats where one call takes seconds (dense attention at 256K+ takes tens of seconds)."""
    if requested is not None:
        return requested
    return 20 if seqlen <= 32768 else 5 if seqlen <= 131072 else 2


def time_cuda_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of fn() over repeats, timed with CUDA events after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_memory_gib(fn) -> float:
    """Peak memory allocated by fn() above what was allocated before it (the inputs)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**30


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[
        backend_name
    ]

    def attention(q, k, v):
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                is_causal=True,
                enable_gqa=q.shape[2] != k.shape[2],
            )
        return out.transpose(1, 2)

    return attention


def flex_moba_block_mask(selected: torch.Tensor, block_size: int, seqlen: int, causal: bool):
    """An exact MoBA BlockMask for FlexAttention from the router's indices.

    selected: int32 [B, T, H, topk] (moba_select's output). Each 128-query tile visits the union of its
    queries' blocks; mask_mod keeps, inside them, exactly the keys each query selected.
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, _, heads, topk = selected.shape
    query_tile = 128
    num_tiles = math.ceil(seqlen / query_tile)
    num_blocks = math.ceil(seqlen / block_size)
    per_query = selected.permute(0, 2, 1, 3).contiguous()  # [B, H, T, topk]
    padded = torch.full(
        (batch, heads, num_tiles * query_tile, topk), -1, dtype=torch.int32, device=selected.device
    )
    padded[:, :, :seqlen] = per_query
    tiles = padded.view(batch, heads, num_tiles, query_tile * topk).long()
    used = torch.zeros(batch, heads, num_tiles, num_blocks + 1, dtype=torch.bool, device=selected.device)
    used.scatter_(-1, torch.where(tiles >= 0, tiles, num_blocks), True)
    used = used[..., :num_blocks]
    kv_num_blocks = used.sum(-1, dtype=torch.int32)
    # Selected block ids first (ascending), then the rest: a stable sort of "not used".
    kv_indices = torch.sort((~used).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        block = kv_idx // block_size
        keep = per_query[b, h, q_idx, 0] == block
        for slot in range(1, topk):
            keep = keep | (per_query[b, h, q_idx, slot] == block)
        if causal:
            keep = keep & (kv_idx <= q_idx)
        return keep

    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        BLOCK_SIZE=(query_tile, block_size),
        mask_mod=mask_mod,
        seq_lengths=(seqlen, seqlen),
    )


def _flex(block_size: int, topk: int, causal: bool):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def attention(q, k, v):
        key = (q.data_ptr(), q.shape)
        if key not in masks:  # built once per input, outside the timed calls' steady state
            with torch.no_grad():
                selected = flashmoba.moba_select(q, k, block_size, topk, causal=causal)
            masks.clear()
            masks[key] = flex_moba_block_mask(selected, block_size, q.shape[1], causal)
        out = compiled(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=masks[key],
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)

    return attention


def measure(impl: str, config: dict, repeats: int) -> dict:
    """Time one implementation on one configuration; returns a results row."""
    batch, seqlen, heads, head_dim = config["batch"], config["seqlen"], config["heads"], config["head_dim"]
    block_size, topk, causal = config["block_size"], config["topk"], config["causal"]
    dtype = getattr(torch, config["dtype"])
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=generator)

    q = randn(batch, seqlen, heads, head_dim).requires_grad_()
    k = randn(batch, seqlen, heads, head_dim).requires_grad_()
    v = randn(batch, seqlen, heads, head_dim).requires_grad_()
    grad_out = randn(batch, seqlen, heads, head_dim)
    row = dict(
        card=card_name(),
        impl=impl,
        seqlen=seqlen,
        batch=batch,
        heads=heads,
        head_dim=head_dim,
        block_size=block_size if impl in ("flashmoba", "flex") else None,
        topk=topk if impl in ("flashmoba", "flex") else None,
        causal=causal,
        route_ms=None,
        fwd_ms=None,
        fwd_bwd_ms=None,
        peak_mem_gib=None,
    )
    if impl == "flashmoba":

        def attention(q_, k_, v_):
            return flashmoba.moba_attn(q_, k_, v_, block_size, topk, causal=causal, backend="triton")

        with torch.no_grad():
            row["route_ms"] = time_cuda_ms(
                lambda: flashmoba.moba_select(q, k, block_size, topk, causal=causal, backend="triton"),
                repeats,
            )
    elif impl == "flex":
        attention = _flex(block_size, topk, causal)
    else:
        attention = _sdpa(impl)

    with torch.no_grad():
        row["fwd_ms"] = time_cuda_ms(lambda: attention(q, k, v), repeats)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        attention(q, k, v).backward(grad_out)

    row["fwd_bwd_ms"] = time_cuda_ms(forward_backward, repeats)
    row["peak_mem_gib"] = peak_memory_gib(forward_backward)
    return row


def router_tflops(row: dict) -> float | None:
    """Router scoring rate: 2*d FLOPs per (query, candidate block), causal half of the blocks."""
    if row.get("route_ms") is None:
        return None
    num_blocks = row["seqlen"] / row["block_size"]
    candidates = num_blocks / 2 if row["causal"] else num_blocks
    flops = 2 * row["head_dim"] * candidates * row["seqlen"] * row["heads"] * row["batch"]
    return flops / (row["route_ms"] * 1e-3) / 1e12


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

        def ratio(field):
            if base is None or base.get(field) is None or row.get(field) is None:
                return "-"
            return f"{base[field] / row[field]:.1f}x"

        def number(value, fmt=".2f"):
            return "-" if value is None else format(value, fmt)

        print(
            f"{row['impl']:<10} {row['seqlen']:>7} {number(row['block_size'], 'd'):>4} {number(row['topk'], 'd'):>3} "
            f"{number(row['route_ms']):>9} {number(row['fwd_ms']):>9} {number(row['fwd_bwd_ms']):>9} "
            f"{ratio('fwd_ms'):>7} {ratio('fwd_bwd_ms'):>7} {number(row['peak_mem_gib']):>6} "
            f"{number(router_tflops(row), '.0f'):>10}"
        )


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
            results[backend] = flashmoba.moba_attn(q, k, v, block_size, topk, backend=backend)
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


def _parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashmoba bench", description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=_parse_ints, default=list(DEFAULT_SEQLENS))
    parser.add_argument(
        "--block-sizes",
        type=_parse_ints,
        default=[128],
        help="comma list; paired with --topks position by position",
    )
    parser.add_argument("--topks", type=_parse_ints, default=[8])
    parser.add_argument("--head-dims", type=_parse_ints, default=[128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument(
        "--non-causal", action="store_true", help="benchmark non-causal MoBA (dense stays causal)"
    )
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS))
    parser.add_argument(
        "--dense-max-seqlen", type=int, default=1 << 20, help="skip dense baselines above this N"
    )
    parser.add_argument("--flex-max-seqlen", type=int, default=65536, help="skip FlexAttention above this N")
    parser.add_argument(
        "--repeats", type=int, default=None, help="default: 20 up to 32K, 5 up to 128K, then 2"
    )
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<card>.json")
    parser.add_argument(
        "--replot",
        type=Path,
        default=None,
        metavar="JSON",
        help="only redraw the plot and table of an existing results file",
    )
    args = parser.parse_args(argv)

    if args.replot is not None:
        rows = json.loads(args.replot.read_text())
        plot(rows, args.replot.with_suffix(".png"))
        print_table(rows)
        return 0

    if not torch.cuda.is_available():
        return cpu_comparison()
    if len(args.block_sizes) != len(args.topks):
        parser.error("--block-sizes and --topks must have the same number of entries")
    impls = [name for name in args.impls.split(",") if name]
    unknown = set(impls) - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {IMPLEMENTATIONS}")
    out = args.out or Path("benchmarks/results") / f"{_file_stem(card_name())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

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

    rows = []
    for impl, config in tqdm(jobs, desc="flashmoba bench", unit="run"):
        try:
            row = measure(impl, config, _repeats(config["seqlen"], args.repeats))
        except (torch.OutOfMemoryError, RuntimeError, ValueError, NotImplementedError) as error:
            row = dict(
                card=card_name(),
                impl=impl,
                causal=config["causal"],
                **{
                    key: config[key] for key in ("seqlen", "batch", "heads", "head_dim", "block_size", "topk")
                },
                route_ms=None,
                fwd_ms=None,
                fwd_bwd_ms=None,
                peak_mem_gib=None,
                error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            )
        rows.append(row)
        torch.cuda.empty_cache()
        out.write_text(json.dumps(rows, indent=1))  # keep partial results if a later run dies
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
