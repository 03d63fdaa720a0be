"""Evolve a NAMM with CMA-ES on Decision Transformer rollouts (the same as `dtmem evolve`).

    python scripts/evolve.py --tasks hopper-medium --generations 50 --out runs/namm-hopper
    python scripts/evolve.py --tasks hopper-medium --then hopper-medium,walker2d-medium --out runs/x
    python scripts/evolve.py --resume runs/namm-hopper
"""

import sys

from dtmem.cli import main

if __name__ == "__main__":
    sys.exit(main(["evolve", *sys.argv[1:]]))
