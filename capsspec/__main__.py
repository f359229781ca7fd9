"""`python -m capsspec ...`: the same command line as the `capsspec` script (capsspec.tools.cli)."""

import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
