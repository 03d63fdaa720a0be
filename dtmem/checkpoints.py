"""Decision Transformer checkpoints: atomic saves, safe loads (no code runs from a file)."""

import pickle
import zipfile
from pathlib import Path

import torch

from dtmem.errors import UserError
from dtmem.files import atomic_path
from dtmem.model import DecisionTransformer, DTConfig
from dtmem.tasks import ROOT

SHIPPED_DIR = ROOT / "data" / "checkpoints"  # data/checkpoints/<task>.pt, used by default


def save_checkpoint(path, model, *, task, dataset_id, state_mean, state_std, steps,
                    provenance, metrics=None, training_state=None):
    """training_state: optimiser, scheduler and RNG states for --resume (optional)."""
    payload = {
        "format": "dtmem-dt-1",
        "config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "task": task,
        "dataset_id": dataset_id,
        "state_mean": torch.as_tensor(state_mean, dtype=torch.float32),
        "state_std": torch.as_tensor(state_std, dtype=torch.float32),
        "steps": steps,
        "metrics": metrics or {},
        "provenance": provenance,
        "training_state": training_state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path):
    """The checkpoint's dict. weights_only=True: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train one with `dtmem train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError,
            OSError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a dtmem checkpoint "
                        f"({type(e).__name__}); retrain or restore it") from None
    if not isinstance(payload, dict) or payload.get("format") != "dtmem-dt-1":
        raise UserError(f"checkpoint {path} is not a dtmem Decision Transformer checkpoint")
    return payload


def load_model(path, device="cpu"):
    """(model in eval mode, checkpoint dict)."""
    payload = read_checkpoint(path)
    try:
        model = DecisionTransformer(DTConfig(**payload["config"]))
        model.load_state_dict(payload["model"])
    except (TypeError, KeyError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} has a malformed model ({type(e).__name__}); "
                        "retrain or restore it") from None
    return model.to(device).eval(), payload
