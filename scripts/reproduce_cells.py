"""Run results files again from what they record and compare every episode, field by field.

    python scripts/reproduce_cells.py results/cells/hopper-medium/h2o@60.json [...]

Exit code 0 when every cell reproduces bit for bit, 1 when one does not (the fields that
differ and the largest score gap are printed), 2 on bad input.
"""

import sys

import torch

from dtmem.command import run_reporting_errors, script_parser
from dtmem.errors import UserError
from dtmem.results import read_cell, reproduce


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("cells", nargs="+", help="results files")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the cells were made: thread count changes float rounding
    same = True

    def work():
        nonlocal same
        for path in args.cells:
            cell = read_cell(path)
            if cell is None:
                raise UserError(f"{path} is not a readable results file")
            again = reproduce(cell)["episodes"]
            if again == cell["episodes"]:
                print(f"{path}: identical ({len(again)} episodes)", flush=True)
            else:
                gap = max(abs(a["score"] - b["score"]) for a, b in zip(cell["episodes"], again))
                fields = sorted({k for a, b in zip(cell["episodes"], again) for k in a
                                 if a[k] != b[k]})
                print(f"{path}: differs in {', '.join(fields)}; largest score gap {gap:.3g}",
                      flush=True)
            same &= again == cell["episodes"]

    return run_reporting_errors(work) or (0 if same else 1)


if __name__ == "__main__":
    sys.exit(main())
