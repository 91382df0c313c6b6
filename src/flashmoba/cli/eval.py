"""``flashmoba eval``: perplexity, S-NIAH retrieval accuracy by length, and the MoBA router's needle recall.

    flashmoba eval --checkpoint runs/tiny                       # the latest checkpoint of a run
    flashmoba eval --checkpoint runs/340m/checkpoints/step_0200000.pt --lengths 4096,8192,16384,32768,65536

The checkpoint is verified before use (its checksum, its format, finite weights): a corrupt, truncated or
foreign one is refused with an error naming the file; one without a checksum file (written before
checkpoints carried them) loads with a warning that it cannot be verified.

Measures (see ``flashmoba.evaluation.retrieval``): perplexity of held-out text (the validation split of
the training corpus, or ``--corpus``) over ``--ppl-batches`` packed batches; S-NIAH-1/2/3 (and passkey)
accuracy at each of ``--lengths`` (default: half the training length to 8x it, as the paper's 4K..64K
for 8K training); router recall of the needle's block per MoBA layer.

Writes ``results.json``, ``niah.md`` (tables) and ``niah.png`` (plot) to ``--out`` (default
``<run>/eval``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flashmoba.api import BACKENDS
from flashmoba.cli._flags import int_at_least, ints_at_least
from flashmoba.data import TASKS, load_corpus
from flashmoba.evaluation.retrieval import default_lengths, evaluate_retrieval, perplexity
from flashmoba.evaluation.tables import markdown_tables, plot_retrieval
from flashmoba.models.checkpoint import find_checkpoint, model_from_checkpoint, read_checkpoint
from flashmoba.models.hybrid import ModelConfig
from flashmoba.training.config import TrainConfig, train_config_from_dict
from flashmoba.training.runtime import resolve_device

DEFAULT_TASKS = ("niah1", "niah2", "niah3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmoba eval", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--checkpoint", required=True, help="a checkpoint file or a run directory (its latest checkpoint)")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--backend", choices=list(BACKENDS), help="flashmoba backend (default: the run's)")
    add("--topk", type=int_at_least(1), help="MoBA top-k at evaluation (default: the trained one)")
    add(
        "--lengths",
        type=ints_at_least(1),
        help="comma-separated context lengths (default: half to 8x the training length)",
    )
    add(
        "--tasks",
        type=parse_tasks,
        default=list(DEFAULT_TASKS),
        help=f"comma-separated, among {','.join(TASKS)} (default {','.join(DEFAULT_TASKS)})",
    )
    add(
        "--samples",
        type=int_at_least(1),
        help="samples per task and length (default 50 on CUDA, 10 on CPU, where the "
        "reference MoBA is slow; the paper uses 1000)",
    )
    add(
        "--distractors",
        type=int_at_least(0),
        default=0,
        help="extra needles with other keys in each haystack",
    )
    add(
        "--max-tokens-per-batch",
        type=int_at_least(1),
        default=65536,
        help="rows per forward = this // length",
    )
    add("--ppl-batches", type=int_at_least(0), default=8, help="held-out batches for perplexity (0: skip)")
    add("--corpus", help="held-out text for perplexity (default: the run's corpus, its validation split)")
    add("--seed", type=int_at_least(0), default=0)
    add("--out", help="output directory (default: <run>/eval)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def parse_tasks(text: str) -> list[str]:
    """An argparse ``type``: a comma list of known tasks."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"must be among {TASKS}, got {text!r}")
    return tasks


def heldout_perplexity(args: argparse.Namespace, model, run: TrainConfig, device) -> dict:
    """Perplexity on the validation split of ``--corpus`` or of the run's corpus."""
    _, val_corpus = load_corpus(
        args.corpus or run.data.corpus,
        val_fraction=run.data.val_fraction,
        bos_id=run.data.bos_id,
        vocab_size=run.model.vocab_size,
        seq_len=run.seq_len,
    )
    heldout = perplexity(model, val_corpus, run.seq_len, run.batch_size, args.ppl_batches, device, args.seed)
    print(
        f"held-out loss {heldout['loss']:.4f}, perplexity {heldout['perplexity']:.3f}, "
        f"{heldout['bits_per_token']:.3f} bits per token",
        flush=True,
    )
    return heldout


def retrieval_results(args: argparse.Namespace, model, tasks: list[str], lengths: list[int], device):
    """``evaluate_retrieval`` for every (task, length), tasks outermost."""
    from tqdm.auto import tqdm

    jobs = [(task, n) for task in tasks for n in lengths]
    return [
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
        for task, length in tqdm(jobs, desc="retrieval", disable=not args.progress, dynamic_ncols=True)
    ]


def model_title(config: ModelConfig) -> str:
    """``moba-32/k4 + kconv3``, ``dense``: the plot's name for a model."""
    name = config.global_attention
    if config.global_attention == "moba":
        name += f"-{config.moba_block_size}/k{config.moba_topk}"
    if config.kconv_size:
        name += f" + kconv{config.kconv_size}"
    return name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = args.tasks
    checkpoint_path = find_checkpoint(args.checkpoint)
    device = resolve_device(args.device, 0, setting="--device")
    if args.samples is None:
        args.samples = 50 if device.type == "cuda" else 10
    if args.out == "":
        raise ValueError("--out must be a non-empty path, got ''")
    # Read and verified (checksum, format, finite weights) once; a bad checkpoint raises CheckpointError.
    checkpoint = read_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint, device, args.backend, args.topk)
    run = train_config_from_dict(checkpoint["config"])
    lengths = args.lengths or default_lengths(run.seq_len)
    out = Path(args.out) if args.out else checkpoint_path.parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"flashmoba eval: {checkpoint_path} (step {checkpoint['step']}), "
        f"global attention {model.config.global_attention}, trained at {run.seq_len} tokens",
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
        summary["heldout"] = heldout_perplexity(args, model, run, device)
    results = retrieval_results(args, model, tasks, lengths, device)
    summary["retrieval"] = results
    tables = markdown_tables(results, tasks, lengths)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "niah.md").write_text(tables)
    title = f"{model_title(model.config)}, trained at {run.seq_len} tokens"
    plot_retrieval(results, tasks, lengths, out / "niah.png", title)
    print(tables, flush=True)
    print(f"flashmoba eval: results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
