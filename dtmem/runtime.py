"""Where torch runs: the device (CUDA when present) and the CPU threads."""

import sys

import torch

from dtmem.errors import UserError


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    return name


def progress_bar(iterable=None, show=True, **kwargs):
    """tqdm on a terminal only: in a log file a bar is thousands of lines of redraws, and
    it would split a one-line error in two."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not (show and sys.stderr.isatty()), **kwargs)
