"""Bad and unusual inputs to the public functions, every backend (tests/probes/library.py holds the cases).

Each input class runs in a subprocess of its own: a crash inside a kernel then fails this test, naming the
case it happened in, instead of killing the test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.probes.library import CASES

REPOSITORY = Path(__file__).resolve().parents[1]


def run_class(input_class: str) -> tuple[dict[str, dict], subprocess.CompletedProcess]:
    environment = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    finished = subprocess.run(
        [sys.executable, "-m", "tests.probes.library", input_class],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    events: dict[str, dict] = {}
    for line in finished.stdout.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            events[event["case"]] = event
    return events, finished


@pytest.mark.triton
@pytest.mark.parametrize("input_class", sorted(CASES))
def test_input_class(input_class):
    events, finished = run_class(input_class)
    crashed = [name for name, event in events.items() if event["event"] == "start"]
    assert not crashed, (
        f"the process died in {crashed[0]!r} (exit {finished.returncode}): {finished.stderr[-2000:]}"
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    missing = sorted(set(CASES[input_class]) - set(events))
    assert not missing, f"cases that never ran: {missing}"
    failed = {name: event["error"] for name, event in events.items() if not event["passed"]}
    assert not failed, "\n".join(f"{name}: {error}" for name, error in failed.items())


def test_a_crash_is_reported_with_its_case(monkeypatch):
    """The runner's crash detection itself: a case that kills its process is named, not lost."""
    script = (
        "import json, os\nprint(json.dumps({'case': 'dies', 'event': 'start'}), flush=True)\nos._exit(139)\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    events = {json.loads(line)["case"]: json.loads(line) for line in finished.stdout.splitlines()}
    assert events["dies"]["event"] == "start" and finished.returncode == 139
