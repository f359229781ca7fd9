"""`python -m capsspec.conformance --backend NAME`: the suite's command line (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
