"""The training loop of ``flashmoba train``, on one CPU or many GPUs through torchrun.

``train(config)`` writes to ``config.out``: ``config.json`` (the resolved settings), ``metrics.jsonl``
(one JSON object per logged step: step, loss (the training objective, answer-weighted when
``data.answer_loss_weight != 1``), lr, tokens_per_s, grad_norm, tokens, elapsed_s, and val_loss when
evaluated), and ``checkpoints/step_XXXXXXX.pt`` with their checksums (see ``flashmoba.models.checkpoint``).
A run resumes exactly from a checkpoint (``resume="auto"`` takes the newest intact one in ``out``):
batches are a pure function of (seed, rank, step, micro-step). Which run may write to ``out`` and what a
resume may change are the rules of ``flashmoba.training.run_directory``; they are checked, with the
settings and the data, before anything is written. A step whose loss or gradient norm is not finite
stops the run (``FloatingPointError`` naming the step) before any checkpoint of it or a later step.

Distributed: under ``torchrun`` each process trains on its own batches; gradients are averaged by
PyTorch's DDP (``distributed="ddp"``) or the model is sharded by FSDP2's ``fully_shard``
(``distributed="fsdp"``). NCCL on GPUs, gloo on CPUs.

Context parallelism (``context_parallel = N > 1``): the processes form a 2-D ``DeviceMesh``
``(dp, cp)`` with ``cp = N`` innermost; the ``N`` processes of a ``cp`` group draw the batch of their
``dp`` index and each takes its contiguous slice of every row (``ContextParallel``: MoBA layers through
``moba_attn_context_parallel``, sliding-window layers with the previous slice's ``window_size - 1`` keys
and values, RoPE at absolute positions). Each process's objective is its targets' loss sum divided by
the whole rows' scored-target count (summed over the ``cp`` group), times ``N``: DDP and FSDP average
gradients over all ``dp * cp`` processes, which then gives the mean over ``dp`` of each batch's gradient.
FSDP2 runs as HSDP on the mesh (``fully_shard(mesh=...)``: replicated over ``dp``, sharded over
``cp``). Blocks and the head run eager (no torch.compile) under context parallelism.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flashmoba.data import PackedBatch, TokenCorpus, batch_rng, load_corpus, sample_batch
from flashmoba.models.checkpoint import apply_checkpoint, save_checkpoint
from flashmoba.models.hybrid import HybridLM
from flashmoba.parallel import ContextParallel
from flashmoba.training.config import TrainConfig, validate_config
from flashmoba.training.run_directory import RunPlan, apply_plan, plan_run
from flashmoba.training.runtime import (
    autocast,
    begin_graph_iteration,
    blocks_compile_mode,
    head_compile_mode,
    resolve_device,
    uses_cuda_graphs,
)

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
    """AdamW; weight decay on matrices and embeddings, none on norms and key-convolution filters. Fused
    (one kernel for all parameters) when they are all on CUDA; the default multi-tensor version on CPU,
    so that CPU runs keep their numbers."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and "key_conv" not in name else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(parameter.is_cuda for parameter in decay + no_decay)
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps, fused=fused or None
    )


def wrap_distributed(
    model: HybridLM, config: TrainConfig, device: torch.device, mesh=None
) -> torch.nn.Module:
    """DDP or FSDP2 when running under torchrun with more than one process; the model itself otherwise.
    With a context-parallel ``mesh`` (``dp x cp``), FSDP2 shards over ``cp`` and replicates over ``dp``;
    DDP averages over every process either way."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return model
    if config.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        options = {} if mesh is None else {"mesh": mesh}
        for block in model.blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
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


@dataclasses.dataclass
class ParallelLayout:
    """Where this process sits: ``data_rank`` / ``data_world`` index and count the processes that draw
    their own batches (the ``dp`` axis; every process without context parallelism), ``context`` the
    context-parallel hook and ``mesh`` the ``(dp, cp)`` DeviceMesh (both None without it)."""

    rank: int
    world: int
    data_rank: int
    data_world: int
    context: ContextParallel | None = None
    mesh: object = None


def parallel_layout(config: TrainConfig, device: torch.device, rank: int, world: int) -> ParallelLayout:
    """The layout of this run; with ``context_parallel > 1`` builds the ``(dp, cp)`` mesh (a collective)."""
    cp = config.context_parallel
    if cp == 1:
        return ParallelLayout(rank, world, rank, world)
    if world % cp != 0 or world < cp:
        raise ValueError(
            f"context_parallel ({cp}) must divide the number of processes ({world}; run under torchrun "
            f"with a multiple of {cp} processes)"
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    # The attention's collectives on groups of their own, not the mesh's "cp" groups that FSDP2 shards
    # over: FSDP2 issues its collectives from other streams, and two streams must not interleave their
    # collectives on one NCCL communicator (ranks could then meet in different orders).
    group, _ = dist.new_subgroups_by_enumeration(mesh.mesh.tolist())
    context = ContextParallel(group, scheme=config.context_parallel_scheme)
    return ParallelLayout(rank, world, mesh.get_local_rank("dp"), world // cp, context, mesh)


def _rows(tensor: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """A packed ``[batch * seq_len]`` tensor as its rows ``[batch, seq_len]``."""
    return None if tensor is None else tensor.view(-1, seq_len)


def _context_parallel_loss(model, batch: PackedBatch, config: TrainConfig, context: ContextParallel):
    """(objective, loss) of this process's slice of the rows (see the module docstring): the objective is
    ``cp *`` its targets' loss sum over the whole rows' scored-target count; the loss, the whole rows'
    mean loss, is the same on every process of the group."""
    width = config.seq_len // context.world_size
    local = slice(context.rank * width, (context.rank + 1) * width)
    input_ids = _rows(batch.input_ids, config.seq_len)[:, local]
    targets = _rows(batch.targets, config.seq_len)[:, local]
    logits, _ = model(input_ids, context_parallel=context)
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    if batch.loss_weights is not None:
        per_token = per_token * _rows(batch.loss_weights, config.seq_len)[:, local].reshape(-1).float()
    scored = (targets != -100).sum().to(per_token.dtype)
    dist.all_reduce(scored, group=context.group)
    loss = per_token.sum() / scored.clamp(min=1)
    reported = loss.detach().clone()
    dist.all_reduce(reported, group=context.group)
    return loss * context.world_size, reported


def batch_loss(model, batch: PackedBatch, host_batch: PackedBatch, config: TrainConfig, context=None):
    """(the objective to backpropagate, the batch's loss to report) of one batch on the device. Without
    context parallelism the model returns the loss alone (``return_logits=False``: no float32 logits, and
    the head and loss compiled where the blocks are)."""
    if context is not None:
        return _context_parallel_loss(model, batch, config, context)
    if not config.pack_documents:  # each row one sequence
        rows = [_rows(t, config.seq_len) for t in (batch.input_ids, batch.targets, batch.loss_weights)]
        _, loss = model(rows[0], targets=rows[1], loss_weights=rows[2], return_logits=False)
        return loss, loss
    # The offsets from the host copy: checking them there does not wait for the GPU.
    _, loss = model(
        batch.input_ids,
        targets=batch.targets,
        cu_seqlens=host_batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
        loss_weights=batch.loss_weights,
        return_logits=False,
    )
    return loss, loss


@torch.no_grad()
def validation_loss(
    model, corpus: TokenCorpus, config: TrainConfig, device, rank: int, world: int, context=None
) -> float:
    """Mean loss over ``eval_batches`` fixed validation batches per process, averaged over processes
    (``rank``: the data rank, which a context-parallel group shares).

    The blocks run eagerly here (``torch.compiler.set_stance("force_eager")``): with blocks compiled in
    "reduce-overhead" mode, the no-grad forward of ``train`` failed on an H200 with cudagraph trees'
    "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"
    (tests/gpu/test_model_gpu.py), while training steps alone replay correctly. Eager validation records no
    inference graphs at all; it is a few batches, so its speed matters little."""
    model.eval()
    total = torch.zeros((), device=device)
    with torch.compiler.set_stance("force_eager"):
        total = _validation_sum(model, corpus, config, device, rank, context, total)
    model.train()
    total /= config.eval_batches
    if world > 1:
        dist.all_reduce(total)
        total /= world
    return float(total)


def _validation_sum(model, corpus, config, device, rank, context, total):
    """``total`` plus the loss of each validation batch."""
    for index in range(config.eval_batches):
        drawn = sample_batch(
            corpus,
            config.batch_size,
            config.seq_len,
            batch_rng(config.seed, rank, index, micro_step=VALIDATION_MICRO_STEP),
        )
        host_batch = host_batch_for(drawn, config, device)
        batch = host_batch.to(device)
        with autocast(device, config.precision):
            _, loss = batch_loss(model, batch, host_batch, config, context)
        total += loss.float()
    return total


def _sync_gradients(model, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def train_step(
    model, optimizer, corpus: TokenCorpus, config: TrainConfig, rank: int, step: int, device, context=None
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One optimizer step over ``grad_accum_steps`` micro-steps: (lr, mean loss, gradient norm). The
    loss stays on the device; reading it waits for the step. ``rank`` is the data rank."""
    lr = learning_rate(config, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=device)
    mode = compile_mode(config, device)
    for micro_step in range(config.grad_accum_steps):
        begin_graph_iteration(mode)  # each micro-step is a new iteration of the blocks' CUDA graphs
        host_batch = host_batch_for(train_batch(corpus, config, rank, step, micro_step), config, device)
        batch = host_batch.to(device)
        with _sync_gradients(model, micro_step == config.grad_accum_steps - 1):
            with autocast(device, config.precision):
                objective, loss = batch_loss(model, batch, host_batch, config, context)
            (objective / config.grad_accum_steps).backward()
        step_loss += loss.detach() / config.grad_accum_steps
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor; every process takes the same full value
        grad_norm = grad_norm.full_tensor()
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
        "grad_norm": float(grad_norm),
        "tokens": step * clock.tokens_per_step,
        "elapsed_s": clock.elapsed_s(),
    }


# ----------------------------------------------------------------------------------------------------
# Setting up a run
# ----------------------------------------------------------------------------------------------------


def compile_mode(config: TrainConfig, device: torch.device) -> str | None:
    """The torch.compile mode of the blocks in this run, None when they run eager (and the head with
    them)."""
    if not (config.compile_blocks and device.type == "cuda") or config.context_parallel > 1:
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    return blocks_compile_mode(config.compile_mode, config.activation_checkpointing, world)


def host_batch_for(batch: PackedBatch, config: TrainConfig, device: torch.device) -> PackedBatch:
    """The batch as the model takes it in this run: with static shapes when the blocks replay CUDA graphs
    (``PackedBatch.with_static_shapes``), as packed otherwise."""
    mode = compile_mode(config, device)
    return batch.with_static_shapes(config.seq_len) if mode and uses_cuda_graphs(mode) else batch


def build_model(config: TrainConfig, device: torch.device, mesh=None):
    """(model, its distributed wrapper or itself, optimizer); the same initial weights on every process.
    ``mesh``: the context-parallel ``(dp, cp)`` DeviceMesh FSDP2 shards on, if any."""
    torch.manual_seed(config.seed)
    model = HybridLM(config.model).to(device)
    model.activation_checkpointing = config.activation_checkpointing
    mode = compile_mode(config, device)
    if mode is not None:
        model.compile_blocks(mode=mode)
        model.compile_head(mode=head_compile_mode(mode))
    wrapped = wrap_distributed(model, config, device, mesh)
    return model, wrapped, make_optimizer(wrapped, config)


def load_data(config: TrainConfig) -> tuple[TokenCorpus, TokenCorpus]:
    """The (train, validation) corpora, checked against the model's vocabulary and the row length."""
    return load_corpus(
        config.data.corpus,
        val_fraction=config.data.val_fraction,
        bos_id=config.data.bos_id,
        max_bytes=config.data.max_bytes,
        vocab_size=config.model.vocab_size,
        seq_len=config.seq_len,
    )


class FiniteGuard:
    """Remembers, on the device, the first step whose loss or gradient norm was not finite, so that the
    loop need not wait for every step; ``check`` (before each log row and each checkpoint) reads it and
    stops the run, so that no checkpoint is written after a non-finite step."""

    def __init__(self, device: torch.device):
        self.bad_step = torch.zeros((), dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), device=device)
        self.bad_norm = torch.zeros((), device=device)

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        loss, grad_norm = loss.detach().float(), grad_norm.detach().float()
        first = ~(torch.isfinite(loss) & torch.isfinite(grad_norm)) & (self.bad_step == 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.bad_norm = torch.where(first, grad_norm, self.bad_norm)

    def check(self, step: int, world: int, last_saved: int | None) -> None:
        bad_step = self.bad_step.clone()
        if world > 1:  # every process stops together, none waits in a collective for one that stopped
            dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
        bad = int(bad_step)
        if bad == 0:
            return
        local = int(self.bad_step) == bad
        what = (
            f"loss {float(self.bad_loss)}, gradient norm {float(self.bad_norm)}"
            if local
            else "on another process"
        )
        saved = f"the newest checkpoint is of step {last_saved}" if last_saved else "none was written"
        raise FloatingPointError(
            f"step {bad}: the loss or gradient norm is not finite ({what}); training stopped at step {step} "
            f"without writing a checkpoint of step {bad} or later ({saved})"
        )


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
    cp = config.context_parallel
    layout = f" (dp {world // cp} x context parallel {cp})" if cp > 1 else ""
    return (
        f"flashmoba train: {model.num_parameters() / 1e6:.2f}M parameters, preset {config.preset}, "
        f"global attention {config.model.global_attention}, {world} process(es){layout} on {device}, "
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
    """Run the training described by ``config``; returns the metrics rows it logged. Every setting, the
    data and the checkpoint to resume from are checked before anything is written to ``config.out``."""
    validate_config(config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device, local_rank)
    started_process_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started_process_group = True
    try:
        return _train(config, device, parallel_layout(config, device, rank, world))
    finally:
        if started_process_group:
            dist.destroy_process_group()


def prepare_run(config: TrainConfig, device, rank: int, world: int, mesh=None) -> tuple[RunPlan, ...]:
    """Plan the run directory, load the data, build the model, then (rank 0) write the directory and load
    the checkpoint: (plan, model, wrapper, optimizer, train corpus, validation corpus)."""
    out = Path(config.out)
    plan = plan_run(config, out)
    train_corpus, val_corpus = load_data(config)
    model, wrapped, optimizer = build_model(config, device, mesh)
    if dist.is_initialized():
        dist.barrier()  # every process has read the checkpoints before rank 0 renames or deletes any
    if rank == 0:
        for note in apply_plan(plan, out, config):
            print(f"flashmoba train: {note}", flush=True)
    if plan.checkpoint is not None:
        apply_checkpoint(plan.checkpoint, wrapped, optimizer)
        plan.checkpoint = None  # the state now lives in the model and optimizer
    return plan, model, wrapped, optimizer, train_corpus, val_corpus


def _train(config: TrainConfig, device: torch.device, layout: ParallelLayout) -> list[dict]:
    out = Path(config.out)
    rank, world = layout.rank, layout.world
    is_main = rank == 0
    plan, model, wrapped, optimizer, train_corpus, val_corpus = prepare_run(
        config, device, rank, world, layout.mesh
    )
    start_step = plan.start_step
    metrics_path = out / "metrics.jsonl"
    if is_main:
        message = _start_message(model, config, world, device, train_corpus, plan.checkpoint_path, start_step)
        print(message, flush=True)

    progress = _progress_bar(config, start_step) if is_main and config.progress else None
    logged: list[dict] = []
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum_steps * layout.data_world
    clock = ThroughputClock(start_step, tokens_per_step)
    guard = FiniteGuard(device)
    last_saved = start_step if plan.checkpoint_path else None
    wrapped.train()
    context = () if layout.context is None else (layout.context,)  # train_step's optional last argument
    for step in range(start_step + 1, config.max_steps + 1):
        lr, step_loss, grad_norm = train_step(
            wrapped, optimizer, train_corpus, config, layout.data_rank, step, device, *context
        )
        guard.observe(step, step_loss, grad_norm)
        evaluate = is_eval_step(config, step)
        if is_log_step(config, step) or evaluate:
            guard.check(step, world, last_saved)
            row = metrics_row(step, lr, step_loss, grad_norm, clock, world, device)
            if evaluate:
                row["val_loss"] = validation_loss(
                    wrapped, val_corpus, config, device, layout.data_rank, world, layout.context
                )
                clock.restart()
            if is_main:
                append_metrics(metrics_path, row, progress)
                logged.append(row)
        if progress is not None:
            progress.update(1)
        if is_save_step(config, step):
            guard.check(step, world, last_saved)
            with clock.paused():
                path = out / "checkpoints" / f"step_{step:07d}.pt"
                save_checkpoint(path, wrapped, optimizer, step, config, rank, history=plan.history)
            last_saved = step
    if progress is not None:
        progress.close()
    if is_main and logged:
        print(_end_message(logged[-1], out), flush=True)
    return logged
