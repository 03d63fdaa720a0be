"""PPO behaviour policies (Stable-Baselines3, the `collect` extra), exported as numpy
MLPPolicy files (dtmem/behavior.py) that datasets are collected with.

Every `checkpoint_every` env steps a run writes <out>/<Env>/step_<N>/ with
  model.zip, vecnormalize.pkl   SB3 state, for resuming
  policy.npz                    plain-numpy MLPPolicy, what datasets use
  eval.json                     deterministic return of policy.npz over fixed-seed episodes
and rewrites <out>/<Env>/progress.csv from all checkpoints. A checkpoint directory is
built under a temporary name and renamed into place, so it is either complete or absent.
"""

import csv
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from dtmem.behavior import MLPPolicy
from dtmem.errors import UserError
from dtmem.tasks import EnvSpec, all_envs


# Defaults from rl-baselines3-zoo hyperparams/ppo.yml. Its "mujoco-defaults" entry (Ant-v4,
# 2e6 steps; commented out for Hopper/Walker2d/HalfCheetah) is SB3's default PPO +
# VecNormalize: 2048-step rollouts, minibatch 64, 10 epochs, lr 3e-4, gamma 0.99, GAE 0.95,
# clip 0.2, 64x64 tanh. The zoo's per-task "Tuned" entries (1 env, lr 2e-5..1e-4, batch
# 32-64, 5-20 epochs, 256x256 ReLU, log_std_init -2) run at ~300-600 steps/s on one core
# here, because SB3's cost is per gradient step, and a quick 8-env port of the Hopper one
# with lr 3e-4 learned far worse than the defaults. Changes from the defaults, measured on
# one core (200-400k-step trial runs on Hopper and HalfCheetah):
#   - 8 envs x 250 steps instead of 1 x 2048: ~8x fewer policy forward calls while
#     collecting, and 2000-step rollouts so checkpoints fall exactly on multiples of 50k;
#   - 256x256 tanh nets (zoo tuned size) with minibatch 125 (16 per epoch = 160 gradient
#     steps per rollout, half the defaults' 320): learned as fast per env step as
#     64x64/minibatch 64 at the same speed (~1.1k steps/s with both cores busy, ~1.5-2k
#     alone), and more capacity for Ant/HalfCheetah.
# Ant-v5 keeps its default 105-dim observation (with contact forces).
@dataclass
class PPOSettings:
    """PPO for one env; its [behavior] table in envs/<env>.toml overrides any field."""

    steps: int = 1_000_000
    """env steps a run trains for"""
    n_envs: int = 8
    """training envs stepped in lockstep"""
    n_steps: int = 250
    """steps per env per rollout"""
    batch_size: int = 125
    """minibatch size"""
    n_epochs: int = 10
    """passes over each rollout"""
    learning_rate: float = 3e-4
    """constant: SB3's schedules would restart at every learn() chunk"""
    gamma: float = 0.99
    """discount, also VecNormalize's for scaling rewards"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_range: float = 0.2
    """PPO's ratio clip"""
    ent_coef: float = 0.0
    """entropy bonus"""
    vf_coef: float = 0.5
    """value loss weight"""
    max_grad_norm: float = 0.5
    """gradient-norm clip"""
    net: list[int] = field(default_factory=lambda: [256, 256])
    """hidden sizes of the actor and of the (separate) critic"""
    activation: str = "tanh"
    """tanh or relu"""
    log_std_init: float = 0.0
    """initial log std of the Gaussian actions"""
    ortho_init: bool = True
    """SB3's orthogonal initialisation"""

    @classmethod
    def for_env(cls, env: EnvSpec):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(env.behavior) - known)
        if unknown:
            raise UserError(f"{env.path}: [behavior] has no setting {', '.join(unknown)}; "
                            f"settings: {', '.join(sorted(known))}")
        return cls(**env.behavior)


@dataclass
class PPORun:
    """Where one env's PPO run goes and how its checkpoints are evaluated."""

    env: str = "Hopper-v5"
    """Gymnasium env id of one of envs/*.toml"""
    out: str = "runs/behavior"
    """output root; checkpoints go to <out>/<env>/step_<N>/"""
    steps: int | None = None
    """total env steps, counting those before a resume (None: the env's [behavior] steps)"""
    checkpoint_every: int = 50_000
    """env steps between checkpoints (save + export + eval)"""
    seed: int = 0
    """seeds PPO and the training envs"""
    resume: bool = True
    """continue from the latest complete checkpoint in <out>/<env> if there is one"""
    eval_episodes: int = 10
    """episodes per evaluation of the exported policy"""
    eval_seed: int = 10_000
    """reset seed of the first evaluation episode; episode i uses eval_seed + i"""
    eval_max_steps: int = 1000
    """step limit per evaluation episode"""


def run_dir(out, env_id) -> Path:
    return Path(out) / env_id


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (incomplete ones only exist under a .tmp name)."""
    found = [(int(d.name.removeprefix("step_")), d) for d in folder.glob("step_*")
             if d.name.removeprefix("step_").isdigit()]
    return sorted(found)


def checkpoint_policy(folder: Path, steps) -> Path:
    return folder / f"step_{steps}" / "policy.npz"


def read_progress(folder: Path) -> list[dict]:
    """progress.csv's rows, oldest first: steps, mean_return, std_return, wall_seconds."""
    path = folder / "progress.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return [{"steps": int(r["steps"]), "mean_return": float(r["mean_return"]),
                 "std_return": float(r["std_return"]), "wall_seconds": float(r["wall_seconds"])}
                for r in csv.DictReader(f)]


def write_progress(folder: Path):
    """Rebuild progress.csv from every checkpoint's eval.json, so it can never disagree
    with them."""
    rows = [json.loads((d / "eval.json").read_text()) for _, d in checkpoints(folder)]
    tmp = folder / ".progress.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["steps", "mean_return", "std_return", "wall_seconds"])
        for r in rows:
            writer.writerow([r["steps"], f"{r['mean_return']:.2f}", f"{r['std_return']:.2f}",
                             f"{r['wall_seconds']:.1f}"])
    os.replace(tmp, folder / "progress.csv")


def export_policy(model, venv, meta) -> MLPPolicy:
    """Copy SB3's actor (mlp_extractor.policy_net + action_net + log_std) into an MLPPolicy."""
    actor = model.policy
    linears = [m for m in actor.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
    weights = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
               for m in linears + [actor.action_net]]
    space = model.action_space
    return MLPPolicy(weights=weights, log_std=actor.log_std.detach().numpy().copy(),
                     obs_mean=venv.obs_rms.mean.copy(), obs_var=venv.obs_rms.var.copy(),
                     action_low=space.low, action_high=space.high,
                     activation=meta["activation"], obs_clip=venv.clip_obs,
                     obs_eps=venv.epsilon, meta=meta, deterministic=True)


def export_error(model, venv, policy: MLPPolicy, raw_obs) -> float:
    """Max |SB3 deterministic action - numpy action| on the same observations."""
    sb3_actions, _ = model.predict(venv.normalize_obs(raw_obs), deterministic=True)
    ours = policy.act(raw_obs, np.random.default_rng(0))
    return float(np.abs(sb3_actions - ours).max())


def evaluate(policy: MLPPolicy, run: PPORun):
    """Deterministic returns on raw env rewards, and the observations visited."""
    import gymnasium as gym

    env = gym.make(run.env)
    rng = np.random.default_rng(0)  # unused by a deterministic policy, required by act()
    returns, seen = [], []
    for i in range(run.eval_episodes):
        obs, _ = env.reset(seed=run.eval_seed + i)
        total = 0.0
        for _ in range(run.eval_max_steps):
            seen.append(obs)
            obs, reward, terminated, truncated, _ = env.step(policy.act(obs[None], rng)[0])
            total += float(reward)
            if terminated or truncated:
                break
        returns.append(total)
    env.close()
    return returns, np.array(seen)


def _sb3():
    try:
        import stable_baselines3
    except ImportError:
        raise UserError("training behaviour policies needs Stable-Baselines3: "
                        "pip install -e '.[collect]'") from None
    return stable_baselines3


def _open_run(sb3, run: PPORun, settings: PPOSettings, folder: Path, done):
    """(model, venv, wall seconds so far): the latest checkpoint's, or a new run's."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    if done:
        steps_done, latest = done[-1]
        # Fresh env seeds on resume, so that the first run's episodes are not replayed.
        envs = make_vec_env(run.env, n_envs=settings.n_envs, seed=run.seed + steps_done)
        venv = VecNormalize.load(str(latest / "vecnormalize.pkl"), envs)
        venv.training = True
        model = sb3.PPO.load(latest / "model.zip", env=venv, device="cpu")
        print(f"{run.env}: resumed from {latest} ({model.num_timesteps} steps)")
        return model, venv, json.loads((latest / "eval.json").read_text())["wall_seconds"]
    # gamma must match PPO's: VecNormalize scales rewards by the std of the discounted return.
    venv = VecNormalize(make_vec_env(run.env, n_envs=settings.n_envs, seed=run.seed),
                        norm_obs=True, norm_reward=True, clip_obs=10.0, gamma=settings.gamma)
    activations = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}
    model = sb3.PPO(
        "MlpPolicy", venv, n_steps=settings.n_steps, batch_size=settings.batch_size,
        n_epochs=settings.n_epochs, learning_rate=settings.learning_rate,
        gamma=settings.gamma, gae_lambda=settings.gae_lambda, clip_range=settings.clip_range,
        ent_coef=settings.ent_coef, vf_coef=settings.vf_coef,
        max_grad_norm=settings.max_grad_norm,
        policy_kwargs=dict(net_arch=dict(pi=settings.net, vf=settings.net),
                           activation_fn=activations[settings.activation],
                           log_std_init=settings.log_std_init, ortho_init=settings.ortho_init),
        seed=run.seed, device="cpu", verbose=0)
    print(f"{run.env}: new run in {folder} with {json.dumps(asdict(settings))}")
    return model, venv, 0.0


def _save_checkpoint(folder: Path, model, venv, policy: MLPPolicy, stats):
    steps = stats["steps"]
    tmp = folder / f".step_{steps}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save(tmp / "model.zip")
    venv.save(tmp / "vecnormalize.pkl")
    policy.save(tmp / "policy.npz")
    (tmp / "eval.json").write_text(json.dumps(stats, indent=1))
    os.replace(tmp, folder / f"step_{steps}")  # the checkpoint appears complete or not at all
    write_progress(folder)


def train(run: PPORun) -> Path:
    """Train (or resume) PPO on run.env to run.steps env steps; returns the run's folder."""
    env = next((e for e in all_envs().values() if e.env_id == run.env), None)
    if env is None:
        raise UserError(f"--env {run.env} has no envs/*.toml; choose one of "
                        f"{', '.join(e.env_id for e in all_envs().values())}")
    settings = PPOSettings.for_env(env)
    settings = replace(settings, steps=run.steps or settings.steps)
    sb3 = _sb3()
    folder = run_dir(run.out, run.env)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step_*.tmp"):  # left by an interrupted checkpoint
        shutil.rmtree(stale)
    done = checkpoints(folder)
    if done:
        write_progress(folder)  # in case a run stopped between a checkpoint and its row
        if not run.resume:
            raise UserError(f"{folder} already has checkpoints: pass --resume or choose "
                            "another --out")
        if done[-1][0] >= settings.steps:
            print(f"{run.env}: already trained to {done[-1][0]} >= {settings.steps} steps "
                  f"in {folder}; nothing to do")
            return folder
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per run; more threads would fight the env loop
    try:
        _train(sb3, run, settings, folder, done)
    finally:
        torch.set_num_threads(threads)
    return folder


def _train(sb3, run: PPORun, settings: PPOSettings, folder: Path, done):
    model, venv, wall_before = _open_run(sb3, run, settings, folder, done)
    start, start_steps = time.time(), model.num_timesteps
    while model.num_timesteps < settings.steps:
        every = run.checkpoint_every
        target = min(settings.steps, (model.num_timesteps // every + 1) * every)
        model.learn(target - model.num_timesteps, reset_num_timesteps=False)  # whole rollouts
        steps = model.num_timesteps
        wall = wall_before + time.time() - start
        meta = dict(env_id=run.env, steps=steps, seed=run.seed, activation=settings.activation,
                    hparams=asdict(settings), sb3_version=sb3.__version__,
                    torch_version=torch.__version__)
        policy = export_policy(model, venv, meta)
        returns, seen = evaluate(policy, run)
        policy.meta.update(eval_return_mean=float(np.mean(returns)),
                           eval_return_std=float(np.std(returns)),
                           eval_episodes=run.eval_episodes, eval_seed=run.eval_seed)
        # The npz must act exactly as SB3 did: check on visited states, not only on zeros.
        pick = np.random.default_rng(steps).choice(len(seen), min(64, len(seen)), replace=False)
        diff = export_error(model, venv, policy, seen[pick])
        if diff >= 1e-5:
            raise UserError(f"exported policy disagrees with SB3 (max abs diff {diff:.2e}); "
                            "not saving a broken checkpoint")
        _save_checkpoint(folder, model, venv, policy, dict(
            steps=steps, mean_return=float(np.mean(returns)),
            std_return=float(np.std(returns)), wall_seconds=wall, returns=returns,
            export_max_abs_diff=diff))
        episodes = [e["r"] for e in model.ep_info_buffer]
        train_return = np.mean(episodes) if episodes else float("nan")
        speed = (steps - start_steps) / (time.time() - start)
        print(f"{run.env} step {steps:>8d}  eval {np.mean(returns):8.1f} +- "
              f"{np.std(returns):6.1f}  train {train_return:8.1f}  {speed:5.0f} steps/s  "
              f"export diff {diff:.1e}  wall {wall:6.0f}s", flush=True)
    print(f"{run.env}: finished {model.num_timesteps} steps; progress in "
          f"{folder / 'progress.csv'}")
