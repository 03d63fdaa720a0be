"""The task registry: one TOML file per environment in envs/, one task per dataset quality."""

import tomllib
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dtmem.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ENVS_DIR = ROOT / "envs"


@dataclass(frozen=True)
class Task:
    name: str  # "hopper-medium"
    env: str  # "hopper"
    quality: str  # "medium"
    env_id: str  # Gymnasium id, "Hopper-v5"
    remote_id: str  # Minari remote dataset id
    local_id: str  # dataset id that `dtmem data build` writes
    target_return: float
    return_scale: float
    max_episode_steps: int
    ref_min: float  # return that normalises to 0
    ref_max: float  # return that normalises to 100
    ref_source: str  # where ref_min/ref_max come from: "dtmem" or "d4rl"

    def normalise(self, returns):
        """Normalised score, 100 * (R - ref_min) / (ref_max - ref_min), as the field reports it."""
        return 100.0 * (returns - self.ref_min) / (self.ref_max - self.ref_min)


def _tasks_of(env: str, spec: dict) -> list[Task]:
    tasks = []
    # dtmem's own references (measured by scripts/build_suite.py) win over D4RL's.
    if "dtmem" in spec["reference"]:
        ours = spec["reference"]["dtmem"]
        refs = (ours["random"], ours["expert"], "dtmem")
    else:
        d4rl = spec["reference"]["d4rl"]
        refs = (d4rl["random"], d4rl["expert"], "d4rl")
    for quality, t in spec["tasks"].items():
        tasks.append(Task(
            name=f"{env}-{quality}", env=env, quality=quality, env_id=spec["env_id"],
            remote_id=t["remote_id"], local_id=t["local_id"],
            target_return=float(t["target_return"]), return_scale=float(spec["return_scale"]),
            max_episode_steps=int(spec["max_episode_steps"]),
            ref_min=float(refs[0]), ref_max=float(refs[1]), ref_source=refs[2],
        ))
    return tasks


@cache
def all_tasks() -> dict[str, Task]:
    tasks = {}
    for path in sorted(ENVS_DIR.glob("*.toml")):
        for task in _tasks_of(path.stem, tomllib.loads(path.read_text())):
            tasks[task.name] = task
    return tasks


@cache
def default_tasks() -> dict[str, Task]:
    """env name -> its default task ("hopper" -> hopper-medium)."""
    defaults = {}
    for path in sorted(ENVS_DIR.glob("*.toml")):
        spec = tomllib.loads(path.read_text())
        defaults[path.stem] = all_tasks()[f"{path.stem}-{spec['default_quality']}"]
    return defaults


def resolve_task(env: str | None = None, task: str | None = None) -> Task:
    """The task named by --task, else the default task of --env (hopper by default)."""
    if task is not None:
        if task not in all_tasks():
            raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(all_tasks())}")
        return all_tasks()[task]
    env = env or "hopper"
    if env not in default_tasks():
        raise UserError(f"unknown env {env!r}; valid envs: {', '.join(default_tasks())}")
    return default_tasks()[env]


def _mujoco_warning(message):
    # MuJoCo 4 warns about an attribute of Gymnasium's own model files on every env
    # creation; the warning is Gymnasium's to fix, so only other warnings are passed on.
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message}", stacklevel=2)


def make_env(task: Task):
    import gymnasium as gym
    import mujoco

    mujoco.set_mju_user_warning(_mujoco_warning)
    return gym.make(task.env_id, max_episode_steps=task.max_episode_steps)
