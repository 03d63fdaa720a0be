"""Run the experiment behind the table of return gains; with --report, write the report.

    python scripts/run_experiment.py --tasks hopper-medium        # one task (resumable)
    python scripts/run_experiment.py --block confirmation --cells recompute,window,full
    python scripts/run_experiment.py --report --update-readme     # every shipped task
    python scripts/run_experiment.py --report-only                # re-make report and plots
    python scripts/run_experiment.py --backend ray --workers 8    # cells at once, on Ray
    python scripts/run_experiment.py --dt-dir runs/dt-seed-1 --out results/seeds/dt-seed-1
                                             # the same cells on other DTs (training seeds)

Cells (see dtmem/experiment.py) go to results/cells/<task>/ (development block) or
results/confirm/<task>/ (confirmation block); finished cells are kept, so an interrupted
run resumes. With --report (or --report-only), the cells present are summarised into
results/report.{json,csv,md} and the plots (with the `plots` extra), and with
--update-readme into the README's table; without, nothing committed is rewritten.
"""

import sys
from dataclasses import fields

from dtmem.backend import make_backend
from dtmem.command import (
    add_backend_flags,
    add_dataclass_flags,
    add_preset_flag,
    parse_with_preset,
    run_reporting_errors,
    script_parser,
)
from dtmem.experiment import ExperimentConfig, report, run
from dtmem.tasks import ROOT


def main(argv=None):
    parser = script_parser(__doc__)
    add_dataclass_flags(parser, ExperimentConfig)
    parser.add_argument("--report", action="store_true",
                        help="after the rollouts, write the report (and plots)")
    parser.add_argument("--report-only", action="store_true",
                        help="skip the rollouts; report the cells already present")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    add_backend_flags(parser, "cells")
    parser.add_argument("--update-readme", action="store_true",
                        help="put the table into README.md (for the committed results/)")
    presets = {}
    add_preset_flag(parser, "experiment", presets)
    args = parse_with_preset(parser, argv, presets)
    cfg = ExperimentConfig(**{f.name: getattr(args, f.name) for f in fields(ExperimentConfig)})

    def work():
        if not args.report_only:
            with make_backend(args.backend, args.address, args.workers) as backend:
                run(cfg, backend)
        if args.report or args.report_only or args.update_readme:
            report(cfg, ROOT / "README.md" if args.update_readme else None,
                   plots=not args.no_plots)

    return run_reporting_errors(work)


if __name__ == "__main__":
    sys.exit(main())
