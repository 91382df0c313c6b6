import sys

from flashmoba.cli import main

sys.exit(main())
