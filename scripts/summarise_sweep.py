"""Summarise a sweep of short evolution runs (one JSON per setting, see
results/n-up-sweep/README.md) into summary.md in the same folder.

    python scripts/summarise_sweep.py results/n-up-sweep
"""

import sys

from dtmem.command import run_reporting_errors, script_parser
from dtmem.evolve import sweep_summary

if __name__ == "__main__":
    parser = script_parser(__doc__)
    parser.add_argument("folder", nargs="?", default="results/n-up-sweep",
                        help="the sweep's folder of run files (default results/n-up-sweep)")
    args = parser.parse_args()
    sys.exit(run_reporting_errors(lambda: print(sweep_summary(args.folder))))
