"""Old path of the ``flashmoba snr`` command, kept for one release: the command is now ``flashmoba.cli.snr``
(the model, simulator and measurement it runs are ``flashmoba.snr``)."""

import sys

from flashmoba.cli.snr import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
