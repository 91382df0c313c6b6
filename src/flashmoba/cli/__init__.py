"""The ``flashmoba`` command: one subcommand per job, each implemented by a module's ``main(argv)``.

Subcommands import their module lazily so that ``flashmoba --help`` stays fast and a missing optional
dependency of one job never breaks another. This package is the top layer: nothing in flashmoba imports
it except ``flashmoba/__main__.py``.
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("flashmoba.cli.demo", "compute MoBA on generated inputs and check it against dense attention"),
    "bench": ("flashmoba.cli.bench", "benchmark flashmoba against dense attention"),
    "train": ("flashmoba.cli.train", "train the hybrid MoBA language model"),
    "eval": ("flashmoba.cli.eval", "evaluate a checkpoint: perplexity, S-NIAH retrieval, router recall"),
    "generate": ("flashmoba.cli.generate", "generate text from a checkpoint with a KV cache"),
    "export-hf": ("flashmoba.cli.export_hf", "export a checkpoint as a transformers model (safetensors)"),
    "snr": ("flashmoba.cli.snr", "the router's signal-to-noise model against Monte-Carlo simulation"),
}

# What a command raises for a mistake in what it was given (a setting, a file, a checkpoint) or a run it
# stopped on purpose (a non-finite step): a one-line message and exit status 1, not a traceback. The
# commands' own main(argv) still raise them, for callers and tests; argparse's usage errors exit 2.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)

__all__ = ["SUBCOMMANDS", "USER_ERRORS", "main"]


def _usage() -> str:
    lines = ["usage: flashmoba <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'flashmoba <command> --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"flashmoba: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except USER_ERRORS as error:
        if os.environ.get("FLASHMOBA_TRACEBACK"):
            raise
        print(
            f"flashmoba {command}: error: {type(error).__name__}: {error}\n"
            "(set FLASHMOBA_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
