"""The task registry: one TOML file per environment in envs/, one task per dataset quality.

An env file names its Gymnasium env, its tasks ([tasks.<quality>]), its reference returns
([reference.d4rl] from the literature, [reference.dtmem] once measured by the suite) and
how its behaviour policies are trained ([behavior], dtmem/ppo.py). Adding an environment
is adding one such file.
"""

import math
import tomllib
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dtmem.errors import UserError

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent  # the repository, when dtmem runs from one (an editable install)


def shipped(name):
    """Where a folder of shipped files (envs, data) is: the repository's own when dtmem
    runs from one, else the copy a wheel carries inside the package (dtmem/_shipped/)."""
    in_repository = (ROOT / "pyproject.toml").exists() and (ROOT / name).is_dir()
    return ROOT / name if in_repository else PACKAGE / "_shipped" / name


ENVS_DIR = shipped("envs")


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
    ref_source: str  # where ref_min/ref_max come from: "dtmem", "d4rl" or "none"
    d4rl_refs: tuple | None = None  # D4RL's (random, expert) returns, for the second scale

    def normalise(self, returns):
        """Normalised score, 100 * (R - ref_min) / (ref_max - ref_min), as the field reports it."""
        if self.ref_source == "none":
            raise UserError(f"{self.env} has no reference returns yet; measure them with "
                            f"scripts/build_suite.py --envs {self.env} --stages references")
        return 100.0 * (returns - self.ref_min) / (self.ref_max - self.ref_min)

    def d4rl_score(self, returns):
        """The same returns on D4RL's scale (older env versions, so indicative only)."""
        if self.d4rl_refs is None:
            return None
        low, high = self.d4rl_refs
        return 100.0 * (returns - low) / (high - low)


@dataclass(frozen=True)
class EnvSpec:
    """One envs/<name>.toml."""

    name: str  # "hopper", the file's stem
    env_id: str  # Gymnasium id, "Hopper-v5"
    path: Path
    tasks: dict  # quality -> Task
    default_quality: str
    behavior: dict  # the [behavior] table: PPO settings that differ from dtmem.ppo's defaults

    @property
    def default_task(self) -> Task:
        return self.tasks[self.default_quality]


def _references(spec):
    # dtmem's own references (measured by scripts/build_suite.py) win over D4RL's; a new
    # env has neither until the suite measures them.
    for source in ("dtmem", "d4rl"):
        if source in spec.get("reference", {}):
            refs = spec["reference"][source]
            return float(refs["random"]), float(refs["expert"]), source
    return math.nan, math.nan, "none"


def _read_env(path: Path) -> EnvSpec:
    spec = tomllib.loads(path.read_text())
    ref_min, ref_max, source = _references(spec)
    d4rl = spec.get("reference", {}).get("d4rl")
    tasks = {}
    for quality, t in spec["tasks"].items():
        # The DT paper evaluated medium and expert data at one expert-level target per
        # env; ours is the expert reference rounded to 100, unless a task sets its own.
        target = t.get("target_return", round(ref_max, -2))
        tasks[quality] = Task(
            name=f"{path.stem}-{quality}", env=path.stem, quality=quality,
            env_id=spec["env_id"], remote_id=t["remote_id"], local_id=t["local_id"],
            target_return=float(target), return_scale=float(spec["return_scale"]),
            max_episode_steps=int(spec["max_episode_steps"]),
            ref_min=ref_min, ref_max=ref_max, ref_source=source,
            d4rl_refs=d4rl and (float(d4rl["random"]), float(d4rl["expert"])),
        )
    return EnvSpec(path.stem, spec["env_id"], path, tasks, spec["default_quality"],
                   spec.get("behavior", {}))


@cache
def all_envs() -> dict[str, EnvSpec]:
    """env name -> its spec, read once; `all_envs.cache_clear()` after writing a file."""
    return {path.stem: _read_env(path) for path in sorted(ENVS_DIR.glob("*.toml"))}


def all_tasks() -> dict[str, Task]:
    return {task.name: task for env in all_envs().values() for task in env.tasks.values()}


def default_tasks() -> dict[str, Task]:
    """env name -> its default task ("hopper" -> hopper-medium)."""
    return {name: env.default_task for name, env in all_envs().items()}


def resolve_task(env: str | None = None, task: str | None = None) -> Task:
    """The task named by --task (a task name, or its Minari dataset id, local or remote),
    else the default task of --env (an env name or its Gymnasium id; hopper by default)."""
    if task is not None:
        by_dataset = {t.remote_id: t for t in all_tasks().values()} | {
            t.local_id: t for t in all_tasks().values()}
        if task not in all_tasks() and task not in by_dataset:
            raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(all_tasks())} "
                            "(or their Minari dataset ids)")
        return all_tasks().get(task) or by_dataset[task]
    env = env or "hopper"
    by_gym_id = {spec.env_id: name for name, spec in all_envs().items()}
    env = by_gym_id.get(env, env)
    if env not in default_tasks():
        raise UserError(f"unknown env {env!r}; valid envs: {', '.join(default_tasks())} "
                        f"(or their Gymnasium ids: {', '.join(by_gym_id)})")
    return default_tasks()[env]


def _mujoco_warning(message):
    # MuJoCo 4 warns about an attribute of Gymnasium's own model files on every env
    # creation; the warning is Gymnasium's to fix, so only other warnings are passed on.
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message}", stacklevel=2)


def make_env(task: Task, frame_size=None):
    """The task's Gymnasium env; with frame_size, rendering RGB frames of that size."""
    import gymnasium as gym
    import mujoco

    mujoco.set_mju_user_warning(_mujoco_warning)
    render = {"render_mode": "rgb_array", "width": frame_size, "height": frame_size}
    return gym.make(task.env_id, max_episode_steps=task.max_episode_steps,
                    **(render if frame_size else {}))
