"""Regenerate the suite end to end (dtmem/suite.py): behaviour policies -> reference
returns -> Minari datasets -> Decision Transformers -> results. Finished stages are skipped
and interrupted ones resume, so the job can span sessions. The envs are envs/*.toml.

    python scripts/build_suite.py                       # everything
    python scripts/build_suite.py --envs hopper --stages policies,references,datasets
    python scripts/build_suite.py --tasks hopper-medium --stages dts,results
    python scripts/build_suite.py --workers 2           # two envs, then two tasks, at once
    python scripts/build_suite.py --backend ray --address ADDR   # on a Ray cluster
"""

import sys
from pathlib import Path

from dtmem import suite
from dtmem.backend import make_backend
from dtmem.command import add_backend_flags, run_reporting_errors, script_parser
from dtmem.tasks import ROOT


def main(argv=None):
    parser = script_parser(__doc__ + "\n" + suite.__doc__.split("\n\n", 1)[1])
    parser.add_argument("--envs", help="comma-separated envs (default: every envs/*.toml)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: all of --envs)")
    parser.add_argument("--stages", default=",".join(suite.STAGES),
                        help="comma-separated stages (default: all, in order)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "suite"),
                        help="working files (PPO runs, DT checkpoints in training)")
    parser.add_argument("--results", default=str(ROOT / "results" / "suite.json"))
    add_backend_flags(parser, "envs' and tasks' stages")
    args = parser.parse_args(argv)

    def build():
        with make_backend(args.backend, args.address, args.workers) as backend:
            suite.build(suite.SuiteConfig(), args.stages.split(","),
                        args.envs and args.envs.split(","), args.tasks and args.tasks.split(","),
                        Path(args.runs), Path(args.results), ROOT / "README.md", backend)

    return run_reporting_errors(build)


if __name__ == "__main__":
    sys.exit(main())
