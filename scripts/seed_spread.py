"""Beyond env seeds: do the gains hold for DTs of other training seeds and NAMMs of other
evolution seeds? Each run is a folder of cells of one env seed block, made by
`scripts/run_experiment.py` (`--dt-dir` for other DTs, `--namm-dir` for other NAMMs):

    python scripts/seed_spread.py dt0=results/confirm dt1=results/seeds/dt-seed-1/confirm \\
        dt2=results/seeds/dt-seed-2/confirm --out results/seeds/spread.md

Prints, per task, each run's recompute score and how many of its episodes ended early (a
fall); then, per cell present in every run, each run's gain over recompute with its paired
CI and whether the claim holds across runs. --out also writes both tables.
"""

import argparse
import sys

from dtmem.command import run_reporting_errors, script_parser
from dtmem.errors import UserError
from dtmem.files import atomic_path, ensure_writable
from dtmem.limits import flag_type
from dtmem.report import seed_spread, spread_markdown


def run_folder(text):
    name, sep, folder = text.partition("=")
    if not (sep and name and folder):
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=FOLDER, e.g. "
                                         "dt1=results/seeds/dt-seed-1/confirm")
    return name, folder


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("runs", nargs="+", type=run_folder,
                        help="NAME=FOLDER of cells, 2 or more")
    parser.add_argument("--episodes", type=flag_type("episodes"), default=50,
                        help="episodes per cell (default 50)")
    parser.add_argument("--out", help="write the table here (markdown)")
    args = parser.parse_args(argv)

    def work():
        runs = dict(args.runs)
        if len(runs) < 2 or len(runs) < len(args.runs):
            raise UserError("give two runs or more (NAME=FOLDER), with distinct names")
        if args.out:
            ensure_writable(args.out)
        table = spread_markdown(seed_spread(runs, args.episodes), runs)
        print(table)
        if args.out:
            with atomic_path(args.out) as tmp:
                tmp.write_text(table)
            print(f"wrote {args.out}")

    return run_reporting_errors(work)


if __name__ == "__main__":
    sys.exit(main())
