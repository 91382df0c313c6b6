"""``flashmoba export-hf``: a ``flashmoba train`` checkpoint as a transformers model directory.

    flashmoba export-hf runs/tiny exported/tiny                # the run's latest checkpoint
    flashmoba export-hf runs/tiny/checkpoints/step_0000300.pt exported/tiny-300 --overwrite

Writes ``config.json``, ``generation_config.json`` and ``model.safetensors`` into OUT_DIR; load it back
with ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` after ``import
flashmoba.integrations.hybrid_hf`` (which registers the model type). The checkpoint is verified first
(checksum, format, finite weights). A non-empty OUT_DIR is refused unless ``--overwrite``, which replaces
only the files the export writes; OUT_DIR may never be inside the run directory. Needs transformers
(``pip install "flashmoba[hf]"``).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmoba export-hf", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("run_dir", metavar="RUN_DIR", help="a run directory (its latest checkpoint) or a checkpoint file")
    add("out_dir", metavar="OUT_DIR", help="the directory to write the transformers model into")
    add(
        "--overwrite",
        action="store_true",
        help="write into a non-empty OUT_DIR, replacing the export's files",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from flashmoba.integrations.hybrid_hf import export_checkpoint
    except ImportError as error:
        raise ValueError(
            f'flashmoba export-hf needs transformers (pip install "flashmoba[hf]"): {error}'
        ) from error
    checkpoint = export_checkpoint(args.run_dir, args.out_dir, overwrite=args.overwrite)
    print(f"flashmoba export-hf: {checkpoint} -> {args.out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
