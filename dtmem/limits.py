"""What dtmem accepts: the range of every number a user can give, and the memory a run
will need, checked before any work starts. One table serves the flags (`flag_type`) and
the config dataclasses built from them or from Python (`check`)."""

import math
import os
from dataclasses import fields

from dtmem.errors import UserError

SEED_MAX = 2**31 - 1  # numpy and Gymnasium take seeds up to 2**31 - 1; episode i is seed + i
BIG = 10_000_000

# name -> (type, lowest, highest), for flags and config fields of that name.
LIMITS = {
    # training (TrainConfig)
    "steps": (int, 1, BIG), "batch_size": (int, 1, 4096), "lr": (float, 1e-9, 1.0),
    "weight_decay": (float, 0.0, 1.0), "warmup_steps": (int, 1, BIG),
    "grad_clip": (float, 1e-6, 1e6), "context_steps": (int, 1, 1000), "n_layer": (int, 1, 48),
    "n_head": (int, 1, 64), "n_embd": (int, 1, 4096), "dropout": (float, 0.0, 0.99),
    "eval_every": (int, 0, BIG), "eval_episodes": (int, 1, 10_000),
    "checkpoint_every": (int, 1, BIG),
    # evolution (EvolveConfig, NoiseConfig); pycma needs a population of at least 4
    "generations": (int, 1, 100_000), "population": (int, 4, 10_000),
    "sigma": (float, 1e-6, 10.0), "n_up": (int, 16, 4096), "eval_mean_every": (int, 1, 100_000),
    "mean_episodes": (int, 1, 10_000), "members": (int, 4, 10_000),
    # rollouts, datasets and the experiment
    "seed": (int, 0, SEED_MAX), "episodes": (int, 1, 100_000), "slots": (int, 1, 4096),
    "envs": (int, 1, 1024), "budget": (int, 3, BIG), "ratio": (float, 1e-6, 1.0),
    "target_return": (float, -1e7, 1e7), "workers": (int, 1, 1024), "shards": (int, 1, 4096),
    "threads": (int, 1, os.cpu_count() or 1),
}


def check_value(name, value):
    """value, if it is a finite number of the right type within LIMITS[name]; else a
    UserError naming the flag and the accepted range."""
    kind, low, high = LIMITS[name]
    flag = "--" + name.replace("_", "-")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (not is_number or (kind is int and value != int(value))
            or not math.isfinite(value) or not low <= value <= high):
        shown = "{:,}" if kind is int else "{:g}"  # 2,147,483,647 rather than 2.14748e+09
        raise UserError(f"{flag} must be {'an integer' if kind is int else 'a number'} from "
                        f"{shown.format(low)} to {shown.format(high)}, got {value!r}")
    return kind(value)


def flag_type(name):
    """An argparse type for the flag of LIMITS[name]: parses, then checks the range."""
    import argparse

    kind = LIMITS[name][0]

    def parse(text):
        try:
            value = float(text) if kind is float else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{'an integer' if kind is int else 'a number'} is needed, got {text!r}"
            ) from None
        try:
            return check_value(name, value)
        except UserError as e:
            raise argparse.ArgumentTypeError("must " + str(e).split(" must ", 1)[1]) from None

    parse.__name__ = name  # argparse names the type in its messages
    return parse


def check(config):
    """Every field of a config dataclass that LIMITS names is in range (None: unset)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in LIMITS and value is not None:
            setattr(config, f.name, check_value(f.name, value))
    return config


def check_seeds(seed, count):
    """Episodes seed .. seed + count - 1 must all be valid env seeds."""
    check_value("seed", seed)
    if seed + count - 1 > SEED_MAX:
        raise UserError(f"--seed {seed} with {count} episodes runs past the largest env seed "
                        f"{SEED_MAX}; choose a smaller seed")


def available_memory():
    """Bytes this machine can still give a process (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_memory(needed, what, fix):
    """Refuse before the work when `needed` bytes exceed what the machine has."""
    free = available_memory()
    if free is not None and needed > free:
        raise UserError(f"{what} needs about {needed / 2**30:.1f} GiB but only "
                        f"{free / 2**30:.1f} GiB is available; {fix}")
