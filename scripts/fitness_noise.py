"""The fitness-noise study (dtmem/fitness_noise.py): how many episodes per member CMA-ES
needs to rank NAMM candidates. One population per call; --table prints every one written.

    python scripts/fitness_noise.py --task hopper-medium
    python scripts/fitness_noise.py --task walker2d-expert --around data/namm/walker2d-expert.pt
    python scripts/fitness_noise.py --table
"""

import sys
from dataclasses import fields

import torch

from dtmem import fitness_noise
from dtmem.command import add_dataclass_flags, run_reporting_errors, script_parser

OUT = "results/fitness-noise"


def main(argv=None):
    parser = script_parser(__doc__)
    add_dataclass_flags(parser, fitness_noise.NoiseConfig)
    parser.add_argument("--out", default=OUT, help=f"results folder (default {OUT})")
    parser.add_argument("--table", action="store_true", help="print the table of --out")
    args = parser.parse_args(argv)

    def work():
        if not args.table:
            torch.set_num_threads(1)
            cfg = fitness_noise.NoiseConfig(**{f.name: getattr(args, f.name)
                                               for f in fields(fitness_noise.NoiseConfig)})
            path, _ = fitness_noise.run(cfg, args.out)
            print(f"wrote {path}")
        print(fitness_noise.markdown(args.out))

    return run_reporting_errors(work)


if __name__ == "__main__":
    sys.exit(main())
