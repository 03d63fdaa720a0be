"""Minari datasets: finding them, building them locally, and sampling training windows."""

import json
import os
import shutil
import textwrap
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtmem import __version__
from dtmem.errors import UserError
from dtmem.files import (
    DISK_FULL,
    TMP_PREFIX,
    clean_stale_temporaries,
    ensure_writable,
    git_commit,
)
from dtmem.limits import check_seeds, check_value
from dtmem.runtime import progress_bar
from dtmem.tasks import Task, all_tasks, make_env, shipped

POLICIES_DIR = shipped("data") / "policies"


def _minari():
    # Imported lazily: minari pulls in h5py and more, which `dtmem --help` does not need.
    import minari

    return minari


def is_local(dataset_id):
    return (_minari().storage.get_dataset_path(dataset_id) / "data").exists()


def dataset_problem(dataset_id):
    """Why a local dataset cannot be used (None if it can): missing or unreadable
    metadata, a truncated or corrupt HDF5 file, no episodes."""
    import h5py

    folder = _minari().storage.get_dataset_path(dataset_id) / "data"
    try:
        metadata = json.loads((folder / "metadata.json").read_text())
        with h5py.File(folder / "main_data.hdf5", "r") as f:
            episodes = len(f.keys())
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    if not isinstance(metadata, dict) or not episodes:
        return "it holds no episodes"
    if metadata.get("total_episodes") != episodes:
        return f"its metadata counts {metadata.get('total_episodes')} episodes, its data {episodes}"
    return None


def dataset_status(dataset_id):
    """("present" | "absent" | "damaged", why it is damaged or None)."""
    if not is_local(dataset_id):
        return "absent", None
    problem = dataset_problem(dataset_id)
    return ("present", None) if problem is None else ("damaged", problem)


def load_local(dataset_id):
    """A local Minari dataset, checked; a damaged one is reported with its fix."""
    problem = dataset_problem(dataset_id)
    if problem is None:
        try:
            return _minari().load_dataset(dataset_id)
        except Exception as e:  # Minari's own checks, whatever they raise
            problem = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
    raise UserError(f"dataset {dataset_id} is incomplete or corrupt ({problem}); rebuild it "
                    "with `dtmem data build --overwrite` or delete it with `minari delete`")


def find_dataset(task: Task, download=False, dataset_id=None):
    """A dataset for the task: `dataset_id` (any Minari id: official, combined, another
    quality), else dtmem's local build, else Minari's remote id if present locally; a
    missing one is downloaded with download=True. Returns (dataset, id)."""
    build = f"dtmem data build --task {task.name}"
    if dataset_id:
        if is_local(dataset_id):
            dataset = load_local(dataset_id)
        elif download:
            dataset = download_dataset(dataset_id, build)
        else:
            raise UserError(f"dataset {dataset_id} is not local; pass --download to fetch it "
                            "from Minari's remote")
        check_env(dataset, dataset_id, task)
        return dataset, dataset_id
    for dataset_id in (task.local_id, task.remote_id):
        if is_local(dataset_id):
            return load_local(dataset_id), dataset_id
    if not download:
        raise UserError(f"no dataset for {task.name} (neither {task.local_id} nor "
                        f"{task.remote_id} is local); run `{build}` or pass --download")
    return download_dataset(task.remote_id, build), task.remote_id


def download_dataset(dataset_id, build):
    try:
        from huggingface_hub.utils import logging as hub_logging  # Minari's remote needs it

        # Offline, huggingface_hub logs each of its five retries (eleven lines on stderr)
        # before Minari raises; its reason reaches the user once, in the one line below.
        verbosity = hub_logging.get_verbosity()
        hub_logging.set_verbosity_error()
        try:
            return _minari().load_dataset(dataset_id, download=True)
        finally:
            hub_logging.set_verbosity(verbosity)
    except ImportError as e:  # Minari's remote needs the huggingface_hub extra
        raise UserError(f"downloading {dataset_id} needs Minari's hub support: pip install "
                        f"\"dtmem[hub]\" ({e})") from None
    except Exception as e:  # the remote's own reason: network, auth, unknown id
        reason = textwrap.shorten(str(e).strip().splitlines()[0], 200) if str(e).strip() else ""
        raise UserError(f"could not download {dataset_id}: {type(e).__name__}: {reason}; "
                        f"offline, build a dataset locally with `{build}`") from None


def check_env(dataset, dataset_id, task: Task):
    """A dataset trains a DT for a task only if it was collected on the task's env (any
    version: a DT fits a version whose spaces have the same sizes)."""
    spec = dataset.spec.env_spec
    if spec is not None and spec.id.split("-v")[0] != task.env_id.split("-v")[0]:
        raise UserError(f"dataset {dataset_id} was collected on {spec.id}, not on "
                        f"{task.env_id} ({task.name}); choose the task of its env")


def dataset_reference(dataset, dataset_id):
    """The dataset's own reference returns (Minari's ref_min_score, ref_max_score), or None
    where it has none (some official MuJoCo datasets)."""
    meta = dataset.storage.metadata
    low, high = meta.get("ref_min_score"), meta.get("ref_max_score")
    if low is None or high is None or not high > low:
        return None
    return {"min": float(low), "max": float(high), "source": f"dataset {dataset_id}"}


@dataclass
class Episodes:
    """All steps of a dataset, concatenated; episode i is rows starts[i]:starts[i]+lengths[i].
    Minari stores N+1 observations for N actions; the last one is dropped here, since no
    action follows it."""

    states: np.ndarray  # [N, S] float32
    actions: np.ndarray  # [N, A] float32
    rewards: np.ndarray  # [N] float32
    starts: np.ndarray  # [M] int64
    lengths: np.ndarray  # [M] int64

    @classmethod
    def from_minari(cls, dataset):
        states, actions, rewards, lengths = [], [], [], []
        for ep in dataset.iterate_episodes():
            n = len(ep.actions)
            states.append(ep.observations[:n])
            actions.append(ep.actions)
            rewards.append(ep.rewards)
            lengths.append(n)
        lengths = np.asarray(lengths, dtype=np.int64)
        for name, values in (("observations", states), ("actions", actions),
                             ("rewards", rewards)):
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, caught here
                finite = all(np.isfinite(np.asarray(v, dtype=np.float32)).all() for v in values)
            if not finite:
                raise UserError(f"dataset {dataset.spec.dataset_id} holds non-finite (or "
                                f"beyond float32) {name}; a DT cannot train on them")
        return cls(np.concatenate(states).astype(np.float32),
                   np.concatenate(actions).astype(np.float32),
                   np.concatenate(rewards).astype(np.float32),
                   np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), lengths)

    def returns(self):
        """Undiscounted return of each episode, [M]."""
        return np.add.reduceat(self.rewards.astype(np.float64), self.starts)

    def returns_to_go(self):
        """Undiscounted suffix sum of rewards within each episode, [N]."""
        suffix = np.concatenate([np.cumsum(self.rewards[::-1].astype(np.float64))[::-1], [0.0]])
        episode_end = np.repeat(self.starts + self.lengths, self.lengths)
        return (suffix[:-1] - suffix[episode_end]).astype(np.float32)

    def state_stats(self):
        """Mean and std of states over the whole dataset (std + 1e-6, the DT convention)."""
        return self.states.mean(0), self.states.std(0) + 1e-6


class WindowSampler:
    """Training windows of K steps. Episodes are drawn in proportion to their length and a
    start step uniformly within them (so every step is equally likely to start a window);
    windows running past the episode end are right-padded and masked."""

    def __init__(self, episodes: Episodes, context_steps, return_scale, state_mean, state_std,
                 seed=0):
        self.ep = episodes
        self.K = context_steps
        self.rtg = episodes.returns_to_go() / return_scale
        self.states = (episodes.states - state_mean) / state_std
        self.p = episodes.lengths / episodes.lengths.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size):
        """Dict of tensors: rtg [B, K, 1], states [B, K, S], actions [B, K, A],
        timesteps [B, K], mask [B, K] (False on padding)."""
        ep = self.rng.choice(len(self.p), size=batch_size, p=self.p)
        length = self.ep.lengths[ep]
        start = (self.rng.random(batch_size) * length).astype(np.int64)
        step = start[:, None] + np.arange(self.K)  # [B, K] timestep within the episode
        mask = step < length[:, None]
        row = self.ep.starts[ep][:, None] + np.minimum(step, length[:, None] - 1)
        batch = {
            "rtg": self.rtg[row][..., None] * mask[..., None],
            "states": self.states[row] * mask[..., None],
            "actions": self.ep.actions[row] * mask[..., None],
            "timesteps": np.where(mask, step, 0),
            "mask": mask,
        }
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def behavior_names(env):
    """Behaviour policies available for an env: random plus its shipped ones."""
    return ["random", *sorted(p.stem.split("-", 1)[1] for p in POLICIES_DIR.glob(f"{env}-*.npz"))]


def make_behavior(name, task: Task, observation_space, action_space):
    """`random`, a shipped policy of the task's env (`medium`, `expert`: data/policies/
    <env>-<name>.npz), or a path to a policy .npz file."""
    from dtmem.behavior import MLPPolicy, RandomPolicy

    if name == "random":
        return RandomPolicy(action_space.low, action_space.high)
    path = Path(name) if name.endswith(".npz") else POLICIES_DIR / f"{task.env}-{name}.npz"
    if not name.endswith(".npz") and not path.exists():
        raise UserError(f"unknown behaviour policy {name!r} for {task.env}; valid: "
                        f"{', '.join(behavior_names(task.env))}, or a path to a policy .npz")
    policy = MLPPolicy.load(path, deterministic=False)
    if (policy.obs_dim, policy.act_dim) != (observation_space.shape[0], action_space.shape[0]):
        raise UserError(f"behaviour policy {path} is for observations of size {policy.obs_dim} "
                        f"and actions of size {policy.act_dim}, not {task.env_id}'s")
    return policy


def collect_episodes(task: Task, behavior, steps, seed=0, n_envs=16, progress=True,
                     max_episodes=None):
    """Run `behavior` in n_envs envs in lockstep for exactly `steps` steps, the episodes
    still running then cut (and marked truncated), as Minari's fixed-size datasets are;
    or, with max_episodes, until that many whole episodes. Episode i is reset with
    seed + i. Returns a list of dicts of arrays (observations has one row more than
    actions)."""
    envs = [make_env(task) for _ in range(n_envs)]
    rng = np.random.default_rng(seed)
    launched, started_steps = 0, 0
    finished = {}
    current = [None] * n_envs  # per slot: (episode index, obs list, actions, rewards)
    obs = np.zeros((n_envs,) + envs[0].observation_space.shape)

    def launch(slot):
        nonlocal launched
        o, _ = envs[slot].reset(seed=seed + launched)
        obs[slot] = o
        current[slot] = (launched, [o], [], [], [])
        launched += 1

    def more():
        return started_steps < steps and (max_episodes is None or launched < max_episodes)

    for slot in range(n_envs):
        if more():
            launch(slot)
    bar = progress_bar(total=steps if max_episodes is None else None,
                       desc=f"collect {task.name}", unit="step", show=progress)
    def finish(slot, terminated):
        index, observations, acts, rewards, ends = current[slot]
        finished[index] = {
            "observations": np.asarray(observations), "actions": np.asarray(acts),
            "rewards": np.asarray(rewards), "terminations": np.asarray(ends),
            "truncations": np.asarray([False] * (len(ends) - 1) + [not terminated]),
            "seed": seed + index,
        }
        current[slot] = None

    while any(c is not None for c in current):
        active = [s for s in range(n_envs) if current[s] is not None]
        actions = behavior.act(obs[active], rng)
        for slot, action in zip(active, actions):
            if max_episodes is None and started_steps >= steps:
                break  # the budget is spent
            o, r, terminated, truncated, _ = envs[slot].step(action)
            index, observations, acts, rewards, ends = current[slot]
            observations.append(o)
            acts.append(action)
            rewards.append(r)
            ends.append(terminated)
            obs[slot] = o
            started_steps += 1
            bar.update(1)
            if terminated or truncated:
                finish(slot, terminated)
                if more():
                    launch(slot)
        if max_episodes is None and started_steps >= steps:
            for slot in range(n_envs):  # cut what still runs; drop what has not stepped
                if current[slot] is not None and current[slot][2]:
                    finish(slot, terminated=False)
                current[slot] = None
    bar.close()
    return [finished[i] for i in sorted(finished)]


def mean_return(task: Task, behavior, episodes=100, seed=0, n_envs=16):
    """Mean and std of the undiscounted return of `behavior` over episodes seed..seed+n-1."""
    runs = collect_episodes(task, behavior, float("inf"), seed, n_envs, progress=False,
                            max_episodes=episodes)
    returns = np.array([run["rewards"].sum() for run in runs])
    return float(returns.mean()), float(returns.std())


def default_dataset_id(task: Task, behavior_name):
    """The id a build writes: the task's local id when the behaviour is the task's own
    quality, else one that says what the data holds (dtmem/hopper/random-v0)."""
    if behavior_name == task.quality:
        return task.local_id
    namespace = task.local_id.rsplit("/", 1)[0]
    return f"{namespace}/{Path(behavior_name).stem}-v0"


def check_new_dataset_id(dataset_id, task: Task):
    """A build's id is a Minari id (namespace/name-vN) that no other task reads as its own
    dataset (a hopper build named dtmem/walker2d/expert-v0 would shadow walker2d's)."""
    from minari.dataset.minari_dataset import parse_dataset_id

    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError):  # TypeError: Minari's parser on an id without -vN
        raise UserError(f"--dataset {dataset_id!r} is not a Minari id; give one of the form "
                        "namespace/name-v0, e.g. dtmem/hopper/random-v0") from None
    owner = next((other for other in all_tasks().values() if other.env_id != task.env_id
                  and dataset_id in (other.local_id, other.remote_id)), None)
    if owner:
        raise UserError(f"--dataset {dataset_id} is the dataset of {owner.name}, another env; "
                        f"give an id of {task.env_id}'s own")


def build_dataset(task: Task, behavior_name=None, steps=1_000_000, seed=0, n_envs=16,
                  overwrite=False, progress=True, dataset_id=None):
    """Collect episodes with a behaviour policy (default: the one of the task's quality)
    and write them as a Minari dataset (default id: default_dataset_id). Returns it."""
    behavior_name = behavior_name or task.quality
    dataset_id = dataset_id or default_dataset_id(task, behavior_name)
    minari = _minari()
    for name, value in (("steps", steps), ("envs", n_envs)):
        check_value(name, value)
    check_seeds(seed, steps)  # at most one episode per step
    check_new_dataset_id(dataset_id, task)
    try:
        where = minari.storage.get_dataset_path(dataset_id)  # makes Minari's root folder
    except OSError as e:
        raise UserError(f"cannot make Minari's dataset folder: {e.strerror}; set "
                        "MINARI_DATASETS_PATH to a writable folder") from None
    ensure_writable(where / "data" / "main_data.hdf5")
    if is_local(dataset_id) and not overwrite:
        problem = dataset_problem(dataset_id)
        raise UserError(f"dataset {dataset_id} already exists"
                        + (f" but is incomplete or corrupt ({problem})" if problem else "")
                        + "; pass --overwrite to rebuild it")
    env = make_env(task)
    behavior = make_behavior(behavior_name, task, env.observation_space, env.action_space)
    episodes = collect_episodes(task, behavior, steps, seed, n_envs, progress)
    from minari.data_collector import EpisodeBuffer

    # infos as Minari's own collector writes them (an empty dict), so episodes print.
    buffers = [EpisodeBuffer(id=i, infos={}, **ep) for i, ep in enumerate(episodes)]
    description = (f"dtmem local build: {len(buffers)} episodes ({steps} steps) of "
                   f"{task.env_id} by the behaviour policy {behavior_name!r}, {n_envs} envs "
                   f"in lockstep, episode i reset with seed {seed} + i; the episodes running "
                   f"when the step budget ran out are cut and marked truncated. Reference "
                   f"returns: {task.ref_source} ({task.ref_min}, {task.ref_max}). Built by "
                   f"dtmem {__version__} at commit {git_commit()}; there is no public code "
                   "permalink and no contact e-mail for a local build.")
    import gymnasium
    import mujoco

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Minari nags about author e-mail
        with staged_dataset(dataset_id):
            minari.create_dataset_from_buffers(
                dataset_id, buffers, env=env, eval_env=task.env_id,
                algorithm_name=behavior_algorithm(behavior_name), author="dtmem",
                author_email=None, code_permalink=None, description=description,
                ref_min_score=task.ref_min, ref_max_score=task.ref_max,
                requirements=[f"mujoco>={mujoco.__version__}",
                              f"gymnasium>={gymnasium.__version__}"])
    return load_local(dataset_id)


def behavior_algorithm(name):
    """Minari's algorithm_name of a behaviour policy: uniform random actions, or one of
    dtmem's Stable-Baselines3 PPO policies (data/policies/, or a policy .npz)."""
    return "random" if name == "random" else "sb3/PPO"


@contextmanager
def staged_dataset(dataset_id):
    """Minari writes the dataset into a private root beside the real one; only a finished
    dataset is moved into place (replacing an old one only then), so a build that is
    killed or runs out of space leaves no dataset that looks present. A staging folder of
    a killed build is removed by the next write."""
    root = _minari().storage.get_dataset_path()
    clean_stale_temporaries(root)
    staging = root / f"{TMP_PREFIX}{os.getpid()}-staging"
    before = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging)
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise UserError(f"no space left on the disk building {dataset_id}; nothing was "
                        "written, free some space and run again") from None
    else:
        target = root / dataset_id
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / dataset_id, target)
        for meta in staging.rglob("namespace_metadata.json"):  # Minari's namespace files
            placed = root / meta.relative_to(staging)
            if not placed.exists():
                shutil.copyfile(meta, placed)
    finally:
        os.environ.pop("MINARI_DATASETS_PATH") if before is None else os.environ.update(
            MINARI_DATASETS_PATH=before)
        shutil.rmtree(staging, ignore_errors=True)
