"""``python -m bench``: run the benchmarks as a suite (see bench/_suite.py and bench/README.md)."""

from __future__ import annotations

import sys

from bench._suite import main

if __name__ == "__main__":
    sys.exit(main())
