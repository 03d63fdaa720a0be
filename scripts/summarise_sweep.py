"""Summarise a sweep of short evolution runs (one JSON per setting, see
results/n-up-sweep/README.md) into summary.md in the same folder.

    python scripts/summarise_sweep.py results/n-up-sweep
"""

import json
import sys
from pathlib import Path

import numpy as np

from dtmem.files import atomic_path


def main(folder):
    folder = Path(folder)
    runs = sorted(((path, json.loads(path.read_text())) for path in folder.glob("*.json")),
                  key=lambda path_run: path_run[1]["config"]["n_up"])
    if not runs:
        print(f"summarise_sweep.py: error: no run files (*.json) in {folder}", file=sys.stderr)
        return 2
    lines = ["| run | n_up | population mean, last 5 generations | CMA-ES mean evaluations "
             "| cache tokens, last 5 | wall s |", "|---|---|---|---|---|---|"]
    for path, run in runs:
        history = run["history"][-5:]
        evals = [f"g{h['generation']}: {h['mean_eval']:.1f}" for h in run["history"]
                 if h["mean_eval"] is not None]
        lines.append(
            f"| {path.stem} | {run['config']['n_up']} | "
            f"{np.mean([h['mean'] for h in history]):.1f} | {', '.join(evals)} | "
            f"{np.mean([h['mean_tokens'] for h in history]):.0f} | "
            f"{sum(h['wall'] for h in run['history']):.0f} |")
    table = "\n".join(lines) + "\n"
    with atomic_path(folder / "summary.md") as tmp:
        tmp.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "results/n-up-sweep"))
