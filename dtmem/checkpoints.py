"""Decision Transformer checkpoints: atomic saves, safe loads (no code runs from a file),
and `Checkpoint`, the one way a DT travels through dtmem: model, state normaliser, the
task and dataset it was trained on, and the file's hash."""

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from dtmem.errors import UserError
from dtmem.files import atomic_path, relative_to_root, safe_load, sha256
from dtmem.limits import BIG, LIMITS, check_memory
from dtmem.model import DecisionTransformer, DTConfig
from dtmem.tasks import Task, all_tasks, make_env, shipped

SHIPPED_DIR = shipped("data") / "checkpoints"  # data/checkpoints/<task>.pt, used by default


def save_checkpoint(path, model, *, task, dataset_id, state_mean, state_std, steps,
                    provenance, metrics=None, training_state=None, reference=None):
    """training_state: optimiser, scheduler and RNG states for --resume (optional);
    reference: the dataset's own reference returns {"min", "max", "source"}, if it has."""
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
        "reference": reference,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path):
    """The checkpoint's dict, loaded safely (no code from the file runs) and checked
    against the schema before anything is built from it."""
    payload = safe_load(path, "checkpoint", "train one with `dtmem train` or restore it")
    if not isinstance(payload, dict) or payload.get("format") != "dtmem-dt-1":
        raise UserError(f"checkpoint {path} is not a dtmem Decision Transformer checkpoint")
    problem = schema_problem(payload)
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}; retrain or restore it")
    return payload


KEYS = ("config", "model", "task", "dataset_id", "state_mean", "state_std", "steps")
# The model sizes `dtmem train` accepts (LIMITS) are the ones a checkpoint may have.
CONFIG_LIMITS = {"state_dim": (1, 100_000), "act_dim": (1, 100_000),
                 **{name: LIMITS[name][1:] for name in ("context_steps", "n_layer", "n_head",
                                                        "n_embd")},
                 "max_timestep": (1, BIG)}


def config_problem(config):
    """What is wrong with a DT config (a dict of DTConfig's fields), or None: the sizes
    dtmem builds, dropout in [0, 1), n_embd a multiple of n_head."""
    if not isinstance(config, dict) or set(config) != {f.name for f in fields(DTConfig)}:
        return "its model config is not a DT config"
    for name, (low, high) in CONFIG_LIMITS.items():
        value = config[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            return f"config {name} = {value!r} is outside {low}..{high}, the sizes dtmem builds"
    dropout = config["dropout"]
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool)
            and 0 <= dropout < 1):
        return f"config dropout = {dropout!r} is outside [0, 1)"
    if config["n_embd"] % config["n_head"]:
        return "config n_embd is not a multiple of n_head"
    return None


def schema_problem(payload):
    """What is wrong with a checkpoint's contents, or None: keys, config sizes, the
    normaliser's shape and values, non-finite weights."""
    missing = [k for k in KEYS if k not in payload]
    if missing:
        return f"it lacks {', '.join(missing)}"
    config = payload["config"]
    problem = config_problem(config)
    if problem:
        return problem
    for name in ("state_mean", "state_std"):
        value = payload[name]
        if not isinstance(value, torch.Tensor) or value.shape != (config["state_dim"],):
            return f"{name} is not a vector of state_dim = {config['state_dim']} values"
        if not torch.isfinite(value).all():
            return f"{name} holds non-finite values"
    if not (payload["state_std"] > 0).all():
        return "state_std holds values that are not positive"
    weights = payload["model"]
    if not isinstance(weights, dict) or not all(isinstance(w, torch.Tensor)
                                                for w in weights.values()):
        return "its model weights are not a dict of tensors"
    bad = next((k for k, w in weights.items() if w.is_floating_point()
                and not torch.isfinite(w).all()), None)
    if bad:
        return f"weight {bad} holds non-finite values"
    reference = payload.get("reference")
    if reference is not None and not (
            isinstance(reference, dict) and {"min", "max", "source"} <= set(reference)
            and all(isinstance(reference[k], float) and math.isfinite(reference[k])
                    for k in ("min", "max")) and reference["max"] > reference["min"]):
        return "its reference returns are not two finite numbers, min below max"
    return None


def shipped_path(task_name):
    return SHIPPED_DIR / f"{task_name}.pt"


@dataclass
class Checkpoint:
    """A trained DT in eval mode with what it needs at rollout time and where it came from."""

    model: DecisionTransformer
    state_mean: torch.Tensor  # [state_dim], the training data's statistics
    state_std: torch.Tensor
    task: str  # the task it was trained on
    dataset_id: str
    steps: int  # gradient updates
    path: Path
    sha256: str
    provenance: dict
    reference: dict | None = None  # the training dataset's own reference returns, if any

    @classmethod
    def load(cls, path, device="cpu"):
        payload = read_checkpoint(path)
        config = payload["config"]  # a config may claim a model far larger than its file
        check_memory(4 * 12 * config["n_layer"] * config["n_embd"] ** 2,
                     f"the model checkpoint {path} describes", "is the checkpoint damaged?")
        try:
            model = DecisionTransformer(DTConfig(**config))
            model.load_state_dict(payload["model"])
            return cls(model.to(device).eval(), payload["state_mean"], payload["state_std"],
                       payload["task"], payload["dataset_id"], payload["steps"], Path(path),
                       sha256(path), payload.get("provenance", {}), payload.get("reference"))
        except (TypeError, KeyError, RuntimeError) as e:
            raise UserError(f"checkpoint {path} has a malformed model ({type(e).__name__}); "
                            "retrain or restore it") from None

    @classmethod
    def shipped(cls, task_name, device="cpu"):
        """The DT shipped for a task (data/checkpoints/<task>.pt)."""
        path = shipped_path(task_name)
        if not path.exists():
            raise UserError(f"no shipped DT for {task_name}; train one with `dtmem train "
                            f"--task {task_name}` and pass --checkpoint, or build the suite "
                            "with scripts/build_suite.py --stages dts")
        return cls.load(path, device)

    @classmethod
    def for_task(cls, task: Task, path=None, device="cpu"):
        """`path`, or the task's shipped DT; either way it must fit the task's env."""
        checkpoint = cls.load(path, device) if path else cls.shipped(task.name, device)
        checkpoint.check_fits(task)
        return checkpoint

    @classmethod
    def untrained(cls, task: Task, device="cpu"):
        """A DT of the default size with seeded random weights (for speed measurements)."""
        env = make_env(task)
        dims = env.observation_space.shape[0], env.action_space.shape[0]
        torch.manual_seed(0)
        model = DecisionTransformer(DTConfig(*dims)).to(device).eval()
        return cls(model, torch.zeros(dims[0]), torch.ones(dims[0]), task.name, "none", 0,
                   None, "", {})

    def scoring(self, task: Task) -> Task:
        """The task as this DT's scores are normalised: against its training dataset's own
        reference returns where the dataset has them, else the task's."""
        if not self.reference:
            return task
        return replace(task, ref_min=self.reference["min"], ref_max=self.reference["max"],
                       ref_source=self.reference["source"])

    def check_fits(self, task: Task):
        cfg = self.model.cfg
        trained_on = all_tasks().get(self.task)
        env = make_env(task)
        dims = (env.observation_space.shape[0], env.action_space.shape[0])
        if trained_on is None or trained_on.env != task.env or dims != (cfg.state_dim,
                                                                          cfg.act_dim):
            raise UserError(f"checkpoint {self.path} was trained on {self.task} (state "
                            f"{cfg.state_dim}, action {cfg.act_dim}) and does not fit "
                            f"{task.env_id} (state {dims[0]}, action {dims[1]})")

    def record(self):
        """What a results file says about the DT behind it."""
        return {"checkpoint": relative_to_root(self.path), "checkpoint_sha256": self.sha256,
                "checkpoint_task": self.task, "dataset_id": self.dataset_id,
                "checkpoint_steps": self.steps}
