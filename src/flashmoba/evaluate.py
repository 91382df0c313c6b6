"""``flashmoba eval``: perplexity, S-NIAH retrieval accuracy by length, and the MoBA router's needle recall.

    flashmoba eval --checkpoint runs/tiny                       # the latest checkpoint of a run
    flashmoba eval --checkpoint runs/340m/checkpoints/step_0200000.pt --lengths 4096,8192,16384,32768,65536

Measures:

- perplexity of held-out text (the validation split of the training corpus, or ``--corpus``): mean
  next-token loss over ``--ppl-batches`` packed batches, its exp, and bits per token (= bits per byte
  with the byte tokenizer);
- S-NIAH-1/2/3 (and passkey) accuracy at each of ``--lengths`` (default: half the training length to 8x
  it, as the paper's 4K..64K for 8K training). A sample is right when greedy decoding after the prompt
  produces the value: computed in one forward pass by checking that the argmax at every answer position
  is the answer's next token (teacher forcing makes the two identical). Needles sit at evenly spaced
  depths;
- router recall, per MoBA layer: the share of (sample, query head) pairs in which the block holding the
  needle's value is among the blocks selected for the last prompt token (the query that must produce
  the answer).

Writes ``results.json``, ``niah.md`` (tables) and ``niah.png`` (plot) to ``--out`` (default
``<run>/eval``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from flashmoba.data import TASKS, batch_rng, load_corpus, make_sample, sample_batch
from flashmoba.model import HybridLM, ModelConfig
from flashmoba.train import latest_checkpoint, resolve_device

TASK_TITLES = {"niah1": "S-NIAH-1", "niah2": "S-NIAH-2", "niah3": "S-NIAH-3", "passkey": "passkey"}


def find_checkpoint(path: str) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    candidate = Path(path)
    if candidate.is_dir():
        found = latest_checkpoint(candidate)
        if found is None:
            raise ValueError(f"no checkpoints/step_*.pt under {candidate}")
        return found
    if not candidate.is_file():
        raise ValueError(f"checkpoint {candidate} does not exist")
    return candidate


def load_model(
    checkpoint_path: Path, device: torch.device, backend: str | None = None, topk: int | None = None
):
    """(model in eval mode, the run's config dict) from a ``flashmoba train`` checkpoint."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    model_values = dict(config["model"])
    if backend is not None:
        model_values["backend"] = backend
    if topk is not None:
        model_values["moba_topk"] = topk
    model = HybridLM(ModelConfig(**model_values))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def perplexity(
    model: HybridLM, corpus, seq_len: int, batch_size: int, batches: int, device, seed: int = 0
) -> dict:
    total_loss, total_tokens = 0.0, 0
    for index in range(batches):
        batch = sample_batch(corpus, batch_size, seq_len, batch_rng(seed, 0, index, micro_step=2**31 - 2)).to(
            device
        )
        with _autocast(device):
            _, loss = model(batch.input_ids, batch.targets, batch.cu_seqlens, batch.max_seqlen)
        tokens = int((batch.targets != -100).sum())
        total_loss += float(loss) * tokens
        total_tokens += tokens
    mean = total_loss / total_tokens
    return {
        "loss": mean,
        "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "tokens": total_tokens,
    }


class RouterProbe:
    """Forward hooks on the MoBA layers that record, for one query position per row, the selected blocks."""

    def __init__(self, model: HybridLM):
        self.layers = model.moba_layers()
        self.query_positions: list[int] = []
        self.selections: dict[int, torch.Tensor] = {}  # layer -> [batch, heads, topk]
        self.handles = [attn.register_forward_hook(self._hook(index)) for index, attn in self.layers]

    def _hook(self, layer_index: int):
        def hook(module, args, output):
            selected = module.select_blocks(args[0])  # [batch, seqlen, heads, topk]
            rows = torch.arange(selected.shape[0], device=selected.device)
            positions = torch.tensor(self.query_positions, device=selected.device)
            self.selections[layer_index] = selected[rows, positions].cpu()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def evaluate_retrieval(
    model: HybridLM,
    task: str,
    length: int,
    samples: int,
    device: torch.device,
    *,
    max_tokens_per_batch: int = 65536,
    distractors: int = 0,
    seed: int = 0,
) -> dict:
    """Accuracy of ``task`` at ``length`` tokens and, per MoBA layer, the router's recall of the needle block."""
    rng = np.random.default_rng([seed, TASKS.index(task), length])
    depths = (np.arange(samples) + 0.5) / samples
    try:
        all_samples = [
            make_sample(task, length, rng, depth=float(d), distractors=distractors) for d in depths
        ]
    except ValueError as error:  # the length cannot hold the task's template
        return {
            "task": task,
            "length": length,
            "samples": 0,
            "accuracy": None,
            "token_accuracy": None,
            "router_recall": {},
            "error": str(error),
        }
    probe = RouterProbe(model)
    correct = correct_tokens = answer_tokens = 0
    recall_hits = {index: 0 for index, _ in probe.layers}
    recall_total = 0
    rows_per_batch = max(1, max_tokens_per_batch // length)
    try:
        for start in range(0, samples, rows_per_batch):
            chunk = all_samples[start : start + rows_per_batch]
            tokens = torch.from_numpy(np.stack([s.tokens for s in chunk])).to(device)
            probe.query_positions = [s.prompt_length - 1 for s in chunk]
            with _autocast(device):
                logits, _ = model(tokens)
            for row, sample in enumerate(chunk):
                first, last = sample.answer_span
                predicted = logits[row, first - 1 : last - 1].argmax(-1)
                correct += bool(torch.equal(predicted, tokens[row, first:last]))
                correct_tokens += int((predicted == tokens[row, first:last]).sum())
                answer_tokens += last - first
            for layer_index, attn in probe.layers:
                selected = probe.selections[layer_index]  # [rows, heads, topk]
                for row, sample in enumerate(chunk):
                    value_start, value_end = sample.value_span
                    needle_blocks = torch.arange(
                        value_start // attn.block_size, (value_end - 1) // attn.block_size + 1
                    )
                    hits = torch.isin(selected[row], needle_blocks).any(-1)  # [heads]
                    recall_hits[layer_index] += int(hits.sum())
            recall_total += len(chunk) * model.config.num_heads
    finally:
        probe.remove()
    return {
        "task": task,
        "length": length,
        "samples": samples,
        "accuracy": correct / samples,
        "token_accuracy": correct_tokens / answer_tokens,  # partial credit: answer tokens right
        "router_recall": {str(i): recall_hits[i] / recall_total for i in recall_hits} if recall_total else {},
    }


def default_lengths(train_seq_len: int) -> list[int]:
    """Half the training length to 8x it in powers of two (8K training gives the paper's 4K..64K), >= 512."""
    return sorted({max(512, train_seq_len * 2**p // 2) for p in range(5)})


def _accuracy(result: dict, key: str = "accuracy") -> float:
    return math.nan if result[key] is None else 100 * result[key]


def _mean_recall(results: list[dict], layer: int) -> float:
    values = [r["router_recall"][str(layer)] for r in results if str(layer) in r["router_recall"]]
    return 100 * float(np.mean(values)) if values else math.nan


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _markdown_tables(results: list[dict], tasks: list[str], lengths: list[int]) -> str:
    by_key = {(r["task"], r["length"]): r for r in results}
    lines = []
    for key, title in [("accuracy", "Retrieval accuracy (%)"), ("token_accuracy", "Answer tokens right (%)")]:
        lines += [
            f"## {title}",
            "",
            "| task | " + " | ".join(str(n) for n in lengths) + " | avg |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for task in tasks:
            accuracies = [_accuracy(by_key[(task, n)], key) for n in lengths]
            measured = [a for a in accuracies if not math.isnan(a)]
            average = f"{np.mean(measured):.1f}" if measured else "-"
            lines.append(
                f"| {TASK_TITLES[task]} | " + " | ".join(_cell(a) for a in accuracies) + f" | {average} |"
            )
        lines.append("")
    layers = sorted({int(layer) for r in results for layer in r["router_recall"]})
    if layers:
        lines += [
            "## Router recall of the needle's block (%), per MoBA layer, mean over tasks",
            "",
            "| layer | " + " | ".join(str(n) for n in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for layer in layers:
            cells = [_mean_recall([by_key[(t, n)] for t in tasks], layer) for n in lengths]
            lines.append(f"| {layer} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: list[dict], tasks: list[str], lengths: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r["task"], r["length"]): r for r in results}
    layers = sorted({int(layer) for r in results for layer in r["router_recall"]})
    figure, axes = plt.subplots(1, 2 if layers else 1, figsize=(11 if layers else 6, 4), squeeze=False)
    accuracy_axis = axes[0][0]
    for task in tasks:
        accuracy_axis.plot(
            lengths, [_accuracy(by_key[(task, n)]) for n in lengths], marker="o", label=TASK_TITLES[task]
        )
    accuracy_axis.set(
        xscale="log",
        xlabel="context length (tokens)",
        ylabel="accuracy (%)",
        ylim=(-3, 103),
        title="retrieval accuracy",
    )
    accuracy_axis.set_xticks(lengths, [str(n) for n in lengths])
    accuracy_axis.minorticks_off()
    accuracy_axis.legend()
    if layers:
        recall_axis = axes[0][1]
        for layer in layers:
            recall_axis.plot(
                lengths,
                [_mean_recall([by_key[(t, n)] for t in tasks], layer) for n in lengths],
                marker="o",
                label=f"layer {layer}",
            )
        recall_axis.set(
            xscale="log",
            xlabel="context length (tokens)",
            ylabel="recall (%)",
            ylim=(-3, 103),
            title="router recall of the needle block",
        )
        recall_axis.set_xticks(lengths, [str(n) for n in lengths])
        recall_axis.minorticks_off()
        recall_axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmoba eval", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--checkpoint", required=True, help="a checkpoint file or a run directory (its latest checkpoint)")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--backend", choices=["auto", "reference", "triton"], help="flashmoba backend (default: the run's)")
    add("--topk", type=int, help="MoBA top-k at evaluation (default: the trained one)")
    add("--lengths", help="comma-separated context lengths (default: half to 8x the training length)")
    add("--tasks", default="niah1,niah2,niah3", help=f"comma-separated, among {','.join(TASKS)}")
    add(
        "--samples",
        type=int,
        help="samples per task and length (default 50 on CUDA, 10 on CPU, where the "
        "reference MoBA is slow; the paper uses 1000)",
    )
    add("--distractors", type=int, default=0, help="extra needles with other keys in each haystack")
    add("--max-tokens-per-batch", type=int, default=65536, help="rows per forward = this // length")
    add("--ppl-batches", type=int, default=8, help="held-out batches for perplexity (0: skip)")
    add("--corpus", help="held-out text for perplexity (default: the run's corpus, its validation split)")
    add("--seed", type=int, default=0)
    add("--out", help="output directory (default: <run>/eval)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"--tasks must be among {TASKS}, got {args.tasks!r}")
    checkpoint_path = find_checkpoint(args.checkpoint)
    device = resolve_device(args.device, 0)
    if args.samples is None:
        args.samples = 50 if device.type == "cuda" else 10
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    model, config = load_model(checkpoint_path, device, args.backend, args.topk)
    train_seq_len = int(config["seq_len"])
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else default_lengths(train_seq_len)
    out = Path(args.out) if args.out else checkpoint_path.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"flashmoba eval: {checkpoint_path} (step {torch.load(checkpoint_path, map_location='cpu', weights_only=True)['step']}), "
        f"global attention {model.config.global_attention}, trained at {train_seq_len} tokens",
        flush=True,
    )

    summary: dict = {
        "checkpoint": str(checkpoint_path),
        "model": model.config.to_dict(),
        "lengths": lengths,
        "tasks": tasks,
        "samples": args.samples,
        "distractors": args.distractors,
    }
    if args.ppl_batches > 0:
        _, val_corpus = load_corpus(
            args.corpus or config["data"]["corpus"],
            val_fraction=config["data"]["val_fraction"],
            bos_id=config["data"]["bos_id"],
        )
        summary["heldout"] = perplexity(
            model, val_corpus, train_seq_len, int(config["batch_size"]), args.ppl_batches, device, args.seed
        )
        print(
            f"held-out loss {summary['heldout']['loss']:.4f}, perplexity {summary['heldout']['perplexity']:.3f}, "
            f"{summary['heldout']['bits_per_token']:.3f} bits per token",
            flush=True,
        )

    from tqdm.auto import tqdm

    jobs = [(task, n) for task in tasks for n in lengths]
    results = []
    for task, length in tqdm(jobs, desc="retrieval", disable=not args.progress, dynamic_ncols=True):
        results.append(
            evaluate_retrieval(
                model,
                task,
                length,
                args.samples,
                device,
                distractors=args.distractors,
                max_tokens_per_batch=args.max_tokens_per_batch,
                seed=args.seed,
            )
        )
    summary["retrieval"] = results
    tables = _markdown_tables(results, tasks, lengths)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "niah.md").write_text(tables)
    name = f"{model.config.global_attention}" + (
        f"-{model.config.moba_block_size}/k{model.config.moba_topk}"
        if model.config.global_attention == "moba"
        else ""
    )
    if model.config.kconv_size:
        name += f" + kconv{model.config.kconv_size}"
    _plot(results, tasks, lengths, out / "niah.png", f"{name}, trained at {train_seq_len} tokens")
    print(tables, flush=True)
    print(f"flashmoba eval: results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
