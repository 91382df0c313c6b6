"""MoBA attention time under random and under skewed routing: what the work items (long columns split over
several programs) change.

A trained router is skewed: per head, the hottest key block receives ~10x the mean routed rows (block 0
mostly, then a few early blocks). Random inputs do not show it, so this script times both. "skewed" inputs
are random ones plus a common direction added to the keys of a few hot blocks (0, 1, 5, 9) and to a fixed
fraction of the queries (``--hot-fraction``), which then route to those blocks first; the fraction is
chosen so that at 32K tokens the hottest block gets about 10x the mean rows per column, as measured in the
hybrid LM. The measured max and mean rows per (block, head) column of each selection are printed.

Only the public API is used (``flashmoba.moba_attn_varlen``, ``flashmoba.moba_select``, defaults for every
kernel setting), so the script runs unchanged against an older tree: run it once per tree and compare.

    PYTHONPATH=/path/to/old/src python benchmarks/skewed_routing.py --out old.json
    PYTHONPATH=/path/to/new/src python benchmarks/skewed_routing.py --out new.json
    python benchmarks/skewed_routing.py --tiny --out tiny.json   # CPU, Triton's interpreter: a smoke test
    python benchmarks/skewed_routing.py --rows-per-item 0,1024,2048,4096 --out items.json

``--rows-per-item`` (this tree only) times the Triton op under ``KernelConfig(rows_per_item=R)`` for each
R instead of the public API's defaults (0: never split a column).

Times are CUDA-event milliseconds, the median of ``--repeats`` calls after ``--warmup`` calls; forward is
one call under no_grad, forward+backward one call and ``backward`` of its output (routing included in both).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import statistics
import sys
import time

# name, batch, seqlen, heads, head_dim, block_size, topk
SHAPES = [
    ("32K d64", 1, 32768, 16, 64, 128, 8),
    ("8K d64", 1, 8192, 16, 64, 128, 8),
    ("128K d128", 1, 131072, 16, 128, 128, 8),
]
TINY_SHAPES = [("tiny", 1, 320, 2, 32, 16, 3)]
HOT_BLOCKS = (0, 1, 5, 9)  # as measured: block 0 mostly, then 1, 5, 9
HOT_STRENGTH = 3.0  # |common direction| in queries and in hot keys: score boost 9, above random scores' ~2


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test in Triton's interpreter")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--hot-fraction", type=float, default=0.2, help="queries pulled to the hot blocks")
    parser.add_argument("--shapes", default="", help="comma-separated names of SHAPES to run (default: all)")
    parser.add_argument(
        "--rows-per-item",
        default="",
        help="comma-separated KernelConfig.rows_per_item values to time (default: the API's defaults)",
    )
    return parser.parse_args(argv)


def make_inputs(torch, kind, batch, seqlen, heads, head_dim, block_size, hot_fraction, device, dtype):
    """q, k, v [batch * seqlen, heads, head_dim] (deterministic for a given shape and kind)."""
    generator = torch.Generator(device="cpu").manual_seed(1234)
    total = batch * seqlen
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator) for _ in range(3))
    if kind == "skewed":
        unit = torch.randn(heads, head_dim, generator=generator)
        unit /= unit.norm(dim=-1, keepdim=True)
        # The direction is theirs alone: without it in the random parts, only the pulled queries (and
        # the random share every block gets) route to the hot blocks, so the fraction sets the skew.
        q -= (q * unit).sum(-1, keepdim=True) * unit
        k -= (k * unit).sum(-1, keepdim=True) * unit
        direction = HOT_STRENGTH * unit
        pulled = torch.rand(total, 1, 1, generator=generator) < hot_fraction
        q += pulled * direction
        for sequence in range(batch):
            for block in HOT_BLOCKS:
                first = sequence * seqlen + block * block_size
                k[first : min(first + block_size, (sequence + 1) * seqlen)] += direction
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def rows_per_column(torch, selected, seqlen, block_size):
    """Max and mean routed rows per (block, head) column over the non-empty ones (selected
    [total, heads, topk], one sequence's block ids per row; the batch's sequences share the count)."""
    heads = selected.shape[1]
    blocks = -(-seqlen // block_size)
    head_ids = torch.arange(heads, device=selected.device).view(1, heads, 1).expand_as(selected)
    used = selected >= 0
    columns = (head_ids * blocks + selected.long())[used]
    counts = torch.bincount(columns, minlength=heads * blocks).float()
    nonempty = counts[counts > 0]
    return int(counts.max().item()), float(nonempty.mean().item())


def timer(torch, cuda):
    """Milliseconds of one call of ``function``: CUDA events on a GPU, wall clock on the CPU."""

    def measure(function):
        if not cuda:
            start = time.perf_counter()
            function()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return measure


def median_ms(measure, function, warmup, repeats):
    for _ in range(warmup):
        measure(function)
    return statistics.median(measure(function) for _ in range(repeats))


def attention_variants(flashmoba, leaves, cu_seqlens, seqlen, block_size, topk, extra, rows_per_item):
    """(rows_per_item or None, a call returning the output) per variant: the public API with this tree's
    defaults, or the Triton op under ``KernelConfig(rows_per_item=R)`` for each R in the comma list."""
    if not rows_per_item:
        yield (
            None,
            functools.partial(
                flashmoba.moba_attn_varlen,
                *leaves,
                cu_seqlens,
                cu_seqlens,
                seqlen,
                seqlen,
                block_size,
                topk,
                causal=True,
                backend="triton",
                **extra,
            ),
        )
        return
    from flashmoba.ops.autograd import moba_attn_varlen_triton
    from flashmoba.ops.config import KernelConfig

    scale = leaves[0].shape[-1] ** -0.5
    for value in (int(text) for text in rows_per_item.split(",")):
        config = KernelConfig(rows_per_item=value)
        yield (
            value,
            functools.partial(
                lambda config, *arguments: moba_attn_varlen_triton(*arguments, config=config)[0],
                config,
                *leaves,
                cu_seqlens,
                cu_seqlens,
                seqlen,
                seqlen,
                block_size,
                topk,
                True,
                scale,
            ),
        )


def main(argv=None) -> int:
    args = parse_arguments(argv)
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported (on first use)
    import torch

    import flashmoba

    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        sys.exit("skewed_routing.py: no CUDA device (use --tiny for the CPU smoke test)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        wanted = {name.strip() for name in args.shapes.split(",")}
        shapes = [shape for shape in shapes if shape[0] in wanted]
    warmup, repeats = (1, 2) if args.tiny else (args.warmup, args.repeats)
    measure = timer(torch, cuda)
    # Skip the host read of cu_seqlens where this tree's API has the switch (it synchronises per call).
    extra = {}
    if "check_cu_seqlens" in inspect.signature(flashmoba.moba_attn_varlen).parameters:
        extra["check_cu_seqlens"] = False

    results = dict(
        flashmoba=os.path.dirname(flashmoba.__file__),
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        dtype=str(dtype).removeprefix("torch."),
        hot_fraction=args.hot_fraction,
        warmup=warmup,
        repeats=repeats,
        cases=[],
    )
    for name, batch, seqlen, heads, head_dim, block_size, topk in shapes:
        cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
        for kind in ("random", "skewed"):
            q, k, v = make_inputs(
                torch, kind, batch, seqlen, heads, head_dim, block_size, args.hot_fraction, device, dtype
            )
            selected = flashmoba.moba_select(
                q,
                k,
                block_size,
                topk,
                causal=True,
                cu_seqlens_q=cu_seqlens,
                cu_seqlens_k=cu_seqlens,
                max_seqlen_q=seqlen,
                max_seqlen_k=seqlen,
                backend="triton",
            )
            max_rows, mean_rows = rows_per_column(torch, selected[:seqlen], seqlen, block_size)
            del selected
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            grad_out = torch.randn_like(q)

            for rows_per_item, attention in attention_variants(
                flashmoba, leaves, cu_seqlens, seqlen, block_size, topk, extra, args.rows_per_item
            ):

                def forward(attention=attention):
                    with torch.no_grad():
                        attention()

                def forward_backward(attention=attention, leaves=leaves, grad_out=grad_out):
                    attention().backward(grad_out)
                    for leaf in leaves:
                        leaf.grad = None

                forward_ms = median_ms(measure, forward, warmup, repeats)
                forward_backward_ms = median_ms(measure, forward_backward, warmup, repeats)
                case = dict(
                    shape=name,
                    batch=batch,
                    seqlen=seqlen,
                    heads=heads,
                    head_dim=head_dim,
                    block_size=block_size,
                    topk=topk,
                    inputs=kind,
                    rows_per_item=rows_per_item,
                    max_rows_per_column=max_rows,
                    mean_rows_per_column=round(mean_rows, 1),
                    forward_ms=round(forward_ms, 3),
                    forward_backward_ms=round(forward_backward_ms, 3),
                )
                results["cases"].append(case)
                label = "default" if rows_per_item is None else f"R={rows_per_item}"
                print(
                    f"{name:10s} {kind:7s} {label:7s} rows/column max {max_rows:6d} mean {mean_rows:7.1f} "
                    f"({max_rows / mean_rows:4.1f}x)  fwd {forward_ms:8.3f} ms  "
                    f"fwd+bwd {forward_backward_ms:8.3f} ms",
                    flush=True,
                )
            del q, k, v, leaves, grad_out
            if cuda:
                torch.cuda.empty_cache()
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
