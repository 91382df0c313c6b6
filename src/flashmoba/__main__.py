"""``python -m flashmoba <command>``: the ``flashmoba`` command (``flashmoba.cli``)."""

import sys

from flashmoba.cli import main

sys.exit(main())
