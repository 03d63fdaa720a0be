"""Run the course lab (docs/lab/README.md) as a student would, and commit what it made.

    python scripts/run_lab.py                    # every part, --preset lab
    python scripts/run_lab.py --parts 1,2

The commands come from the handout itself. Outputs go to docs/lab/expected/ (the
instructor notes cite them); the measured time of each part goes into the handout's and
the notes' tables, with the machine it ran on.
"""

import argparse
import shutil
import sys

from dtmem.command import run_reporting_errors, script_parser
from dtmem.lab import LAB_DIR, handout_commands, record_times, run_lab


def part_numbers(text):
    known = handout_commands()
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if not parts or not set(parts) <= set(known):
        raise argparse.ArgumentTypeError(f"{text!r}: give part numbers among "
                                         f"{', '.join(map(str, sorted(known)))}")
    return parts


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("--parts", type=part_numbers,
                        help="comma-separated part numbers (default all)")
    parser.add_argument("--out", default=str(LAB_DIR / "expected"))
    args = parser.parse_args(argv)

    def work():
        seconds = run_lab(args.out, "lab", args.parts)
        shutil.rmtree(f"{args.out}/minari", ignore_errors=True)  # rebuilt, not shipped
        print(record_times(args.out, seconds))

    return run_reporting_errors(work)


if __name__ == "__main__":
    sys.exit(main())
