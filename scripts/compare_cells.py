"""The paired difference of two results files on the same env seeds: two policies on one
DT, or one policy on two DTs (say, two training recipes).

    python scripts/compare_cells.py results/training-speed/bf16.json results/training-speed/fp32.json

Prints the first cell as `dtmem rollout` does, then its gain over the second with a 95%
bootstrap CI paired by env seed (dtmem/results.py, `explain`).
"""

import sys

from dtmem.command import run_reporting_errors, script_parser
from dtmem.errors import UserError
from dtmem.results import checked_cell, explain


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("cell", help="results file")
    parser.add_argument("base", help="results file of the same seeds, the gain's base")
    args = parser.parse_args(argv)

    def work():
        cells = [checked_cell(path) for path in (args.cell, args.base)]
        if cells[0]["task"] != cells[1]["task"]:
            raise UserError(f"the cells are of two tasks ({cells[0]['task']}, "
                            f"{cells[1]['task']}); a paired gain compares one task's cells")
        seeds = [[e["seed"] for e in cell["episodes"]] for cell in cells]
        if seeds[0] != seeds[1]:
            raise UserError("the two cells ran different env seeds; a paired difference "
                            "needs the same ones (--seed and --episodes of dtmem rollout)")
        for path, cell in zip((args.cell, args.base), cells):
            print(f"{path}: {cell['checkpoint']} (sha256 {cell['checkpoint_sha256'][:12]})")
        print(explain(*cells))

    return run_reporting_errors(work)


if __name__ == "__main__":
    sys.exit(main())
