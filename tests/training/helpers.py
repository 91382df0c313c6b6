"""Helpers shared by the training tests: the arguments of a tiny CPU run and its metrics."""

from __future__ import annotations

import json
from pathlib import Path


def tiny_run_args(out: Path, corpus: str, *extra: str) -> list[str]:
    """``flashmoba train`` arguments of a tiny run on the CPU: rows of 128 tokens, 2 per step."""
    return [
        *("--preset", "tiny", "--corpus", corpus, "--seq-len", "128", "--batch-size", "2"),
        *("--device", "cpu", "--out", str(out), "--no-progress"),
        *extra,
    ]


def read_metrics(run: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
