"""Summarise a sweep of short evolution runs (one JSON per setting, see
results/n-up-sweep/README.md) into summary.md in the same folder.

    python scripts/summarise_sweep.py results/n-up-sweep
"""

import sys

from dtmem.command import run_reporting_errors
from dtmem.evolve import sweep_summary

if __name__ == "__main__":
    folder = sys.argv[1] if len(sys.argv) > 1 else "results/n-up-sweep"
    sys.exit(run_reporting_errors(lambda: print(sweep_summary(folder))))
