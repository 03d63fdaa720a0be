"""NAMM files: dtmem's own (flat parameters, frozen statistics, n_up, meta) and the import
of a checkpoint of the original code (SakanaAI/evo-memory)."""

import torch

from dtmem.errors import UserError
from dtmem.files import atomic_path, safe_load
from dtmem.memory.namm.features import N_BINS
from dtmem.memory.namm.scorers import BAM_PARAMS, SCORERS
from dtmem.tasks import shipped

SHIPPED_DIR = shipped("data") / "namm"  # default.pt (zero-shot), <task>.pt (evolved on it)
FORMAT = "dtmem-namm-1"


def shipped_file(name):
    """A shipped NAMM by name: "default", "default-mlp", or a task."""
    return SHIPPED_DIR / f"{name}.pt"


def save_namm(path, scorer, params, stats, n_up, meta):
    mean, var, count = stats
    payload = {"format": FORMAT, "scorer": scorer, "params": params.detach().cpu(),
               "stats_mean": mean.cpu(), "stats_var": var.cpu(), "stats_count": int(count),
               "n_up": n_up, "meta": meta}
    problem = schema_problem(payload)  # e.g. an imported checkpoint's NaN statistics
    if problem:
        raise UserError(f"not writing the NAMM file {path}: {problem}")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_namm(path):
    """The file's dict, loaded safely and checked to be a dtmem NAMM file."""
    payload = safe_load(path, "NAMM file", "give an existing one (the shipped ones are in "
                        "data/namm/) or evolve one with scripts/evolve.py")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a dtmem NAMM file; import an original checkpoint "
                        "with `dtmem namm import`")
    problem = schema_problem(payload)
    if problem:
        raise UserError(f"NAMM file {path} is damaged: {problem}; evolve or restore it")
    return payload


def schema_problem(payload):
    """What is wrong with a NAMM file's contents, or None."""
    missing = [k for k in ("scorer", "params", "stats_mean", "stats_var", "stats_count",
                           "n_up", "meta") if k not in payload]
    if missing:
        return f"it lacks {', '.join(missing)}"
    if payload["scorer"] not in SCORERS:
        return f"unknown scorer {payload['scorer']!r}"
    params = payload["params"]
    if not isinstance(params, torch.Tensor) or params.dim() != 1:
        return "params is not a vector"
    for name in ("stats_mean", "stats_var"):
        value = payload[name]
        if not isinstance(value, torch.Tensor) or value.shape != (N_BINS,):
            return f"{name} is not a vector of {N_BINS} values"
    values = (params, payload["stats_mean"], payload["stats_var"])
    if not all(torch.isfinite(v).all() for v in values):
        return "its parameters or statistics hold non-finite values"
    if (payload["stats_var"] < 0).any():
        return "stats_var holds negative variances"
    count, n_up = payload["stats_count"], payload["n_up"]
    if not isinstance(count, int) or count < 0:
        return f"stats_count = {count!r} is not a count"
    if not isinstance(n_up, int) or not 16 <= n_up <= 4096 or n_up % 16:
        return f"n_up = {n_up!r} is not a multiple of 16 from 16 to 4096"
    if not isinstance(payload["meta"], dict):
        return "meta is not a dict"
    return None


def load_namm(path, scorer):
    """(params [P], stats, n_up, meta) from a dtmem NAMM file made for `scorer`."""
    payload = read_namm(path)
    n_params = SCORERS[scorer][1]
    params = payload["params"]
    if payload["scorer"] != scorer or params.shape != (n_params,):
        raise UserError(f"{path} holds a {payload['scorer']} NAMM of {params.numel()} "
                        f"parameters; policy needs {scorer} with {n_params}")
    stats = (payload["stats_mean"], payload["stats_var"], payload["stats_count"])
    return params.float(), stats, payload["n_up"], payload["meta"]


def import_original(path):
    """(params [4172], stats) from a checkpoint of the original NAMM code: its CMA-ES `mean`
    and the standardisation buffers named *_mean, *_var, *_num (each 17 values)."""
    payload = safe_load(path, "NAMM checkpoint", "pass the original code's torch file")
    found = {}

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, torch.Tensor):
            if key == "mean" and node.numel() == BAM_PARAMS:
                found["params"] = node.reshape(-1).float()
            for suffix in ("_mean", "_var", "_num"):
                if key.endswith(suffix) and node.numel() in (1, N_BINS):
                    found[suffix] = node.reshape(-1).float()

    walk(payload)
    missing = [k for k in ("params", "_mean", "_var", "_num") if k not in found]
    if missing:
        raise UserError(f"{path} lacks the CMA-ES mean of {BAM_PARAMS} values or the "
                        "normalisation buffers (*_mean, *_var, *_num)")
    return found["params"], (found["_mean"], found["_var"], int(found["_num"].reshape(-1)[0]))
