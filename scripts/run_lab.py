"""Run the course lab (docs/lab/README.md) as a student would, and commit what it made.

    python scripts/run_lab.py                    # every part, --preset lab
    python scripts/run_lab.py --parts 1,2

The commands come from the handout itself. Outputs go to docs/lab/expected/ (the
instructor notes cite them); the measured time of each part goes into the handout's and
the notes' tables, with the machine it ran on.
"""

import argparse
import os
import shutil
import sys

from dtmem.errors import UserError
from dtmem.files import provenance, write_json
from dtmem.lab import HANDOUT, LAB_DIR, handout_commands, run_lab
from dtmem.report import embed_in_readme


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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=part_numbers,
                        help="comma-separated part numbers (default all)")
    parser.add_argument("--out", default=str(LAB_DIR / "expected"))
    args = parser.parse_args(argv)
    try:
        seconds = run_lab(args.out, "lab", args.parts)
    except UserError as e:
        print(f"run_lab.py: error: {e}", file=sys.stderr)
        return 2
    shutil.rmtree(f"{args.out}/minari", ignore_errors=True)  # the dataset is rebuilt, not shipped
    info = provenance(preset="lab")
    write_json(f"{args.out}/times.json", {"seconds": seconds, "provenance": info})
    machine = info["machine"]
    table = "| part | minutes |\n|---|---|\n" + "".join(
        f"| {part} | {s / 60:.1f} |\n" for part, s in sorted(seconds.items()))
    table += (f"\nOn {len(os.sched_getaffinity(0))} of the {machine['cores']} CPU cores of "
              f"{machine['platform']}, torch {machine['torch']}, commit {info['commit']}.\n")
    for doc in (HANDOUT, LAB_DIR / "instructor.md"):
        embed_in_readme(doc, "lab-times", table, "python scripts/run_lab.py",
                        "docs/lab/expected/times.json")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
