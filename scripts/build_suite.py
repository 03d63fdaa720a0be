"""Regenerate the eight-task suite end to end: behaviour policies -> reference returns ->
Minari datasets -> Decision Transformers -> results. Finished stages are skipped and
interrupted ones resume, so the job can span sessions.

    python scripts/build_suite.py                       # everything
    python scripts/build_suite.py --envs hopper --stages policies,references,datasets
    python scripts/build_suite.py --tasks hopper-medium --stages dts,results

Stages, per env or task:
  policies    PPO (scripts/train_behavior.py, needs the `collect` extra) unless its run is
              complete; then expert = the checkpoint with the best 10-episode return,
              medium = an earlier one at 1/3 to 1/2 of it (closest to 0.4x); both are
              re-evaluated over 100 episodes and shipped in data/policies/.
  references  ref_min = mean return of uniform random actions, ref_max = of the expert
              policy (stochastic, as it collects data), 100 episodes each; written to
              envs/<env>.toml with the target return (the expert reference, rounded).
  datasets    `dtmem data build` of each task with its behaviour policy.
  dts         one DT per task, the same budget for all, shipped in data/checkpoints/.
  results     recompute, window and full rollouts of every shipped DT -> results/suite.json.
"""

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dtmem.behavior import MLPPolicy, RandomPolicy
from dtmem.checkpoints import SHIPPED_DIR, load_model, read_checkpoint
from dtmem.data import (POLICIES_DIR, Episodes, build_dataset, find_dataset, is_local,
                        mean_return)
from dtmem.files import atomic_path, provenance, write_json
from dtmem.report import embed_in_readme
from dtmem.rollout import results_file, summarize, timed_rollout
from dtmem.stats import bootstrap_ci
from dtmem.tasks import ENVS_DIR, ROOT, all_tasks, default_tasks, make_env
from dtmem.train import TrainConfig, train

ENV_IDS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5",
           "ant": "Ant-v5"}


@dataclass
class SuiteConfig:
    """What the shipped suite is built with."""

    ppo_steps: int = 1_000_000
    """PPO env steps per env (Ant: twice this, as the RL zoo trains it)"""
    reference_episodes: int = 100
    """episodes behind each reference return and each policy's shipped return"""
    reference_seed: int = 2_000_000
    """reset seed of the first reference episode"""
    dataset_steps: int = 1_000_000
    """env steps per dataset, as Minari's MuJoCo datasets"""
    dataset_seed: int = 1_000_000
    """reset seed of a dataset's first episode (rollouts use seeds from 0)"""
    dt_steps: int = 10_000
    """DT updates per task: a tenth of the field's 100k, what our CPUs afford (~40 min)"""
    result_episodes: int = 50
    """episodes per policy in the results file"""


def policy_path(env, quality):
    return POLICIES_DIR / f"{env}-{quality}.npz"


def policies_shipped(env):
    paths = [policy_path(env, quality) for quality in ("medium", "expert")]
    return all(p.exists() and "eval100_mean" in MLPPolicy.load(p).meta for p in paths)


def stage_policies(env, cfg: SuiteConfig, runs: Path):
    if policies_shipped(env):
        print(f"policies {env}: shipped")
        return
    env_id = ENV_IDS[env]
    steps = cfg.ppo_steps * (2 if env == "ant" else 1)
    progress = runs / env_id / "progress.csv"
    rows = list(csv.DictReader(progress.open())) if progress.exists() else []
    if not rows or int(rows[-1]["steps"]) < steps:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "train_behavior.py"), "--env",
                        env_id, "--out", str(runs), "--steps", str(steps)], check=True)
        rows = list(csv.DictReader(progress.open()))
    returns = np.array([float(r["mean_return"]) for r in rows])
    best = int(returns.argmax())
    if best == 0:
        raise SystemExit(f"{env}: PPO's first checkpoint is its best; no medium policy")
    earlier = returns[:best]
    in_band = (earlier >= returns[best] / 3) & (earlier <= returns[best] / 2)
    candidates = np.flatnonzero(in_band) if in_band.any() else np.arange(best)
    medium = int(candidates[np.abs(earlier[candidates] - 0.4 * returns[best]).argmin()])
    task = default_tasks()[env]
    for quality, row in (("expert", best), ("medium", medium)):
        step = int(rows[row]["steps"])
        policy = MLPPolicy.load(runs / env_id / f"step_{step}" / "policy.npz")
        mean, std = mean_return(task, policy, cfg.reference_episodes, cfg.reference_seed)
        policy.meta.update(ppo_steps=step, eval10_mean=float(returns[row]), eval100_mean=mean,
                           eval100_std=std, eval100_seed=cfg.reference_seed,
                           selection=f"{quality} of {progress.name}, see build_suite.py")
        policy.save(policy_path(env, quality))
        shutil.copy(progress, POLICIES_DIR / f"{env}-progress.csv")
        print(f"policies {env}: {quality} = PPO step {step}, return {mean:.0f} +- {std:.0f}")


def stage_references(env, cfg: SuiteConfig):
    spec_path = ENVS_DIR / f"{env}.toml"
    text = spec_path.read_text()
    if "dtmem" in tomllib.loads(text)["reference"]:
        print(f"references {env}: recorded")
        return
    task = default_tasks()[env]
    space = make_env(task).action_space
    random_mean, _ = mean_return(task, RandomPolicy(space.low, space.high),
                                 cfg.reference_episodes, cfg.reference_seed)
    expert = MLPPolicy.load(policy_path(env, "expert"))
    expert_mean, _ = mean_return(task, expert, cfg.reference_episodes, cfg.reference_seed)
    target = round(expert_mean, -2)
    block = (f"# Measured by scripts/build_suite.py: mean returns over {cfg.reference_episodes} "
             f"episodes (reset seeds from\n# {cfg.reference_seed}) of uniform random actions "
             "and of the shipped expert policy.\n[reference.dtmem]\n"
             f"random = {random_mean:.3f}\nexpert = {expert_mean:.3f}\n"
             f"episodes = {cfg.reference_episodes}\n\n")
    text = text.replace("# D4RL's reference returns", block + "# D4RL's reference returns")
    # Both qualities are evaluated at the expert's return, as the DT paper evaluated
    # medium and expert data at one expert-level target per env.
    text = re.sub(r"^# Target returns:.*\n(#.*\n)*", "# Target return: the dtmem expert "
                  "reference, rounded to 100.\n", text, flags=re.M)
    text = re.sub(r"^target_return = .*$", f"target_return = {target:.1f}", text, flags=re.M)
    with atomic_path(spec_path) as tmp:
        tmp.write_text(text)
    all_tasks.cache_clear()
    default_tasks.cache_clear()
    print(f"references {env}: random {random_mean:.1f}, expert {expert_mean:.1f}")


def stage_datasets(task, cfg: SuiteConfig):
    if is_local(task.local_id):
        print(f"dataset {task.local_id}: present")
        return
    build_dataset(task, task.quality, cfg.dataset_steps, seed=cfg.dataset_seed)


def stage_dts(task, cfg: SuiteConfig, runs: Path):
    shipped = SHIPPED_DIR / f"{task.name}.pt"
    if shipped.exists():
        print(f"dt {task.name}: shipped")
        return
    work = runs / "dt" / f"{task.name}.pt"
    train(TrainConfig(task=task.name, steps=cfg.dt_steps, eval_every=2000), work,
          resume=work.exists())
    payload = read_checkpoint(work)
    payload["training_state"] = None  # optimiser state is for resuming, not for shipping
    with atomic_path(shipped) as tmp:
        torch.save(payload, tmp)


def stage_results(tasks, cfg: SuiteConfig, out: Path, readme=None):
    new_rows = {}
    for task in tasks:
        if not (SHIPPED_DIR / f"{task.name}.pt").exists():
            continue
        model, payload = load_model(SHIPPED_DIR / f"{task.name}.pt")
        dataset, dataset_id = find_dataset(task)
        data_returns = Episodes.from_minari(dataset).returns()
        scores = task.normalise(data_returns)
        row = {"dataset_id": dataset_id, "dataset_episodes": len(data_returns),
               "dataset_mean_return": float(data_returns.mean()),
               "dataset_mean_score": float(scores.mean()),
               "dataset_score_ci95": list(bootstrap_ci(scores)),
               "dt_steps": payload["steps"],
               "dt_wall_seconds": payload["provenance"].get("wall_seconds"),
               "target_return": task.target_return,
               "reference": {"min": task.ref_min, "max": task.ref_max,
                             "source": task.ref_source}, "policies": {},
               "provenance": provenance(suite_config=asdict(cfg))}
        for policy in ("recompute", "window", "full"):
            runs, _, wall = timed_rollout(model, payload["state_mean"], payload["state_std"],
                                          task, policy, cfg.result_episodes, seed=0,
                                          progress=True)
            row["policies"][policy] = results_file(runs, summarize(runs),
                                                   wall_seconds=round(wall, 1))
        new_rows[task.name] = row
    # Tasks not rerun keep their rows (each row carries its own provenance). Read only now,
    # so that runs for other tasks that finished meanwhile keep theirs too.
    results = json.loads(out.read_text())["tasks"] if out.exists() else {}
    results.update(new_rows)
    results = {name: results[name] for name in all_tasks() if name in results}
    write_json(out, {"seeds": "rollouts: episode i uses env seed i", "tasks": results})
    table = suite_table(results, cfg)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if readme is not None:
        embed_in_readme(readme, "suite-table", table, "python scripts/build_suite.py "
                        "--stages results", os.path.relpath(out, ROOT))


def suite_table(results, cfg: SuiteConfig):
    """Markdown: dataset vs DT normalised scores (mean [95% CI]) per task and policy."""
    def cell(mean, ci):
        return f"{mean:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"

    lines = ["| task | dataset return | dataset score | DT recompute | DT window | DT full | "
             "DT / dataset (recompute) | DT steps | train min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        policies = {p: r["summary"] for p, r in row["policies"].items()}
        ratio = policies["recompute"]["mean_score"] / row["dataset_mean_score"]
        wall = row["dt_wall_seconds"]
        lines.append(
            f"| {name} | {row['dataset_mean_return']:.0f} | "
            f"{cell(row['dataset_mean_score'], row['dataset_score_ci95'])} | "
            + " | ".join(cell(policies[p]["mean_score"], policies[p]["score_ci95"])
                         for p in ("recompute", "window", "full"))
            + f" | {100 * ratio:.0f}% | {row['dt_steps']} | "
            f"{'?' if wall is None else f'{wall / 60:.0f}'} |")
    lines.append("")
    lines.append(f"Normalised score = 100 (R - random) / (expert - random) with dtmem's measured "
                 f"reference returns; {cfg.result_episodes} episodes per DT cell (env seeds "
                 "0..n-1) at the task's target return, 95% bootstrap CIs; last checkpoint, "
                 "not best.")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default=",".join(ENV_IDS), help="comma-separated envs")
    parser.add_argument("--tasks", help="comma-separated tasks (default: all of --envs)")
    parser.add_argument("--stages", default="policies,references,datasets,dts,results")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "suite"),
                        help="working files (PPO runs, DT checkpoints in training)")
    parser.add_argument("--results", default=str(ROOT / "results" / "suite.json"))
    args = parser.parse_args()
    cfg, runs = SuiteConfig(), Path(args.runs)
    envs = args.envs.split(",")
    stages = args.stages.split(",")
    for env in envs:
        if "policies" in stages:
            stage_policies(env, cfg, runs / "behavior")
        if "references" in stages:
            stage_references(env, cfg)
    names = args.tasks.split(",") if args.tasks else [
        t.name for t in all_tasks().values() if t.env in envs]
    tasks = [all_tasks()[name] for name in names]
    for task in tasks:
        if "datasets" in stages:
            stage_datasets(task, cfg)
    for task in tasks:
        if "dts" in stages:
            stage_dts(task, cfg, runs)
    if "results" in stages:
        stage_results(tasks, cfg, Path(args.results), ROOT / "README.md")


if __name__ == "__main__":
    main()
