"""The eval command's reports: markdown tables and a plot of retrieval accuracy and router recall by
context length (``niah.md`` and ``niah.png``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["TASK_TITLES", "markdown_tables", "plot_retrieval"]

TASK_TITLES = {"niah1": "S-NIAH-1", "niah2": "S-NIAH-2", "niah3": "S-NIAH-3", "passkey": "passkey"}


def _accuracy(result: dict, key: str = "accuracy") -> float:
    return math.nan if result[key] is None else 100 * result[key]


def _mean_recall(results: list[dict], layer: int) -> float:
    values = [r["router_recall"][str(layer)] for r in results if str(layer) in r["router_recall"]]
    return 100 * float(np.mean(values)) if values else math.nan


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0f}"


def _recall_layers(results: list[dict]) -> list[int]:
    return sorted({int(layer) for r in results for layer in r["router_recall"]})


def markdown_tables(results: list[dict], tasks: list[str], lengths: list[int]) -> str:
    """Accuracy and answer-token accuracy per task and length, then router recall per MoBA layer."""
    by_key = {(r["task"], r["length"]): r for r in results}
    lines = []
    for key, title in [("accuracy", "Retrieval accuracy (%)"), ("token_accuracy", "Answer tokens right (%)")]:
        lines += [
            f"## {title}",
            "",
            "| task | " + " | ".join(str(n) for n in lengths) + " | avg |",
            "|---" * (len(lengths) + 2) + "|",
        ]
        for task in tasks:
            accuracies = [_accuracy(by_key[(task, n)], key) for n in lengths]
            measured = [a for a in accuracies if not math.isnan(a)]
            average = f"{np.mean(measured):.1f}" if measured else "-"
            lines.append(
                f"| {TASK_TITLES[task]} | " + " | ".join(_cell(a) for a in accuracies) + f" | {average} |"
            )
        lines.append("")
    layers = _recall_layers(results)
    if layers:
        lines += [
            "## Router recall of the needle's block (%), per MoBA layer, mean over tasks",
            "",
            "| layer | " + " | ".join(str(n) for n in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for layer in layers:
            cells = [_mean_recall([by_key[(t, n)] for t in tasks], layer) for n in lengths]
            lines.append(f"| {layer} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _length_axis(axis, lengths: list[int], ylabel: str, title: str) -> None:
    axis.set(xscale="log", xlabel="context length (tokens)", ylabel=ylabel, ylim=(-3, 103), title=title)
    axis.set_xticks(lengths, [str(n) for n in lengths])
    axis.minorticks_off()


def plot_retrieval(results: list[dict], tasks: list[str], lengths: list[int], path: Path, title: str) -> None:
    """Accuracy by length per task and, with MoBA layers, router recall by length per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r["task"], r["length"]): r for r in results}
    layers = _recall_layers(results)
    figure, axes = plt.subplots(1, 2 if layers else 1, figsize=(11 if layers else 6, 4), squeeze=False)
    accuracy_axis = axes[0][0]
    for task in tasks:
        accuracy_axis.plot(
            lengths, [_accuracy(by_key[(task, n)]) for n in lengths], marker="o", label=TASK_TITLES[task]
        )
    _length_axis(accuracy_axis, lengths, "accuracy (%)", "retrieval accuracy")
    accuracy_axis.legend()
    if layers:
        recall_axis = axes[0][1]
        for layer in layers:
            recall_axis.plot(
                lengths,
                [_mean_recall([by_key[(t, n)] for t in tasks], layer) for n in lengths],
                marker="o",
                label=f"layer {layer}",
            )
        _length_axis(recall_axis, lengths, "recall (%)", "router recall of the needle block")
        recall_axis.legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
