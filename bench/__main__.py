"""Entry point: `python -m bench [OPTIONS]` runs the benchmark (see bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
