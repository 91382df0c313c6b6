"""The training loop of ``flashmoba train``, on one CPU or many GPUs through torchrun.

``train(config)`` writes to ``config.out``: ``config.json`` (the resolved settings), ``metrics.jsonl``
(one JSON object per logged step: step, loss (the training objective, answer-weighted when
``data.answer_loss_weight != 1``), lr, tokens_per_s, grad_norm, tokens, elapsed_s, and val_loss when
evaluated), and ``checkpoints/step_XXXXXXX.pt`` (see ``flashmoba.models.checkpoint``). A run resumes
exactly from a checkpoint (``resume="auto"`` takes the latest in ``out``): batches are a pure function of
(seed, rank, step, micro-step).

Distributed: under ``torchrun`` each process trains on its own batches; gradients are averaged by
PyTorch's DDP (``distributed="ddp"``) or the model is sharded by FSDP2's ``fully_shard``
(``distributed="fsdp"``). NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from flashmoba.data import PackedBatch, TokenCorpus, batch_rng, load_corpus, sample_batch
from flashmoba.models.checkpoint import checkpoint_config, latest_checkpoint, load_checkpoint, save_checkpoint
from flashmoba.models.hybrid import HybridLM
from flashmoba.training.config import TrainConfig
from flashmoba.training.runtime import autocast, resolve_device

# The micro-step id of validation batches: past any real accumulation, so that validation batches are
# fixed for a run and never drawn from a training step's stream.
VALIDATION_MICRO_STEP = 2**31 - 1


# ----------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to the peak, then a cosine down to ``lr * min_lr_ratio`` at ``max_steps`` (step is
    1-based)."""
    warmup = config.resolved_warmup_steps()
    if step <= warmup:
        return config.lr * step / warmup
    progress = min(1.0, (step - warmup) / max(1, config.max_steps - warmup))
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


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


def train_batch(
    corpus: TokenCorpus, config: TrainConfig, rank: int, step: int, micro_step: int
) -> PackedBatch:
    """The batch of (rank, step, micro-step): a pure function of them and the seed, so resume is exact."""
    return sample_batch(
        corpus,
        config.batch_size,
        config.seq_len,
        batch_rng(config.seed, rank, step, micro_step),
        task_fraction=config.data.task_fraction,
        tasks=tuple(config.data.tasks),
        answer_loss_weight=config.data.answer_loss_weight,
    )


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
            batch_rng(config.seed, rank, index, micro_step=VALIDATION_MICRO_STEP),
        ).to(device)
        with autocast(device, config.precision):
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


def train_step(
    model, optimizer, corpus: TokenCorpus, config: TrainConfig, rank: int, step: int, device
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One optimizer step over ``grad_accum_steps`` micro-steps: (lr, mean loss, gradient norm). The
    loss stays on the device; reading it waits for the step."""
    lr = learning_rate(config, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=device)
    for micro_step in range(config.grad_accum_steps):
        batch = train_batch(corpus, config, rank, step, micro_step).to(device)
        with _sync_gradients(model, micro_step == config.grad_accum_steps - 1):
            with autocast(device, config.precision):
                _, loss = model(
                    batch.input_ids, batch.targets, batch.cu_seqlens, batch.max_seqlen, batch.loss_weights
                )
            (loss / config.grad_accum_steps).backward()
        step_loss += loss.detach() / config.grad_accum_steps
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, step_loss, grad_norm


class ThroughputClock:
    """Tokens per second over the steps since the last log line; evaluation and saving do not count."""

    def __init__(self, step: int, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.start = self.last_time = time.perf_counter()
        self.last_step = step

    def tokens_per_s(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.last_step) * self.tokens_per_step / (now - self.last_time)
        self.last_time, self.last_step = now, step
        return rate

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def restart(self) -> None:
        """The interval since the last log line starts now (after an evaluation)."""
        self.last_time = time.perf_counter()

    @contextlib.contextmanager
    def paused(self):
        started = time.perf_counter()
        yield
        self.last_time += time.perf_counter() - started


def metrics_row(
    step: int, lr: float, step_loss, grad_norm, clock: ThroughputClock, world: int, device
) -> dict:
    """The metrics of ``step`` (its loss averaged over processes); waits for the step to finish."""
    if world > 1:
        dist.all_reduce(step_loss)
        step_loss /= world
    loss_value = float(step_loss)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tokens_per_s = clock.tokens_per_s(step)
    return {
        "step": step,
        "loss": loss_value,
        "lr": lr,
        "tokens_per_s": tokens_per_s,
        "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
        "tokens": step * clock.tokens_per_step,
        "elapsed_s": clock.elapsed_s(),
    }


# ----------------------------------------------------------------------------------------------------
# Setting up and resuming a run
# ----------------------------------------------------------------------------------------------------


def build_model(config: TrainConfig, device: torch.device):
    """(model, its distributed wrapper or itself, optimizer); the same initial weights on every process."""
    torch.manual_seed(config.seed)
    model = HybridLM(config.model).to(device)
    model.activation_checkpointing = config.activation_checkpointing
    wrapped = wrap_distributed(model, config, device)
    return model, wrapped, make_optimizer(wrapped, config)


def load_data(config: TrainConfig) -> tuple[TokenCorpus, TokenCorpus]:
    return load_corpus(
        config.data.corpus,
        val_fraction=config.data.val_fraction,
        bos_id=config.data.bos_id,
        max_bytes=config.data.max_bytes,
    )


def resume_path(config: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from: none, the latest in ``out`` (``auto``) or the given file."""
    if config.resume == "auto":
        return latest_checkpoint(out)
    if config.resume:
        path = Path(config.resume)
        if not path.is_file():
            raise ValueError(f"resume checkpoint {path} does not exist")
        return path
    return None


def write_run_config(out: Path, config: TrainConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")


def resume(config: TrainConfig, out: Path, model, optimizer) -> tuple[int, Path | None]:
    """(the step to continue after, the checkpoint loaded): (0, None) for a fresh run."""
    path = resume_path(config, out)
    if path is None:
        return 0, None
    check_same_model(path, config)
    return load_checkpoint(path, model, optimizer), path


def check_same_model(path: Path, config: TrainConfig) -> None:
    """A run resumes only into the model shape it was trained with; the MoBA backend may change."""
    stored = checkpoint_config(path)["model"]
    current = asdict(config.model)
    different = sorted(k for k in current if k != "backend" and stored.get(k) != current[k])
    if different:
        raise ValueError(f"checkpoint {path} holds a different model config in {different}: {stored}")


def reset_metrics(metrics_path: Path, start_step: int) -> None:
    """Keep the history up to the resumed step, drop what a crashed run logged after it."""
    kept = []
    if start_step > 0 and metrics_path.exists():
        kept = [
            line
            for line in metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= start_step
        ]
    metrics_path.write_text("".join(line + "\n" for line in kept))


def _progress_bar(config: TrainConfig, start_step: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=config.max_steps,
        initial=start_step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )


def is_log_step(config: TrainConfig, step: int) -> bool:
    return step % config.log_every == 0 or step == config.max_steps


def is_eval_step(config: TrainConfig, step: int) -> bool:
    return step == config.max_steps or (config.eval_every > 0 and step % config.eval_every == 0)


def is_save_step(config: TrainConfig, step: int) -> bool:
    return step % config.save_every == 0 or step == config.max_steps


def append_metrics(metrics_path: Path, row: dict, progress=None) -> None:
    with metrics_path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    if progress is not None:
        progress.set_postfix(
            loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}"
        )


def _start_message(model, config: TrainConfig, world: int, device, corpus, resumed_from, start_step) -> str:
    return (
        f"flashmoba train: {model.num_parameters() / 1e6:.2f}M parameters, preset {config.preset}, "
        f"global attention {config.model.global_attention}, {world} process(es) on {device}, "
        f"corpus {config.data.corpus} ({corpus.num_tokens:,} training tokens)"
        + (f", resumed from {resumed_from} at step {start_step}" if resumed_from else "")
    )


def _end_message(last: dict, out: Path) -> str:
    return (
        f"flashmoba train: step {last['step']} loss {last['loss']:.4f}"
        + (f" val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
        + f"; outputs in {out}"
    )


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
        write_run_config(out, config)
    model, wrapped, optimizer = build_model(config, device)
    train_corpus, val_corpus = load_data(config)
    start_step, resumed_from = resume(config, out, wrapped, optimizer)
    metrics_path = out / "metrics.jsonl"
    if is_main:
        reset_metrics(metrics_path, start_step)
        print(
            _start_message(model, config, world, device, train_corpus, resumed_from, start_step), flush=True
        )

    progress = _progress_bar(config, start_step) if is_main and config.progress else None
    logged: list[dict] = []
    clock = ThroughputClock(start_step, config.batch_size * config.seq_len * config.grad_accum_steps * world)
    wrapped.train()
    for step in range(start_step + 1, config.max_steps + 1):
        lr, step_loss, grad_norm = train_step(wrapped, optimizer, train_corpus, config, rank, step, device)
        evaluate = is_eval_step(config, step)
        if is_log_step(config, step) or evaluate:
            row = metrics_row(step, lr, step_loss, grad_norm, clock, world, device)
            if evaluate:
                row["val_loss"] = validation_loss(wrapped, val_corpus, config, device, rank, world)
                clock.restart()
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss became {row['loss']} at step {step}")
            if is_main:
                append_metrics(metrics_path, row, progress)
                logged.append(row)
        if progress is not None:
            progress.update(1)
        if is_save_step(config, step):
            with clock.paused():
                save_checkpoint(
                    out / "checkpoints" / f"step_{step:07d}.pt", wrapped, optimizer, step, config, rank
                )
    if progress is not None:
        progress.close()
    if is_main and logged:
        print(_end_message(logged[-1], out), flush=True)
    return logged
