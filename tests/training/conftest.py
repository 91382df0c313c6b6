"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A directory of a few small text documents, quicker to load than the default corpus."""
    directory = tmp_path_factory.mktemp("corpus")
    for index in range(12):
        (directory / f"doc{index}.txt").write_text(
            "".join(f"def function_{index}_{i}(x):\n    return x * {i} + {index}\n\n" for i in range(60))
        )
    return str(directory)
