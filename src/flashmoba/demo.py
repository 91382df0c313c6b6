"""Old path of the ``flashmoba demo`` command, kept for one release: it is now ``flashmoba.cli.demo``."""

from flashmoba.cli.demo import main

__all__ = ["main"]
