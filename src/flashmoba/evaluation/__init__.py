"""Evaluation of trained checkpoints: ``retrieval`` (perplexity, S-NIAH accuracy, router recall) and
``tables`` (markdown tables and plots). The ``flashmoba eval`` command is ``flashmoba.cli.eval``."""

from flashmoba.evaluation.retrieval import RouterProbe, default_lengths, evaluate_retrieval, perplexity
from flashmoba.evaluation.tables import TASK_TITLES, markdown_tables, plot_retrieval

__all__ = [
    "TASK_TITLES",
    "RouterProbe",
    "default_lengths",
    "evaluate_retrieval",
    "markdown_tables",
    "perplexity",
    "plot_retrieval",
]
