"""Run the experiment behind the table of return gains, then write the report.

    python scripts/run_experiment.py                              # every shipped task
    python scripts/run_experiment.py --tasks hopper-medium        # one task (resumable)
    python scripts/run_experiment.py --report-only                # re-make report and plots

Cells (see dtmem/experiment.py) go to results/cells/<task>/; finished cells are kept, so
an interrupted run resumes. Then `dtmem report` over every cell present writes
results/report.{json,csv,md}, the plots (with the `plots` extra), and the README table.
"""

import argparse
import sys

from dtmem.cli import add_dataclass_flags
from dtmem.errors import UserError
from dtmem.experiment import ExperimentConfig, report, run
from dtmem.tasks import ROOT


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, ExperimentConfig)
    parser.add_argument("--report-only", action="store_true",
                        help="skip the rollouts; report the cells already present")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    cfg = ExperimentConfig(**{k: v for k, v in vars(args).items()
                              if k not in ("report_only", "no_plots")})
    try:
        if not args.report_only:
            run(cfg)
        report(cfg, ROOT / "README.md", plots=not args.no_plots)
    except UserError as e:
        print(f"run_experiment.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
