"""Deprecated import path, kept for one release. The code now lives in ``flashmoba.evaluation.retrieval``
(perplexity, S-NIAH, router recall), ``flashmoba.evaluation.tables`` (tables, plots),
``flashmoba.models.checkpoint`` (``find_checkpoint``, ``load_model``) and ``flashmoba.cli.eval`` (the
command)."""

import sys

from flashmoba.cli.eval import build_parser, main
from flashmoba.evaluation.retrieval import RouterProbe, default_lengths, evaluate_retrieval, perplexity
from flashmoba.evaluation.tables import TASK_TITLES
from flashmoba.models.checkpoint import find_checkpoint, load_model

__all__ = [
    "TASK_TITLES",
    "RouterProbe",
    "build_parser",
    "default_lengths",
    "evaluate_retrieval",
    "find_checkpoint",
    "load_model",
    "main",
    "perplexity",
]

if __name__ == "__main__":
    sys.exit(main())
