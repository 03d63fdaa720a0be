"""The shipped suite end to end, for every env of envs/*.toml: behaviour policies ->
reference returns -> Minari datasets -> Decision Transformers -> results. Finished stages
are skipped and interrupted ones resume, so the job can span sessions.

Stages, per env or task:
  policies    PPO (dtmem/ppo.py, needs the `collect` extra) unless its run is complete;
              then expert = the checkpoint with the best 10-episode return, medium = an
              earlier one at 1/3 to 1/2 of it (closest to 0.4x); both are re-evaluated
              over 100 episodes and shipped in data/policies/.
  references  random = mean return of uniform random actions, expert = of the expert
              policy (stochastic, as it collects data), 100 episodes each; written to
              envs/<env>.toml as [reference.dtmem] (the target return follows from it).
  datasets    `dtmem data build` of each task with its behaviour policy.
  dts         one DT per task, the same budget for all, shipped in data/checkpoints/.
  results     recompute, window and full cells (dtmem/results.py) of every shipped DT ->
              results/suite.json, with the dataset's own score for comparison.

Each env's policies and references, then each task's dataset and DT, then each task's
results, are jobs of a backend (dtmem/backend.py): with --workers or on Ray, envs and tasks
build side by side. A job runs on one torch thread (the same numbers in every process) in
the driver's folders (Places), so the nodes of a cluster must share the file system.
"""

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tomlkit
import torch

import dtmem.tasks
from dtmem import checkpoints, data, ppo
from dtmem.backend import LocalBackend
from dtmem.behavior import MLPPolicy, RandomPolicy
from dtmem.checkpoints import Checkpoint, read_checkpoint, shipped_path
from dtmem.errors import UserError
from dtmem.files import atomic_path, provenance, relative_to_root, write_json
from dtmem.memory import PolicySpec
from dtmem.report import embed_in_readme
from dtmem.results import run_cell
from dtmem.stats import bootstrap_ci
from dtmem.tasks import all_envs, all_tasks, make_env
from dtmem.train import TrainConfig, train

STAGES = ("policies", "references", "datasets", "dts", "results")
POLICIES = ("recompute", "window", "full")  # the memory policies of the results table


@dataclass
class SuiteConfig:
    """What the shipped suite is built with (PPO's settings are each env's [behavior])."""

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
    return data.POLICIES_DIR / f"{env}-{quality}.npz"


def policies_shipped(env):
    paths = [policy_path(env, quality) for quality in ("medium", "expert")]
    return all(p.exists() and "eval100_mean" in MLPPolicy.load(p).meta for p in paths)


def choose_checkpoints(returns, run):
    """(expert, medium) indices into the checkpoint returns of a PPO run (named in errors)."""
    returns = np.asarray(returns)
    best = int(returns.argmax())
    if best == 0:
        raise UserError(f"{run}: PPO's first checkpoint is its best; there is no medium "
                        "policy; train longer or with other [behavior] settings")
    earlier = returns[:best]
    in_band = (earlier >= returns[best] / 3) & (earlier <= returns[best] / 2)
    candidates = np.flatnonzero(in_band) if in_band.any() else np.arange(best)
    return best, int(candidates[np.abs(earlier[candidates] - 0.4 * returns[best]).argmin()])


def stage_policies(env_name, cfg: SuiteConfig, runs: Path):
    """runs: the PPO runs' output root."""
    if policies_shipped(env_name):
        print(f"policies {env_name}: shipped")
        return
    env = all_envs()[env_name]
    folder = ppo.run_dir(runs, env.env_id)
    rows = ppo.read_progress(folder)
    if not rows or rows[-1]["steps"] < ppo.PPOSettings.for_env(env).steps:
        ppo.train(ppo.PPORun(env=env.env_id, out=str(runs)))
        rows = ppo.read_progress(folder)
    chosen = choose_checkpoints([row["mean_return"] for row in rows], folder)
    for quality, row in zip(("expert", "medium"), (rows[i] for i in chosen)):
        policy = MLPPolicy.load(ppo.checkpoint_policy(folder, row["steps"]))
        mean, std = data.mean_return(env.default_task, policy, cfg.reference_episodes,
                                     cfg.reference_seed)
        policy.meta.update(ppo_steps=row["steps"], eval10_mean=row["mean_return"],
                           eval100_mean=mean, eval100_std=std, eval100_seed=cfg.reference_seed,
                           selection=f"{quality} of progress.csv, see dtmem/suite.py")
        policy.save(policy_path(env_name, quality))
        print(f"policies {env_name}: {quality} = PPO step {row['steps']}, "
              f"return {mean:.0f} +- {std:.0f}")
    shutil.copy(folder / "progress.csv", data.POLICIES_DIR / f"{env_name}-progress.csv")


def record_references(path: Path, random_mean, expert_mean, cfg: SuiteConfig):
    """Add [reference.dtmem] to an env file; tomlkit keeps the file's comments and layout."""
    doc = tomlkit.parse(path.read_text())
    measured = tomlkit.table()
    measured.add(tomlkit.comment("Measured by scripts/build_suite.py: mean returns over "
                                 f"{cfg.reference_episodes} episodes (reset seeds from"))
    measured.add(tomlkit.comment(f"{cfg.reference_seed}) of uniform random actions and of "
                                 "the shipped expert policy."))
    measured.add("random", round(random_mean, 3))
    measured.add("expert", round(expert_mean, 3))
    measured.add("episodes", cfg.reference_episodes)
    doc.setdefault("reference", tomlkit.table(is_super_table=True))["dtmem"] = measured
    with atomic_path(path) as tmp:
        tmp.write_text(tomlkit.dumps(doc))


def stage_references(env_name, cfg: SuiteConfig):
    env = all_envs()[env_name]
    if env.default_task.ref_source == "dtmem":
        print(f"references {env_name}: recorded")
        return
    task = env.default_task
    space = make_env(task).action_space
    random_mean, _ = data.mean_return(task, RandomPolicy(space.low, space.high),
                                      cfg.reference_episodes, cfg.reference_seed)
    expert = MLPPolicy.load(policy_path(env_name, "expert"))
    expert_mean, _ = data.mean_return(task, expert, cfg.reference_episodes, cfg.reference_seed)
    record_references(env.path, random_mean, expert_mean, cfg)
    all_envs.cache_clear()
    print(f"references {env_name}: random {random_mean:.1f}, expert {expert_mean:.1f}, "
          f"target return {all_envs()[env_name].default_task.target_return:.0f}")


def stage_datasets(task, cfg: SuiteConfig):
    if data.is_local(task.local_id):
        print(f"dataset {task.local_id}: present")
        return
    data.build_dataset(task, task.quality, cfg.dataset_steps, seed=cfg.dataset_seed)


def stage_dts(task, cfg: SuiteConfig, runs: Path):
    """runs: where DTs are trained before they are shipped."""
    shipped = shipped_path(task.name)
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


def task_results(task, cfg: SuiteConfig):
    """The dataset's returns and scores beside one results cell per memory policy."""
    checkpoint = Checkpoint.for_task(task)
    dataset, dataset_id = data.find_dataset(task)
    returns = data.Episodes.from_minari(dataset).returns()
    scores = task.normalise(returns)
    return {"dataset_id": dataset_id, "dataset_episodes": len(returns),
            "dataset_mean_return": float(returns.mean()),
            "dataset_mean_score": float(scores.mean()),
            "dataset_score_ci95": list(bootstrap_ci(scores)),
            "dt_steps": checkpoint.steps,
            "dt_wall_seconds": checkpoint.provenance.get("wall_seconds"),
            "provenance": provenance(suite_config=asdict(cfg)),
            "policies": {name: run_cell(checkpoint, task, PolicySpec(name),
                                        cfg.result_episodes) for name in POLICIES}}


def stage_results(tasks, cfg: SuiteConfig, out: Path, readme=None, backend=None):
    names = [task.name for task in tasks if shipped_path(task.name).exists()]
    rows = (backend or LocalBackend()).map(_results_job,
                                           [(name, cfg, Places.here()) for name in names])
    new = dict(zip(names, rows))
    # Tasks not rerun keep their rows (each row carries its own provenance). Read only now,
    # so that runs for other tasks that finished meanwhile keep theirs too.
    results = json.loads(out.read_text())["tasks"] if out.exists() else {}
    results.update(new)
    results = {name: results[name] for name in all_tasks() if name in results}
    write_json(out, {"seeds": "rollouts: episode i uses env seed i", "tasks": results})
    table = suite_table(results, cfg)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if readme is not None:
        embed_in_readme(readme, "suite-table", table,
                        "python scripts/build_suite.py --stages results", relative_to_root(out))


def suite_table(results, cfg: SuiteConfig):
    """Markdown: dataset vs DT normalised scores (mean [95% CI]) per task and policy."""
    def cell(mean, ci):
        return f"{mean:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"

    lines = ["| task | dataset return | dataset score | DT recompute | DT window | DT full | "
             "DT / dataset (recompute) | DT steps | train min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        summaries = {p: row["policies"][p]["summary"] for p in POLICIES}
        ratio = summaries["recompute"]["mean_score"] / row["dataset_mean_score"]
        wall = row["dt_wall_seconds"]
        lines.append(
            f"| {name} | {row['dataset_mean_return']:.0f} | "
            f"{cell(row['dataset_mean_score'], row['dataset_score_ci95'])} | "
            + " | ".join(cell(s["mean_score"], s["score_ci95"]) for s in summaries.values())
            + f" | {100 * ratio:.0f}% | {row['dt_steps']} | "
            f"{'?' if wall is None else f'{wall / 60:.0f}'} |")
    lines.append("")
    lines.append(f"Normalised score = 100 (R - random) / (expert - random) with dtmem's measured "
                 f"reference returns; {cfg.result_episodes} episodes per DT cell (env seeds "
                 "0..n-1) at the task's target return, 95% bootstrap CIs; last checkpoint, "
                 "not best.")
    return "\n".join(lines) + "\n"


def build(cfg: SuiteConfig, stages, envs, tasks, runs: Path, results: Path, readme=None,
          backend=None):
    """Run `stages` for `envs` (None: every env) and `tasks` (None: every task of `envs`);
    runs holds the working files (PPO runs, DTs in training); backend runs the jobs."""
    envs = envs or list(all_envs())
    tasks = tasks or [t.name for t in all_tasks().values() if t.env in envs]
    for kind, names, valid in [("stage", stages, STAGES), ("env", envs, all_envs()),
                               ("task", tasks, all_tasks())]:
        unknown = [name for name in names if name not in valid]
        if unknown:
            raise UserError(f"unknown {kind} {unknown[0]!r}; valid: {', '.join(valid)}")
    backend = backend or LocalBackend()
    places = Places.here()
    for stage_group, names in (({"policies", "references"}, envs), ({"datasets", "dts"}, tasks)):
        chosen_stages = [stage for stage in STAGES if stage in stages and stage in stage_group]
        if chosen_stages:
            backend.map(_stages_job, [(name, chosen_stages, cfg, runs, places) for name in names])
            # Looked up anew: references measured in the jobs change the tasks' scores.
            all_envs.cache_clear()
    if "results" in stages:
        stage_results([all_tasks()[name] for name in tasks], cfg, results, readme, backend)


@dataclass(frozen=True)
class Places:
    """The folders a suite job reads and writes, carried from the driver to its workers
    (which may have been started before the driver chose them, as tests do)."""

    envs: Path
    policies: Path
    checkpoints: Path
    minari: str | None

    @classmethod
    def here(cls):
        return cls(dtmem.tasks.ENVS_DIR, data.POLICIES_DIR, checkpoints.SHIPPED_DIR,
                   os.environ.get("MINARI_DATASETS_PATH"))

    def enter(self):
        if self != Places.here():
            dtmem.tasks.ENVS_DIR, data.POLICIES_DIR = self.envs, self.policies
            checkpoints.SHIPPED_DIR = self.checkpoints
            if self.minari:
                os.environ["MINARI_DATASETS_PATH"] = self.minari
            all_envs.cache_clear()
        torch.set_num_threads(1)


def _stages_job(name, stages, cfg: SuiteConfig, runs: Path, places: Places):
    """One env's policies and references, or one task's dataset and DT, in stage order: a
    backend's job."""
    places.enter()
    for stage in stages:
        if stage == "policies":
            stage_policies(name, cfg, runs / "behavior")
        elif stage == "references":
            stage_references(name, cfg)
        elif stage == "datasets":
            stage_datasets(all_tasks()[name], cfg)
        else:
            stage_dts(all_tasks()[name], cfg, runs)


def _results_job(name, cfg: SuiteConfig, places: Places):
    places.enter()
    return task_results(all_tasks()[name], cfg)
