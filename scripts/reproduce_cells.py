"""Run results files again from what they record and compare every episode, field by field.

    python scripts/reproduce_cells.py results/cells/hopper-medium/h2o@60.json [...]

Exit code 0 when every cell reproduces bit for bit, 1 when one does not (the fields that
differ and the largest score gap are printed), 2 on bad input. Float kernels differ
between CPUs, so a cell made on another machine may not reproduce here: --out DIR keeps
each re-run as a results file, DIR/<task>/<cell>.json with this run's provenance, to
compare or report.
"""

import sys

import torch

from dtmem.command import run_reporting_errors, script_parser
from dtmem.errors import UserError
from dtmem.files import ensure_new_output, write_json
from dtmem.results import cell_name, cell_path, read_cell, reproduce


def main(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument("cells", nargs="+", help="results files")
    parser.add_argument("--out", help="folder to write the re-run cells to (DIR/<task>/<cell>.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace re-runs in --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the cells were made: thread count changes float rounding
    same = True

    def out_path(cell):
        return cell_path(args.out, cell["task"], cell_name(cell))

    def work():
        nonlocal same
        cells = [(path, read_cell(path)) for path in args.cells]
        for path, cell in cells:  # every input and output checked before any work
            if cell is None:
                raise UserError(f"{path} is not a readable results file")
            if args.out:
                ensure_new_output(out_path(cell), args.overwrite)
        for path, cell in cells:
            rerun = reproduce(cell)
            if args.out:
                write_json(out_path(cell), rerun)
            again = rerun["episodes"]
            if again == cell["episodes"]:
                print(f"{path}: identical ({len(again)} episodes)", flush=True)
            else:
                gap = max(abs(a["score"] - b["score"]) for a, b in zip(cell["episodes"], again))
                fields = sorted({k for a, b in zip(cell["episodes"], again) for k in a
                                 if a[k] != b[k]})
                print(f"{path}: differs in {', '.join(fields)}; largest score gap {gap:.3g}"
                      f"{other_cpu(cell, rerun)}", flush=True)
            same &= again == cell["episodes"]

    return run_reporting_errors(work) or (0 if same else 1)


def other_cpu(cell, rerun):
    """A note when the cell was made on another CPU (or does not say which): float kernels
    differ between CPUs, and chaotic episodes grow their last-digit differences."""
    cpu = [{key: c.get("provenance", {}).get("machine", {}).get(key)
            for key in ("cpu", "cpu_capability")}
           for c in (cell, rerun)]
    if cpu[0] == cpu[1]:
        return ""
    made = ", ".join(str(v) for v in cpu[0].values()) if cpu[0]["cpu"] else "a CPU not recorded"
    return f" (made on {made}, run here on {', '.join(cpu[1].values())})"


if __name__ == "__main__":
    sys.exit(main())
