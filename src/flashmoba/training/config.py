"""The settings of a training run: ``TrainConfig`` (with nested ``ModelConfig`` and ``DataConfig``), the
presets, their precedence, and the typed read of config files and of a run's stored config.

Settings come from, in increasing priority: the field defaults (the paper's optimiser: AdamW 0.9/0.95,
weight decay 0.1, cosine schedule with warmup, peak LR 6e-4, gradient clipping 1.0, bf16 autocast on
GPU), the preset (model shape, sequence length, batch), a JSON config file (the fields of
``TrainConfig``; ``model`` and ``data`` are nested objects), then command-line flags.

Each field's metadata holds its ``help`` text and, where the train command offers a fixed set, its
``choices``; ``flashmoba train`` generates its flags from them. Values read from a file or a stored
config are checked against the field's type, and an error names the field (``model.moba_topk must be
an int, got str '8'``); ``validate_config`` then checks the ranges.
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass

from flashmoba._checks import check_bool, check_choice, check_int, check_positive_int, check_real
from flashmoba.data import TASKS, ByteTokenizer
from flashmoba.models.hybrid import MODEL_PRESETS, ModelConfig, is_global_layer, model_config_from_preset
from flashmoba.parallel.communication import SCHEMES as CONTEXT_PARALLEL_SCHEMES
from flashmoba.training.runtime import COMPILE_MODES, PRECISIONS, check_device_name

DISTRIBUTED_STRATEGIES = ("ddp", "fsdp")
POSITIVE_INT_FIELDS = (
    "seq_len",
    "batch_size",
    "grad_accum_steps",
    "max_steps",
    "log_every",
    "save_every",
    "keep_checkpoints",
    "eval_batches",
)


@dataclass
class DataConfig:
    corpus: str = field(
        default="python",
        metadata={"help": "'python' (offline default), a text/jsonl/token-shard path or glob, or hf:NAME"},
    )
    val_fraction: float = field(default=0.05, metadata={"help": "share of the corpus held out"})
    bos_id: int | None = field(
        default=None,
        metadata={"help": "document-start token of token shards (default: the byte tokenizer's)"},
    )
    task_fraction: float = field(
        default=0.0,
        metadata={"help": "share of rows that are S-NIAH/passkey samples (byte tokenizer only)"},
    )
    answer_loss_weight: float = field(
        default=1.0,
        metadata={"help": "loss weight of retrieval answers' tokens (1: plain next-token loss)"},
    )
    tasks: list[str] = field(
        default_factory=lambda: list(TASKS),
        metadata={"help": f"retrieval tasks of the task rows, comma-separated, among {','.join(TASKS)}"},
    )
    max_bytes: int = field(
        default=200_000_000, metadata={"help": "text read from text files or a streamed dataset"}
    )


@dataclass
class TrainConfig:
    preset: str = field(
        default="tiny",
        metadata={
            "help": "model size and its training defaults (default tiny)",
            "choices": tuple(sorted(MODEL_PRESETS)),
        },
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seq_len: int = field(default=8192, metadata={"help": "tokens per row (the paper trains at 8K)"})
    batch_size: int = field(default=8, metadata={"help": "rows per process per micro-step"})
    grad_accum_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    max_steps: int = field(
        default=1000, metadata={"help": "optimizer steps (the cosine schedule spans them)"}
    )
    lr: float = field(default=6e-4, metadata={"help": "peak learning rate (default 6e-4)"})
    min_lr_ratio: float = field(
        default=0.1, metadata={"help": "the cosine ends at lr * min_lr_ratio (the paper does not say)"}
    )
    warmup_steps: int = field(
        default=-1,
        metadata={"help": "linear warmup steps (default -1: 1% of max steps, at least 1, at most 2000)"},
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of matrices"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clipping"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights and of every batch"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present), cpu or cuda"})
    precision: str = field(
        default="auto",
        metadata={"help": "auto: bf16 autocast on CUDA, fp32 on CPU", "choices": PRECISIONS},
    )
    distributed: str = field(
        default="ddp",
        metadata={"help": "under torchrun: DDP or FSDP2 (fully_shard)", "choices": DISTRIBUTED_STRATEGIES},
    )
    context_parallel: int = field(
        default=1,
        metadata={
            "help": "under torchrun: cut each row contiguously over groups of N processes (a dp x cp "
            "device mesh; MoBA layers through moba_attn_context_parallel, sliding-window layers exchange "
            "their window's halo); needs --no-pack-documents, MoBA global layers and no key convolution"
        },
    )
    context_parallel_scheme: str = field(
        default="selective",
        metadata={
            "help": "how MoBA layers fetch keys and values across the context-parallel group",
            "choices": CONTEXT_PARALLEL_SCHEMES,
        },
    )
    pack_documents: bool = field(
        default=True,
        metadata={
            "help": "attention and the key convolution never cross a document start inside a row (off: "
            "each row is one sequence, as --context-parallel needs)"
        },
    )
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each layer in backward"}
    )
    compile_blocks: bool = field(
        default=True,
        metadata={
            "help": "torch.compile each block, and the head and loss, on CUDA (on CPU they always run eager)"
        },
    )
    compile_mode: str = field(
        default="reduce-overhead",
        metadata={
            "help": "torch.compile mode of the blocks; reduce-overhead replays CUDA graphs (one process, "
            "no activation checkpointing; otherwise default), with the packing offsets padded to static "
            "shapes. The head and loss take the same mode without CUDA graphs",
            "choices": COMPILE_MODES,
        },
    )
    log_every: int = field(default=1, metadata={"help": "a metrics row every N steps"})
    eval_every: int = field(default=0, metadata={"help": "validation loss every N steps (0: at the end)"})
    eval_batches: int = field(default=4, metadata={"help": "validation batches per process"})
    save_every: int = field(default=1000, metadata={"help": "checkpoint every N steps (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    out: str = field(
        default="runs/latest", metadata={"help": "the run directory (see 'the run directory' below)"}
    )
    resume: str | None = field(
        default=None,
        metadata={"help": "'auto' (the newest intact checkpoint in --out, if any) or a checkpoint file"},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "replace the run --out holds: its config.json, metrics.jsonl and checkpoints (with "
            "--resume, those after the resumed step) are deleted before training"
        },
    )
    allow_config_change: bool = field(
        default=False,
        metadata={
            "help": "resume with settings that differ from the checkpoint's; the changes are recorded in "
            "config.json's history"
        },
    )
    progress: bool = field(default=True, metadata={"help": "progress bar"})

    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps >= 0:
            return self.warmup_steps
        return min(2000, max(1, self.max_steps // 100))


# Training defaults that go with each model preset (model shapes are in models.hybrid.MODEL_PRESETS).
TRAIN_PRESETS: dict[str, dict] = {
    "tiny": dict(seq_len=512, batch_size=8, max_steps=200, save_every=100, eval_batches=2),
    "small": dict(seq_len=4096, batch_size=16, max_steps=5000),
    "medium": dict(seq_len=8192, batch_size=8, max_steps=10000),
    "340m": dict(seq_len=8192, batch_size=8, max_steps=200_000),
    "1b": dict(seq_len=8192, batch_size=4, max_steps=200_000),
}


# ----------------------------------------------------------------------------------------------------
# Typed values
# ----------------------------------------------------------------------------------------------------


def field_types(config_class) -> dict[str, object]:
    """Field name -> its resolved type annotation (the modules use postponed annotations)."""
    return typing.get_type_hints(config_class)


def optional_inner(annotation):
    """``X`` for ``X | None``, else None."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return None


def typed_value(name: str, annotation, value):
    """``value`` checked against a field's annotation (bool, int, float, str, list[str], X | None), as
    that type; ``name`` is the dotted field name errors report."""
    inner = optional_inner(annotation)
    if inner is not None:
        return None if value is None else typed_value(name, inner, value)
    if annotation is bool:
        return check_bool(name, value)
    if annotation is int:
        return check_int(name, value)
    if annotation is float:
        return check_real(name, value)
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
        return value
    if typing.get_origin(annotation) is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(annotation)
        return [typed_value(f"{name}[{index}]", item, v) for index, v in enumerate(value)]
    raise TypeError(f"{name}: unsupported setting type {annotation!r}")


def update_config(target, values: dict, where: str = "") -> None:
    """Set the fields of the dataclass ``target`` named in ``values`` (nested dataclasses from nested
    dicts), each checked against its type. ``where`` prefixes field names in errors (``"model."``)."""
    known = {f.name: f for f in fields(target)}
    annotations = field_types(type(target))
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown setting {where}{name!r} (known: {sorted(known)})")
        current = getattr(target, name)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"setting {where}{name!r} must be an object, got {value!r}")
            update_config(current, value, f"{where}{name}.")
        else:
            setattr(target, name, typed_value(f"{where}{name}", annotations[name], value))


# ----------------------------------------------------------------------------------------------------
# Precedence and validation
# ----------------------------------------------------------------------------------------------------


def config_from_preset(preset: str) -> TrainConfig:
    if preset not in MODEL_PRESETS:
        raise ValueError(f"preset must be one of {sorted(MODEL_PRESETS)}, got {preset!r}")
    return TrainConfig(preset=preset, model=model_config_from_preset(preset), **TRAIN_PRESETS.get(preset, {}))


def resolve_config(file_values: dict | None = None, flag_values: dict | None = None) -> TrainConfig:
    """defaults < preset < config file < flags. Both arguments are nested dicts of TrainConfig fields; the
    preset is the flags', else the file's, else ``tiny``."""
    file_values, flag_values = dict(file_values or {}), dict(flag_values or {})
    preset = flag_values.pop("preset", None) or file_values.pop("preset", "tiny")
    file_values.pop("preset", None)
    config = config_from_preset(preset)
    update_config(config, file_values)
    update_config(config, flag_values)
    config.model = ModelConfig(**asdict(config.model))  # re-validate after the updates
    validate_config(config)
    return config


def train_config_from_dict(values: dict) -> TrainConfig:
    """A run's stored settings (its ``config.json``, or a checkpoint's ``config``) as a typed TrainConfig."""
    config = TrainConfig()
    update_config(config, values)
    config.model = ModelConfig(**asdict(config.model))
    validate_config(config)
    return config


def _check_path_setting(name: str, value, optional: bool = False) -> None:
    """A non-empty str (an empty ``--out`` would mean the current directory, an empty ``--resume`` no
    resume at all: both are more likely a shell variable that was not set)."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty path, got {value!r}")


def _check_optimizer(config: TrainConfig) -> None:
    check_real("lr", config.lr, exclusive_minimum=0)
    check_real("min_lr_ratio", config.min_lr_ratio, minimum=0, maximum=1)
    check_int("warmup_steps", config.warmup_steps, minimum=-1)
    check_real("weight_decay", config.weight_decay, minimum=0)
    for name in ("beta1", "beta2"):
        if not 0 <= check_real(name, getattr(config, name)) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    check_real("adam_eps", config.adam_eps, exclusive_minimum=0)
    # Clipping to a norm of 0 would zero every gradient; there is no "off" value.
    check_real("grad_clip", config.grad_clip, exclusive_minimum=0)


def _check_data(config: TrainConfig) -> None:
    data = config.data
    _check_path_setting("data.corpus", data.corpus)
    if not 0 < check_real("data.val_fraction", data.val_fraction) < 1:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {data.val_fraction}")
    if data.bos_id is not None:
        check_int("data.bos_id", data.bos_id, minimum=0, maximum=config.model.vocab_size - 1)
    check_real("data.task_fraction", data.task_fraction, minimum=0, maximum=1)
    if data.task_fraction > 0 and config.model.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(
            "data.task_fraction > 0 needs the byte tokenizer's vocabulary (model.vocab_size >= 257)"
        )
    check_real("data.answer_loss_weight", data.answer_loss_weight, exclusive_minimum=0)
    if not isinstance(data.tasks, list):
        raise TypeError(f"data.tasks must be a list, got {type(data.tasks).__name__} {data.tasks!r}")
    unknown_tasks = sorted(set(data.tasks) - set(TASKS))
    if unknown_tasks:
        raise ValueError(f"data.tasks must be among {TASKS}, got {unknown_tasks}")
    check_positive_int("data.max_bytes", data.max_bytes)


BOOL_FIELDS = (
    "activation_checkpointing",
    "compile_blocks",
    "progress",
    "overwrite",
    "allow_config_change",
    "pack_documents",
)


def _check_context_parallel(config: TrainConfig) -> None:
    """A row must cut into equal slices of whole MoBA blocks whose sliding windows reach back at most one
    slice, and every layer must have a context-parallel path."""
    cp = check_positive_int("context_parallel", config.context_parallel)
    check_choice("context_parallel_scheme", config.context_parallel_scheme, CONTEXT_PARALLEL_SCHEMES)
    if cp == 1:
        return
    model = config.model
    if config.pack_documents:
        raise ValueError(
            "context_parallel > 1 needs pack_documents off (--no-pack-documents): a row is one sequence"
        )
    if model.kconv_size != 0 or model.global_attention != "moba":
        raise ValueError(
            "context_parallel > 1 needs model.global_attention 'moba' and model.kconv_size 0, got "
            f"{model.global_attention!r} and {model.kconv_size}"
        )
    if config.seq_len % (cp * model.moba_block_size) != 0:
        raise ValueError(
            f"seq_len must be a multiple of context_parallel * model.moba_block_size ({cp} * "
            f"{model.moba_block_size}), got {config.seq_len}"
        )
    has_sliding = any(not is_global_layer(i) for i in range(model.num_layers))
    if has_sliding and model.window_size - 1 > config.seq_len // cp:
        raise ValueError(
            f"model.window_size - 1 ({model.window_size - 1}) must be at most seq_len / context_parallel "
            f"({config.seq_len // cp}): the halo comes from the previous slice only"
        )


def validate_config(config: TrainConfig) -> None:
    """Every setting's type and range, each error naming its field; runs before anything is written."""
    check_choice("preset", config.preset, tuple(sorted(MODEL_PRESETS)))
    for name in POSITIVE_INT_FIELDS:
        check_positive_int(name, getattr(config, name))
    check_int("eval_every", config.eval_every, minimum=0)
    check_int("seed", config.seed, minimum=0)
    _check_optimizer(config)
    check_device_name("device", config.device)
    check_choice("precision", config.precision, PRECISIONS)
    check_choice("compile_mode", config.compile_mode, COMPILE_MODES)
    check_choice("distributed", config.distributed, DISTRIBUTED_STRATEGIES)
    for name in BOOL_FIELDS:
        check_bool(name, getattr(config, name))
    _check_context_parallel(config)
    _check_path_setting("out", config.out)
    _check_path_setting("resume", config.resume, optional=True)
    _check_data(config)
