"""Train a PPO behaviour policy on one MuJoCo task and export numpy checkpoints.

Every --checkpoint-every env steps this writes <out>/<Env>/step_<N>/ with
  model.zip, vecnormalize.pkl   SB3 state, for --resume
  policy.npz                    plain-numpy MLPPolicy (dtmem.behavior), what datasets use
  eval.json                     deterministic return of policy.npz over 10 fixed-seed episodes
and rewrites <out>/<Env>/progress.csv from all checkpoints. A checkpoint directory is
built under a temporary name and renamed into place, so it is either complete or absent.

"expert" = best checkpoint in progress.csv, "medium" = an earlier one at 1/3-1/2 of its return.

    python scripts/train_behavior.py --env Hopper-v5 --out /work/runs/behavior
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, fields

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from dtmem.behavior import MLPPolicy


@dataclass
class Config:
    env: str = "Hopper-v5"
    """Gymnasium env id; must be a key of HPARAMS."""
    out: str = "runs/behavior"
    """Output root; checkpoints go to <out>/<env>/step_<N>/."""
    steps: int = 1_000_000
    """Total env steps to train for (counting steps done before a resume)."""
    checkpoint_every: int = 50_000
    """Env steps between checkpoints (save + export + eval)."""
    seed: int = 0
    """Seed for PPO and the training envs."""
    resume: bool = True
    """Continue from the latest complete checkpoint in <out>/<env> if there is one."""
    eval_episodes: int = 10
    """Episodes per evaluation of the exported policy."""
    eval_seed: int = 10_000
    """Reset seed of the first evaluation episode; episode i uses eval_seed + i."""
    eval_max_steps: int = 1000
    """Step limit per evaluation episode."""


# PPO settings from rl-baselines3-zoo hyperparams/ppo.yml. Its "mujoco-defaults" entry (Ant-v4, 2e6 steps;
# commented out for Hopper/Walker2d/HalfCheetah) is SB3's default PPO + VecNormalize: 2048-step
# rollouts, minibatch 64, 10 epochs, lr 3e-4, gamma 0.99, GAE 0.95, clip 0.2, 64x64 tanh.
# The zoo's per-task "Tuned" entries (1 env, lr 2e-5..1e-4, batch 32-64, 5-20 epochs, 256x256 ReLU,
# log_std_init -2) run at ~300-600 steps/s on one core here, because SB3's cost is per gradient step,
# and a quick 8-env port of the Hopper one with lr 3e-4 learned far worse than the defaults.
# Changes from the defaults, measured on one core (200-400k-step trial runs on Hopper and HalfCheetah):
#   - 8 envs x 250 steps instead of 1 x 2048: ~8x fewer policy forward calls while collecting, and
#     2000-step rollouts so checkpoints fall exactly on multiples of 50k;
#   - 256x256 tanh nets (zoo tuned size) with minibatch 125 (16 per epoch = 160 gradient steps per
#     rollout, half the defaults' 320): learned as fast per env step as 64x64/minibatch 64 at the same
#     speed (~1.1k steps/s with both cores busy, ~1.5-2k alone), and more capacity for Ant/HalfCheetah.
# Ant-v5 keeps its default 105-dim observation (with contact forces); train it with --steps 2000000 as the zoo does.
COMMON = dict(
    n_envs=8,
    n_steps=250,
    batch_size=125,
    n_epochs=10,
    learning_rate=3e-4,
    gamma=0.99,
    gae_lambda=0.95,
    clip_range=0.2,
    ent_coef=0.0,
    vf_coef=0.5,
    max_grad_norm=0.5,
    net=[256, 256],  # separate actor and critic nets of this shape
    activation="tanh",
    log_std_init=0.0,
    ortho_init=True,
)
HPARAMS = {env: dict(COMMON) for env in ["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5", "Ant-v5"]}
# Ant with unit initial action noise never learned (return -8 after 2M steps): 8 actuators
# at std 1 pay a control cost of about 3 per step against a healthy reward of 1, so PPO
# learned to fall over at once. The zoo's tuned entries start at log_std -2 (std 0.14).
HPARAMS["Ant-v5"]["log_std_init"] = -2.0
ACTIVATION_FNS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}


def parse_args() -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    cfg = Config(**vars(p.parse_args()))
    if cfg.env not in HPARAMS:
        p.error(f"--env {cfg.env} has no PPO settings; choose one of {', '.join(HPARAMS)}")
    return cfg


def export_policy(model: PPO, venv: VecNormalize, meta: dict) -> MLPPolicy:
    """Copy SB3's actor (mlp_extractor.policy_net + action_net + log_std) into an MLPPolicy."""
    pol = model.policy
    linears = [m for m in pol.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)] + [pol.action_net]
    weights = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linears]
    space = model.action_space
    return MLPPolicy(
        weights=weights,
        log_std=pol.log_std.detach().numpy().copy(),
        obs_mean=venv.obs_rms.mean.copy(),
        obs_var=venv.obs_rms.var.copy(),
        action_low=space.low,
        action_high=space.high,
        activation=meta["activation"],
        obs_clip=venv.clip_obs,
        obs_eps=venv.epsilon,
        meta=meta,
        deterministic=True,
    )


def check_export(model: PPO, venv: VecNormalize, policy: MLPPolicy, raw_obs: np.ndarray) -> float:
    """Max |SB3 deterministic action - numpy action| on the same observations."""
    sb3_actions, _ = model.predict(venv.normalize_obs(raw_obs), deterministic=True)
    ours = policy.act(raw_obs, np.random.default_rng(0))
    return float(np.abs(sb3_actions - ours).max())


def evaluate(policy: MLPPolicy, cfg: Config) -> tuple[list[float], np.ndarray]:
    """Deterministic returns on raw env rewards; also returns the visited observations."""
    env = gym.make(cfg.env)
    rng = np.random.default_rng(0)  # unused by a deterministic policy, required by the interface
    returns, seen = [], []
    for i in range(cfg.eval_episodes):
        obs, _ = env.reset(seed=cfg.eval_seed + i)
        total = 0.0
        for _ in range(cfg.eval_max_steps):
            seen.append(obs)
            obs, reward, terminated, truncated, _ = env.step(policy.act(obs[None], rng)[0])
            total += float(reward)
            if terminated or truncated:
                break
        returns.append(total)
    env.close()
    return returns, np.array(seen)


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first (incomplete ones only exist under a .tmp name)."""
    found = []
    for d in glob.glob(os.path.join(run_dir, "step_*")):
        m = re.fullmatch(r"step_(\d+)", os.path.basename(d))
        if m:
            found.append((int(m.group(1)), d))
    return sorted(found)


def write_progress(run_dir: str) -> None:
    """Rebuild progress.csv from every checkpoint's eval.json, so it can never disagree with them."""
    rows = []
    for _, d in checkpoints(run_dir):
        with open(os.path.join(d, "eval.json")) as f:
            rows.append(json.load(f))
    tmp = os.path.join(run_dir, ".progress.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["steps", "mean_return", "std_return", "wall_seconds"])
        for r in rows:
            w.writerow([r["steps"], f"{r['mean_return']:.2f}", f"{r['std_return']:.2f}", f"{r['wall_seconds']:.1f}"])
    os.replace(tmp, os.path.join(run_dir, "progress.csv"))


# ---------------------------------------------------------------------------------------------
cfg = parse_args()
hp = HPARAMS[cfg.env]
torch.set_num_threads(1)  # one core per run; torch's default thread pool would fight the env loop
run_dir = os.path.join(cfg.out, cfg.env)
os.makedirs(run_dir, exist_ok=True)
for stale in glob.glob(os.path.join(run_dir, ".step_*.tmp")):  # left by an interrupted checkpoint
    shutil.rmtree(stale)
done = checkpoints(run_dir)
if done:
    write_progress(run_dir)  # catch up if we were stopped between a checkpoint and its progress row
if done and not cfg.resume:
    raise SystemExit(f"{run_dir} already has checkpoints: pass --resume or choose another --out")
wall_before = 0.0
if done:
    steps_done, ckpt = done[-1]
    with open(os.path.join(ckpt, "eval.json")) as f:
        wall_before = json.load(f)["wall_seconds"]
    if steps_done >= cfg.steps:
        print(f"{cfg.env}: already trained to {steps_done} >= {cfg.steps} steps in {run_dir}; nothing to do")
        raise SystemExit(0)
    # Fresh env seeds on resume so we do not replay the episodes of the first run.
    venv = VecNormalize.load(os.path.join(ckpt, "vecnormalize.pkl"), make_vec_env(cfg.env, n_envs=hp["n_envs"], seed=cfg.seed + steps_done))
    venv.training = True
    model = PPO.load(os.path.join(ckpt, "model.zip"), env=venv, device="cpu")
    print(f"{cfg.env}: resumed from {ckpt} ({model.num_timesteps} steps)")
else:
    # gamma must match PPO's: VecNormalize scales rewards by the std of the discounted return.
    venv = VecNormalize(make_vec_env(cfg.env, n_envs=hp["n_envs"], seed=cfg.seed), norm_obs=True, norm_reward=True, clip_obs=10.0, gamma=hp["gamma"])
    model = PPO(
        "MlpPolicy",
        venv,
        n_steps=hp["n_steps"],
        batch_size=hp["batch_size"],
        n_epochs=hp["n_epochs"],
        learning_rate=hp["learning_rate"],  # constant: SB3 schedules would restart at every learn() chunk
        gamma=hp["gamma"],
        gae_lambda=hp["gae_lambda"],
        clip_range=hp["clip_range"],
        ent_coef=hp["ent_coef"],
        vf_coef=hp["vf_coef"],
        max_grad_norm=hp["max_grad_norm"],
        policy_kwargs=dict(
            net_arch=dict(pi=hp["net"], vf=hp["net"]),
            activation_fn=ACTIVATION_FNS[hp["activation"]],
            log_std_init=hp["log_std_init"],
            ortho_init=hp["ortho_init"],
        ),
        seed=cfg.seed,
        device="cpu",
        verbose=0,
    )
    print(f"{cfg.env}: new run in {run_dir} with {json.dumps(hp)}")

start = time.time()
start_steps = model.num_timesteps
while model.num_timesteps < cfg.steps:
    target = min(cfg.steps, (model.num_timesteps // cfg.checkpoint_every + 1) * cfg.checkpoint_every)
    model.learn(target - model.num_timesteps, reset_num_timesteps=False)  # rounds up to whole rollouts
    steps = model.num_timesteps
    wall = wall_before + time.time() - start
    train_sps = (steps - start_steps) / (time.time() - start)

    meta = dict(env_id=cfg.env, steps=steps, seed=cfg.seed, activation=hp["activation"], hparams=hp,
                sb3_version=stable_baselines3.__version__, torch_version=torch.__version__)
    policy = export_policy(model, venv, meta)
    returns, seen = evaluate(policy, cfg)
    policy.meta.update(eval_return_mean=float(np.mean(returns)), eval_return_std=float(np.std(returns)),
                       eval_episodes=cfg.eval_episodes, eval_seed=cfg.eval_seed)
    # The npz must act exactly like SB3 did; check on real visited states, not only on zeros.
    sample = seen[np.random.default_rng(steps).choice(len(seen), size=min(64, len(seen)), replace=False)]
    diff = check_export(model, venv, policy, sample)
    if diff >= 1e-5:
        raise SystemExit(f"exported policy disagrees with SB3 (max abs diff {diff:.2e}); not saving a broken checkpoint")

    final = os.path.join(run_dir, f"step_{steps}")
    tmp = os.path.join(run_dir, f".step_{steps}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save(os.path.join(tmp, "model.zip"))
    venv.save(os.path.join(tmp, "vecnormalize.pkl"))
    policy.save(os.path.join(tmp, "policy.npz"))
    stats = dict(steps=steps, mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                 wall_seconds=wall, returns=returns, export_max_abs_diff=diff)
    with open(os.path.join(tmp, "eval.json"), "w") as f:
        json.dump(stats, f, indent=1)
    os.replace(tmp, final)  # atomic: the checkpoint appears complete or not at all
    write_progress(run_dir)

    train_ret = np.mean([e["r"] for e in model.ep_info_buffer]) if model.ep_info_buffer else float("nan")
    print(f"{cfg.env} step {steps:>8d}  eval {np.mean(returns):8.1f} +- {np.std(returns):6.1f}  "
          f"train {train_ret:8.1f}  {train_sps:5.0f} steps/s  export diff {diff:.1e}  wall {wall:6.0f}s", flush=True)

print(f"{cfg.env}: finished {model.num_timesteps} steps; progress in {os.path.join(run_dir, 'progress.csv')}")
