"""The router's signal-to-noise model measured inside a trained model's MoBA layers (issue 19).

For every MoBA layer, on held-out S-NIAH samples (needles at evenly spaced depths, drawn with their own
seed, so apart from the training mixture and from ``flashmoba eval``'s samples), the q and k the layer's
router sees (``flashmoba.snr.capture_qk``, under the evaluation's autocast) go to
``flashmoba.snr.RouterSnrAccumulator``: the needle is the value's tokens, the query the last prompt token
(the one that must produce the answer). Per layer and length it gives mu_signal, mu_noise, sigma, delta_mu
and delta_mu_eff (paper Eq. 8), the SNR they imply (delta_mu_eff / sqrt(2 sigma^2 B)), Phi(-SNR), the
recall the paper's model predicts from them (top-k over the query's candidate blocks), and the router's
measured recall of the needle block (``flashmoba.moba_select``) with its 95% Wilson interval.

Measured recall here counts only samples whose needle block is a candidate of the router (ends before the
query's own block); ``flashmoba eval``'s router recall also counts the own block.

    python -m flashmoba.evaluation.router_snr --checkpoint RUN/checkpoints/step_0001000.pt \\
        --out RUN/eval/snr.json --lengths 2048,8192 --samples 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flashmoba.evaluation.retrieval import _retrieval_samples
from flashmoba.models.hybrid import HybridLM
from flashmoba.snr import RouterSnrAccumulator, capture_qk, normal_cdf, wilson_interval
from flashmoba.training.runtime import autocast

__all__ = ["measure_trained_router_snr", "main"]

# Per-layer fields, sample-weighted means over the layer's heads.
HEAD_MEAN_FIELDS = ("mu_signal", "mu_noise", "sigma2", "delta_mu", "delta_mu_eff", "m", "snr")


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _weighted(values: np.ndarray, weights: np.ndarray) -> float | None:
    used = (weights > 0) & np.isfinite(values)
    if not used.any():
        return None
    return float(np.sum(values[used] * weights[used]) / np.sum(weights[used]))


def summarise_layer(measurement, layer: int, length: int) -> dict:
    """One JSON-able row: the layer's sample-weighted head means, recall predicted and measured, per head."""
    weights = measurement.samples.astype(np.float64)
    row: dict = {"layer": layer, "length": length, "samples": int(weights.sum())}
    for name in HEAD_MEAN_FIELDS:
        row[name] = _weighted(getattr(measurement, name), weights)
    row["sigma"] = None if row["sigma2"] is None else math.sqrt(row["sigma2"])
    row["failure_probability"] = None if row["snr"] is None else float(normal_cdf(-row["snr"]))
    overall = measurement.overall()
    hits = float(np.nansum(measurement.measured_recall * weights))
    total = float(weights.sum())
    row["predicted_recall"] = _finite(overall["predicted_recall"]) if total else None
    row["predicted_recall_block"] = _finite(overall["predicted_recall_block"]) if total else None
    row["measured_recall"] = hits / total if total else None
    if total:
        low, high = wilson_interval(hits, total)
        row["measured_recall_interval"] = [float(low), float(high)]
    row["block_size"], row["topk"], row["head_dim"] = (
        measurement.block_size,
        measurement.topk,
        measurement.head_dim,
    )
    row["per_head"] = {
        name: [_finite(v) for v in getattr(measurement, name)]
        for name in (
            "samples",
            "mu_signal",
            "mu_noise",
            "sigma2",
            "delta_mu_eff",
            "snr",
            "predicted_recall",
            "measured_recall",
        )
    }
    row["skipped"] = {reason: int(count) for reason, count in measurement.skipped.items()}
    return row


@torch.no_grad()
def measure_trained_router_snr(
    model: HybridLM,
    tasks: list[str],
    lengths: list[int],
    samples: int,
    device,
    *,
    seed: int = 1,
    max_tokens_per_batch: int = 65536,
) -> list[dict]:
    """One row per (MoBA layer, length), samples of every task pooled; [] for a model without MoBA layers."""
    layers = dict(model.moba_layers())
    if not layers:
        return []
    rows = []
    for length in lengths:
        accumulators = {
            index: RouterSnrAccumulator(attn.block_size, attn.topk, causal=True)
            for index, attn in layers.items()
        }
        for task in tasks:
            try:
                chosen = _retrieval_samples(task, length, samples, 0, seed)
            except ValueError:  # the length cannot hold the task's template
                continue
            per_batch = max(1, max_tokens_per_batch // length)
            for start in range(0, len(chosen), per_batch):
                chunk = chosen[start : start + per_batch]
                tokens = torch.from_numpy(np.stack([s.tokens for s in chunk])).to(device)
                with autocast(device):
                    captured = capture_qk(model, tokens, layers={str(i): a for i, a in layers.items()})
                for index, accumulator in accumulators.items():
                    q, k = captured[str(index)]
                    for row, sample in enumerate(chunk):
                        end = sample.prompt_length  # the query is token end - 1; later keys are never seen
                        accumulator.add(
                            q[row : row + 1, :end].float(),
                            k[row : row + 1, :end].float(),
                            needle_positions=[list(range(*sample.value_span))],
                            query_positions=[[end - 1]],
                        )
        for index, accumulator in accumulators.items():
            if accumulator.heads_q is None:
                continue
            rows.append(summarise_layer(accumulator.result(), index, length))
    return rows


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| layer | length | samples | mu_signal | mu_noise | sigma | delta_mu_eff | SNR | Phi(-SNR) | "
        "predicted recall | measured recall [95% CI] |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )

    def fmt(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [header]
    for row in rows:
        interval = row.get("measured_recall_interval")
        ci = f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        lines.append(
            f"| {row['layer']} | {row['length']} | {row['samples']} | {fmt(row['mu_signal'])} | "
            f"{fmt(row['mu_noise'])} | {fmt(row['sigma'])} | {fmt(row['delta_mu_eff'])} | "
            f"{fmt(row['snr'], 2)} | "
            f"{fmt(row['failure_probability'])} | {fmt(row['predicted_recall'])} | "
            f"{fmt(row['measured_recall'])}{ci} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a flashmoba train checkpoint (file or run dir)")
    parser.add_argument("--out", required=True, help="the JSON file to write (a .md table goes beside it)")
    parser.add_argument("--lengths", default=None, help="comma-separated sample lengths (default: training)")
    parser.add_argument("--tasks", default="niah1,niah2,niah3")
    parser.add_argument("--samples", type=int, default=32, help="samples per task and length")
    parser.add_argument("--seed", type=int, default=1, help="sample seed (flashmoba eval uses 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens-per-batch", type=int, default=65536)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flashmoba.models.checkpoint import find_checkpoint, model_from_checkpoint, read_checkpoint

    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    path = find_checkpoint(args.checkpoint)
    checkpoint = read_checkpoint(path)
    device = torch.device(args.device)
    model = model_from_checkpoint(checkpoint, device)
    train_length = int(checkpoint["config"]["seq_len"])
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else [train_length]
    tasks = [t for t in args.tasks.split(",") if t]
    rows = measure_trained_router_snr(
        model,
        tasks,
        lengths,
        args.samples,
        device,
        seed=args.seed,
        max_tokens_per_batch=args.max_tokens_per_batch,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "checkpoint": str(path),
        "step": checkpoint.get("step"),
        "model": checkpoint["config"]["model"],
        "train_length": train_length,
        "lengths": lengths,
        "tasks": tasks,
        "samples": args.samples,
        "seed": args.seed,
        "needle": "the value's tokens",
        "query": "the last prompt token",
        "layers": rows,
        "minutes": round((time.perf_counter() - started) / 60, 3),
    }
    out.write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_table(rows) if rows else "no MoBA layer\n")
    print(markdown_table(rows) if rows else "no MoBA layer: nothing to measure", flush=True)
    print(f"router SNR: {out} ({summary['minutes']:.2f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
