"""``flashmoba train``: train the hybrid MoBA language model, on one CPU or many GPUs through torchrun.

    flashmoba train --preset tiny --max-steps 30 --device cpu --out runs/tiny
    torchrun --nproc-per-node 8 -m flashmoba.train --preset 340m --attn moba --block-size 128 --topk 8 \\
        --kconv 3 --distributed fsdp --activation-checkpointing --out runs/340m-moba128-kconv3

Settings come from, in increasing priority: the defaults, the preset (model shape, sequence length,
batch), a JSON config file (``--config``, with the fields of ``TrainConfig``; ``model`` and ``data`` are
nested objects), then flags. Every field has a flag: ``--seq-len`` for ``seq_len``, ``--model.moba-topk``
for ``model.moba_topk``, ``--data.task-fraction`` for ``data.task_fraction``; a few have short aliases
(``--attn``, ``--block-size``, ``--topk``, ``--kconv``, ``--backend``, ``--corpus``, ``--task-fraction``).
Bools take ``--name`` / ``--no-name``.

Outputs in ``--out``: ``config.json``, ``metrics.jsonl`` and ``checkpoints/step_XXXXXXX.pt`` (each with a
``.sha256`` checksum); see ``flashmoba.training.loop``. Which run ``--out`` may hold, ``--overwrite``,
``--resume`` and ``--allow-config-change``: the help's "the run directory" (``RUN_DIRECTORY_HELP``).
Every setting is checked before anything is written; a refused setting, directory or checkpoint, or a
step that is not finite, ends the command with an error naming it and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields, is_dataclass

from flashmoba.training.config import TrainConfig, field_types, optional_inner, resolve_config
from flashmoba.training.loop import train
from flashmoba.training.run_directory import RUN_DIRECTORY_HELP

# Short flags kept beside the generated ones: dotted field name -> extra option strings.
ALIASES: dict[str, tuple[str, ...]] = {
    "model.global_attention": ("--attn",),
    "model.moba_block_size": ("--block-size",),
    "model.moba_topk": ("--topk",),
    "model.kconv_size": ("--kconv",),
    "model.backend": ("--backend",),
    "data.corpus": ("--corpus",),
    "data.task_fraction": ("--task-fraction",),
}

GROUP_TITLES = {"": "training", "model": "model (ModelConfig)", "data": "data (DataConfig)"}


def _comma_separated(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _flag(dotted: str) -> str:
    return "--" + dotted.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, config_class, prefix: str = "") -> None:
    """One flag per field of ``config_class`` (recursing into nested dataclasses), with the type, help
    text and choices of the field's annotation and metadata. Parsed values land under the dotted field
    name (``model.moba_topk``) and only when the flag is given."""
    group = parser.add_argument_group(GROUP_TITLES.get(prefix.rstrip("."), prefix.rstrip(".")))
    annotations = field_types(config_class)
    for item in fields(config_class):
        dotted = prefix + item.name
        annotation = annotations[item.name]
        nested_default = item.default_factory if item.default_factory is not MISSING else None
        if nested_default is not None and is_dataclass(annotation):
            add_config_flags(parser, annotation, dotted + ".")
            continue
        annotation = optional_inner(annotation) or annotation
        help_text = item.metadata.get("help", "").replace("%", "%%")
        options = dict(dest=dotted, default=argparse.SUPPRESS, help=help_text)
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = _comma_separated if annotation == list[str] else annotation
            options["metavar"] = item.name.upper()
            if "choices" in item.metadata:
                options["choices"] = item.metadata["choices"]
                del options["metavar"]
        group.add_argument(*ALIASES.get(dotted, ()), _flag(dotted), **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashmoba train",
        description=__doc__.split("\n\n")[0],
        epilog=RUN_DIRECTORY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", help="JSON file with TrainConfig fields (nested 'model' and 'data' objects)"
    )
    add_config_flags(parser, TrainConfig)
    return parser


def flag_values(args: argparse.Namespace) -> dict:
    """The given flags as a nested dict of TrainConfig fields."""
    nested: dict = {}
    for dotted, value in vars(args).items():
        if dotted == "config":
            continue
        *parents, name = dotted.split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = value
    return nested


def read_config_file(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        values = json.load(handle)
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a JSON object")
    return values


def parse_config(argv: list[str] | None) -> TrainConfig:
    """defaults < preset < ``--config`` file < flags, validated."""
    args = build_parser().parse_args(argv)
    file_values = read_config_file(args.config) if args.config else {}
    return resolve_config(file_values, flag_values(args))


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
