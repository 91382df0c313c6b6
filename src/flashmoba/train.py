"""``flashmoba train``: train the hybrid MoBA language model, on one CPU or many GPUs through torchrun.

    flashmoba train --preset tiny --max-steps 30 --device cpu --out runs/tiny
    torchrun --nproc-per-node 8 -m flashmoba.train --preset 340m --attn moba --block-size 128 --topk 8 \\
        --kconv 3 --distributed fsdp --activation-checkpointing --out runs/340m-moba128-kconv3

Settings come from, in increasing priority: the defaults below (the paper's optimiser: AdamW 0.9/0.95,
weight decay 0.1, cosine schedule with warmup, peak LR 6e-4, gradient clipping 1.0, bf16 autocast on
GPU), the preset (model shape, sequence length, batch), a JSON config file (``--config``, with the
fields of ``TrainConfig``; ``model`` and ``data`` are nested objects), then command-line flags.

Outputs in ``--out``: ``config.json`` (the resolved settings), ``metrics.jsonl`` (one JSON object per
logged step: step, loss (the training objective, answer-weighted when ``data.answer_loss_weight != 1``),
lr, tokens_per_s, grad_norm, tokens, elapsed_s, and val_loss when evaluated),
and ``checkpoints/step_XXXXXXX.pt`` (model, optimizer, step, config). A run resumes exactly from a
checkpoint (``--resume auto`` takes the latest in ``--out``): batches are a pure function of the step.

Distributed: under ``torchrun`` each process trains on its own batches; gradients are averaged by
PyTorch's DDP (``--distributed ddp``) or the model is sharded by FSDP2's ``fully_shard``
(``--distributed fsdp``). NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from flashmoba.data import TASKS, ByteTokenizer, TokenCorpus, batch_rng, load_corpus, sample_batch
from flashmoba.model import MODEL_PRESETS, HybridLM, ModelConfig, model_config_from_preset


@dataclass
class DataConfig:
    # "python" (the offline default), a path or glob of text, jsonl or token shards, or "hf:NAME"
    corpus: str = "python"
    val_fraction: float = 0.05
    bos_id: int | None = None  # document-start token of token shards (default: the byte tokenizer's)
    task_fraction: float = 0.0  # share of rows replaced by retrieval samples (byte tokenizer only)
    answer_loss_weight: float = 1.0  # loss weight of retrieval answers' tokens (1: plain next-token loss)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    max_bytes: int = 200_000_000  # text read from text files or a streamed dataset


@dataclass
class TrainConfig:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seq_len: int = 8192  # tokens per row (the paper trains at 8K)
    batch_size: int = 8  # rows per process per micro-step
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio (the paper does not say)
    warmup_steps: int = -1  # -1: 1% of max_steps, at least 1, at most 2000 (the paper does not say)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto (CUDA if present), cpu, cuda
    precision: str = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU; or "bf16", "fp32"
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    activation_checkpointing: bool = False
    log_every: int = 1
    eval_every: int = 0  # validation loss every N steps (0: at the end only)
    eval_batches: int = 4
    save_every: int = 1000
    keep_checkpoints: int = 2
    out: str = "runs/latest"
    resume: str | None = None  # None, "auto" (latest checkpoint in out) or a checkpoint path
    progress: bool = True

    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps >= 0:
            return self.warmup_steps
        return min(2000, max(1, self.max_steps // 100))


# Training defaults that go with each model preset (model shapes are in model.MODEL_PRESETS).
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(seq_len=512, batch_size=8, max_steps=200, save_every=100, eval_batches=2),
    "small": dict(seq_len=4096, batch_size=16, max_steps=5000),
    "medium": dict(seq_len=8192, batch_size=8, max_steps=10000),
    "340m": dict(seq_len=8192, batch_size=8, max_steps=200_000),
    "1b": dict(seq_len=8192, batch_size=4, max_steps=200_000),
}


# ----------------------------------------------------------------------------------------------------
# Configuration: defaults < preset < config file < flags
# ----------------------------------------------------------------------------------------------------


def _update_dataclass(target, values: dict, where: str) -> None:
    known = {f.name: f for f in fields(target)}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown setting {where}{name!r} (known: {sorted(known)})")
        current = getattr(target, name)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"setting {where}{name!r} must be an object, got {value!r}")
            _update_dataclass(current, value, f"{where}{name}.")
        else:
            setattr(target, name, value)


def config_from_preset(preset: str) -> TrainConfig:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"preset must be one of {sorted(MODEL_PRESETS)}, got {preset!r}")
    return TrainConfig(preset=preset, model=model_config_from_preset(preset), **TRAIN_PRESETS.get(preset, {}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmoba train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--config", help="JSON file with TrainConfig fields (nested 'model' and 'data' objects)")
    add("--preset", choices=sorted(MODEL_PRESETS), help="model size and its training defaults (default tiny)")
    add("--attn", choices=["dense", "moba"], help="attention of the global layers")
    add("--block-size", type=int, help="MoBA block size")
    add("--topk", type=int, help="MoBA blocks per query (its own block included)")
    add("--kconv", type=int, choices=[0, 3, 5], help="key convolution width in the global layers (0: none)")
    add("--backend", choices=["auto", "reference", "triton"], help="flashmoba backend of the MoBA layers")
    add("--seq-len", type=int, help="tokens per row")
    add("--batch-size", type=int, help="rows per process per micro-step")
    add("--grad-accum-steps", type=int, help="micro-steps per optimizer step")
    add("--max-steps", type=int, help="optimizer steps (the cosine schedule spans them)")
    add("--lr", type=float, help="peak learning rate (default 6e-4)")
    add("--warmup-steps", type=int, help="linear warmup steps (default: 1%% of max steps)")
    add("--corpus", help="'python' (offline default), a text/jsonl/token-shard path or glob, or hf:NAME")
    add("--task-fraction", type=float, help="share of rows that are S-NIAH/passkey samples")
    add("--device", help="auto, cpu or cuda")
    add("--precision", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA, fp32 on CPU")
    add("--distributed", choices=["ddp", "fsdp"], help="under torchrun: DDP or FSDP2 (fully_shard)")
    add(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute each layer in backward",
    )
    add("--seed", type=int)
    add("--log-every", type=int)
    add("--eval-every", type=int, help="validation loss every N steps (0: at the end)")
    add("--save-every", type=int, help="checkpoint every N steps (and at the end)")
    add("--out", help="output directory")
    add("--resume", help="'auto' (latest checkpoint in --out) or a checkpoint file")
    add("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    return parser


def parse_config(argv: list[str] | None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    file_values = {}
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            file_values = json.load(handle)
        if not isinstance(file_values, dict):
            raise ValueError(f"--config {args.config} must hold a JSON object")
    config = config_from_preset(args.preset or file_values.get("preset", "tiny"))
    _update_dataclass(config, {k: v for k, v in file_values.items() if k != "preset"}, "")
    flags = {
        "model": {
            "global_attention": args.attn,
            "moba_block_size": args.block_size,
            "moba_topk": args.topk,
            "kconv_size": args.kconv,
            "backend": args.backend,
        },
        "data": {"corpus": args.corpus, "task_fraction": args.task_fraction},
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "grad_accum_steps": args.grad_accum_steps,
        "max_steps": args.max_steps,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "device": args.device,
        "precision": args.precision,
        "distributed": args.distributed,
        "activation_checkpointing": args.activation_checkpointing,
        "seed": args.seed,
        "log_every": args.log_every,
        "eval_every": args.eval_every,
        "save_every": args.save_every,
        "out": args.out,
        "resume": args.resume,
        "progress": args.progress,
    }
    given = {k: v for k, v in flags.items() if not isinstance(v, dict) and v is not None}
    for nested in ("model", "data"):
        given[nested] = {k: v for k, v in flags[nested].items() if v is not None}
    _update_dataclass(config, given, "")
    config.model = ModelConfig(**asdict(config.model))  # re-validate after the updates
    validate_config(config)
    return config


def validate_config(config: TrainConfig) -> None:
    for name in (
        "seq_len",
        "batch_size",
        "grad_accum_steps",
        "max_steps",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "eval_batches",
    ):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if config.lr <= 0 or not 0 <= config.min_lr_ratio <= 1:
        raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {config.lr}, {config.min_lr_ratio}")
    if config.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {config.precision!r}")
    if config.distributed not in ("ddp", "fsdp"):
        raise ValueError(f"distributed must be ddp or fsdp, got {config.distributed!r}")
    if config.data.task_fraction > 0 and config.model.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(
            "data.task_fraction > 0 needs the byte tokenizer's vocabulary (model.vocab_size >= 257)"
        )
    weight = config.data.answer_loss_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise ValueError(f"data.answer_loss_weight must be a number > 0, got {weight!r}")
    unknown_tasks = sorted(set(config.data.tasks) - set(TASKS))
    if unknown_tasks:
        raise ValueError(f"data.tasks must be among {TASKS}, got {unknown_tasks}")


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to the peak, then a cosine down to ``lr * min_lr_ratio`` at ``max_steps`` (step is 1-based)."""
    warmup = config.resolved_warmup_steps()
    if step <= warmup:
        return config.lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, config.max_steps - warmup))
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def autocast_context(config: TrainConfig, device: torch.device):
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings, none on norms and key-convolution filters."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and "key_conv" not in name else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps)


def wrap_distributed(model: HybridLM, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """DDP or FSDP2 when running under torchrun with more than one process; the model itself otherwise."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return model
    if config.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def save_checkpoint(path: Path, model, optimizer, step: int, config: TrainConfig, rank: int) -> None:
    """Gather the full (unsharded) model and optimizer state and write it from rank 0."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=_state_dict_options(cpu_offload=True)
    )
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        torch.save(
            {"step": step, "config": asdict(config), "model": model_state, "optimizer": optimizer_state},
            temporary,
        )
        os.replace(temporary, path)  # never leave a half-written checkpoint behind
        checkpoints = sorted(path.parent.glob("step_*.pt"))
        for old in checkpoints[: max(0, len(checkpoints) - config.keep_checkpoints)]:
            old.unlink()
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer) -> int:
    """Load a checkpoint written by ``save_checkpoint`` into (possibly wrapped) model and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=checkpoint["model"],
        optim_state_dict=checkpoint["optimizer"],
        options=_state_dict_options(),
    )
    return int(checkpoint["step"])


def latest_checkpoint(out: Path) -> Path | None:
    checkpoints = sorted((out / "checkpoints").glob("step_*.pt"))
    return checkpoints[-1] if checkpoints else None


@torch.no_grad()
def validation_loss(model, corpus: TokenCorpus, config: TrainConfig, device, rank: int, world: int) -> float:
    """Mean loss over ``eval_batches`` fixed validation batches per process, averaged over processes."""
    model.eval()
    total = torch.zeros((), device=device)
    for index in range(config.eval_batches):
        batch = sample_batch(
            corpus,
            config.batch_size,
            config.seq_len,
            batch_rng(config.seed, rank, index, micro_step=2**31 - 1),
        ).to(device)
        with autocast_context(config, device):
            _, loss = model(batch.input_ids, batch.targets, batch.cu_seqlens, batch.max_seqlen)
        total += loss.float()
    model.train()
    total /= config.eval_batches
    if world > 1:
        dist.all_reduce(total)
        total /= world
    return float(total)


def _sync_gradients(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> list[dict]:
    """Run the training described by ``config``; returns the metrics rows it logged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device, local_rank)
    started_process_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started_process_group = True
    try:
        return _train(config, device, rank, world)
    finally:
        if started_process_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, device: torch.device, rank: int, world: int) -> list[dict]:
    out = Path(config.out)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")

    torch.manual_seed(config.seed)  # the same initial weights on every process
    model = HybridLM(config.model).to(device)
    model.activation_checkpointing = config.activation_checkpointing
    wrapped = wrap_distributed(model, config, device)
    optimizer = make_optimizer(wrapped, config)

    train_corpus, val_corpus = load_corpus(
        config.data.corpus,
        val_fraction=config.data.val_fraction,
        bos_id=config.data.bos_id,
        max_bytes=config.data.max_bytes,
    )

    start_step = 0
    resume_path = None
    if config.resume == "auto":
        resume_path = latest_checkpoint(out)
    elif config.resume:
        resume_path = Path(config.resume)
        if not resume_path.is_file():
            raise ValueError(f"resume checkpoint {resume_path} does not exist")
    if resume_path is not None:
        stored = torch.load(resume_path, map_location="cpu", weights_only=True)["config"]["model"]
        current = asdict(config.model)
        different = sorted(
            k for k in current if k != "backend" and stored.get(k) != current[k]
        )  # backend may change
        if different:
            raise ValueError(
                f"checkpoint {resume_path} holds a different model config in {different}: {stored}"
            )
        start_step = load_checkpoint(resume_path, wrapped, optimizer)

    metrics_path = out / "metrics.jsonl"
    if is_main:  # keep the history up to the resumed step, drop what a crashed run logged after it
        kept = []
        if start_step > 0 and metrics_path.exists():
            kept = [
                line
                for line in metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step
            ]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        print(
            f"flashmoba train: {model.num_parameters() / 1e6:.2f}M parameters, preset {config.preset}, "
            f"global attention {config.model.global_attention}, {world} process(es) on {device}, "
            f"corpus {config.data.corpus} ({train_corpus.num_tokens:,} training tokens)"
            + (f", resumed from {resume_path} at step {start_step}" if resume_path else ""),
            flush=True,
        )

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum_steps * world
    progress = None
    if is_main and config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=config.max_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
    logged: list[dict] = []
    run_start = last_log_time = time.perf_counter()
    last_log_step = start_step
    wrapped.train()
    for step in range(start_step + 1, config.max_steps + 1):
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro_step in range(config.grad_accum_steps):
            batch = sample_batch(
                train_corpus,
                config.batch_size,
                config.seq_len,
                batch_rng(config.seed, rank, step, micro_step),
                task_fraction=config.data.task_fraction,
                tasks=tuple(config.data.tasks),
                answer_loss_weight=config.data.answer_loss_weight,
            ).to(device)
            with _sync_gradients(wrapped, micro_step == config.grad_accum_steps - 1):
                with autocast_context(config, device):
                    _, loss = wrapped(
                        batch.input_ids, batch.targets, batch.cu_seqlens, batch.max_seqlen, batch.loss_weights
                    )
                (loss / config.grad_accum_steps).backward()
            step_loss += loss.detach() / config.grad_accum_steps
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        should_log = step % config.log_every == 0 or step == config.max_steps
        should_eval = step == config.max_steps or (config.eval_every > 0 and step % config.eval_every == 0)
        if should_log or should_eval:
            if world > 1:
                dist.all_reduce(step_loss)
                step_loss /= world
            loss_value = float(step_loss)  # waits for the step to finish
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()  # throughput over the steps since the last log line
            tokens_per_s = (step - last_log_step) * tokens_per_step / (now - last_log_time)
            last_log_time, last_log_step = now, step
            row = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "tokens_per_s": tokens_per_s,
                "grad_norm": float(
                    grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                ),
                "tokens": step * tokens_per_step,
                "elapsed_s": time.perf_counter() - run_start,
            }
            if should_eval:
                row["val_loss"] = validation_loss(wrapped, val_corpus, config, device, rank, world)
                last_log_time = time.perf_counter()  # evaluation time does not count as training
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step}")
            if is_main:
                with metrics_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                logged.append(row)
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}"
                    )
        if progress is not None:
            progress.update(1)
        if step % config.save_every == 0 or step == config.max_steps:
            save_start = time.perf_counter()
            save_checkpoint(
                out / "checkpoints" / f"step_{step:07d}.pt", wrapped, optimizer, step, config, rank
            )
            last_log_time += time.perf_counter() - save_start  # nor does saving
    if progress is not None:
        progress.close()
    if is_main and logged:
        last = logged[-1]
        print(
            f"flashmoba train: step {last['step']} loss {last['loss']:.4f}"
            + (f" val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
            + f"; outputs in {out}",
            flush=True,
        )
    return logged


def main(argv: list[str] | None = None) -> int:
    """The command's entry. A process of a torchrun job (WORLD_SIZE > 1) ends here once training is done."""
    config = parse_config(argv)
    train(config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Skip interpreter finalization. DTensor's caches keep the gloo process group alive past
        # destroy_process_group, and one of its worker threads may still be releasing a finished
        # collective that holds a Python tensor when the interpreter shuts down; taking the GIL then
        # kills that thread and the process aborts (SIGABRT) after a successful run. Every file the
        # run writes is closed by now; flush what is buffered.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
