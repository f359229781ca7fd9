"""`python -m capsspec ...`: the same command line as the `capsspec` script (capsspec.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
