"""Train a PPO behaviour policy on one MuJoCo env and export numpy checkpoints
(dtmem/ppo.py; needs the `collect` extra). The env's PPO settings, its training steps
included, are the [behavior] table of its envs/<env>.toml.

"expert" = best checkpoint in progress.csv, "medium" = an earlier one at 1/3-1/2 of its
return (chosen by scripts/build_suite.py --stages policies).

    python scripts/train_behavior.py --env Hopper-v5 --out runs/behavior
"""

import sys
from dataclasses import fields

from dtmem.command import add_dataclass_flags, run_reporting_errors, script_parser
from dtmem.limits import flag_type
from dtmem.ppo import PPORun, train


def main(argv=None):
    parser = script_parser(__doc__)
    add_dataclass_flags(parser, PPORun, skip=("steps",))
    parser.add_argument("--steps", type=flag_type("steps"), help="total env steps, counting those before a "
                        "resume (default: the env's [behavior] steps)")
    args = parser.parse_args(argv)
    return run_reporting_errors(
        lambda: train(PPORun(**{f.name: getattr(args, f.name) for f in fields(PPORun)})))


if __name__ == "__main__":
    sys.exit(main())
