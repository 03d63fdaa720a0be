"""Evolving NAMMs with CMA-ES (the `cma` package), as published: population 32, sigma
0.065, zero initial mean, log-rank weights over the best half, full covariance; the
CMA-ES mean is the solution. Fitness: mean over tasks of the DT + NAMM normalised score.

Each task evaluates the population in `shards` batched rollouts (slots = members x
episodes; a shard is a contiguous block of members, by default all of them), one job
each for a backend (dtmem/backend.py) to run wherever it likes; CMA-ES stays here. The
shards fix which slots share a batch, hence every float: the numbers depend on the
config, never on the backend or its worker count. Every member of a generation meets the
same env seeds (common random numbers); each generation draws fresh ones.

Checkpoints hold no pickled objects: the run directory keeps the fitness of every
member of every generation, and `--resume` replays them through a fresh CMA-ES with the
same seed, which rebuilds its exact state (CMA-ES is deterministic given its seed and
the fitness values it is told).
"""

import csv
import functools
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from dtmem.backend import LocalBackend
from dtmem.checkpoints import Checkpoint
from dtmem.errors import Interrupted, UserError
from dtmem.files import atomic_path, git_commit, provenance, write_json
from dtmem.limits import check
from dtmem.memory import PolicySpec
from dtmem.memory.namm import DEFAULT_N_UP, policy_for_scorer
from dtmem.memory.namm.features import HOP, merge_stats
from dtmem.memory.namm.io import SHIPPED_DIR, read_namm, save_namm
from dtmem.memory.namm.scorers import SCORERS
from dtmem.results import build_policy
from dtmem.rollout import rollout
from dtmem.runtime import progress_bar
from dtmem.tasks import all_tasks, resolve_task


@dataclass
class EvolveConfig:
    """One evolution run; stored in its state.json."""

    stages: list
    """task lists, one per incremental stage, e.g. [["hopper-medium"], ["hopper-medium", "walker2d-medium"]]"""
    generations: int = 50
    """generations per stage"""
    population: int = 32
    """CMA-ES population"""
    sigma: float = 0.065
    """initial CMA-ES step size"""
    episodes: int = 8
    """episodes per member per task (the fitness-noise study's choice, results/fitness-noise/)"""
    scorer: str = "bam"
    """bam or mlp"""
    n_up: int = DEFAULT_N_UP
    """tokens between NAMM updates (a multiple of 16)"""
    seed: int = 0
    """seeds CMA-ES and the env seeds of every generation"""
    eval_mean_every: int = 5
    """generations between validations of the CMA-ES mean (the stage's best is best.pt)"""
    mean_episodes: int = 32
    """episodes per task of each validation (env seeds VALIDATION_SEED..)"""
    shards: int = 1
    """batched rollouts per task, each a block of members and one job (--workers run jobs
    at once); it decides which episodes share a batch, so it is the run's, like its seed"""


# Env seeds evolution meets, apart from both table blocks (development 0..49, confirmation
# 100000..100049): generations draw from TRAINING_SEED on, the standardisation statistics
# from STATS_SEED, and every validation of the CMA-ES mean uses the fixed block at
# VALIDATION_SEED, which no table and no generation uses.
TRAINING_SEED = 100_000_000
STATS_SEED = 50_000_000
VALIDATION_SEED = 10_000_000


def _cma():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cma warns that matplotlib (plots) is missing
        import cma
    return cma


def es_recipe(es):
    """What the CMA-ES does, read off the strategy itself: stored in state.json and in the
    meta of every NAMM it makes. pycma's CSA has cs = (mueff + 2) / (N + mueff + 3) where
    the original has N + mueff + 5 (0.05% apart at N = 4172); the rest (log-rank weights on
    the better half, active negative weights on the worse half, damps, cc, c1, cmu, unit
    mean learning rate, full covariance) is the original's."""
    weights = np.asarray(es.sp.weights)
    return {"library": f"cma {_cma().__version__}",
            "step_size_rule": type(es.adapt_sigma).__name__.removeprefix("CMAAdaptSigma"),
            "cs": float(es.adapt_sigma.cs), "damps": float(es.adapt_sigma.damps),
            "popsize": int(es.sp.popsize), "mu": int(es.sp.weights.mu),
            "mueff": float(es.sp.weights.mueff), "negative_weights": int((weights < 0).sum()),
            "cc": float(es.sp.cc), "c1": float(es.sp.c1), "cmu": float(es.sp.cmu),
            "cmean": float(es.sp.cmean), "sigma0": float(es.sigma0),
            "mean_shift_samples": bool(es.mean_shift_samples),
            "covariance": "diagonal" if es.opts["CMA_diagonal"] is True else "full"}


def shards_of(member_params, shards):
    """The shards of a population: contiguous blocks of members, as equal as can be."""
    return np.array_split(member_params, min(shards, len(member_params)))


class Evolution:
    def __init__(self, cfg: EvolveConfig, out, device="cpu", backend=None):
        check(cfg)
        if cfg.n_up % HOP:
            raise UserError(f"--n-up must be a multiple of {HOP}, got {cfg.n_up}")
        if cfg.scorer not in SCORERS:
            raise UserError(f"unknown scorer {cfg.scorer!r}; use bam or mlp")
        if not (isinstance(cfg.shards, int) and 1 <= cfg.shards <= cfg.population):
            raise UserError(f"--shards must be an integer from 1 to the population "
                            f"({cfg.population}), got {cfg.shards!r}")
        self.cfg, self.out, self.device = cfg, out and Path(out), device
        self.backend = backend or LocalBackend()
        self.policy_name = policy_for_scorer(cfg.scorer)
        self.n_params = SCORERS[cfg.scorer][1]
        self.models = {}
        for task_name in sorted({t for stage in cfg.stages for t in stage}):
            task = resolve_task(task=task_name)
            self.models[task.name] = (task, Checkpoint.shipped(task.name, device))
        cma = _cma()
        # pycma switches to TPA step-size adaptation by itself from dimension 300 on (and
        # then spends 2 members per generation on mean-shift probes); the original NAMM
        # code adapts sigma by CSA, so CSA is asked for by name.
        self.es = cma.CMAEvolutionStrategy(
            np.zeros(self.n_params), cfg.sigma,
            {"popsize": cfg.population, "seed": cfg.seed + 1, "verbose": -9,
             "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA})
        self.recipe = es_recipe(self.es)
        self.history = []  # per generation: {"stage", "fitness": [...], ...}
        self.stats = None

    def run_tasks(self, member_params, tasks, episodes, seed):
        """Per task: [members, episodes] normalised scores, the episodes' results (in
        member order) and the statistics each of its shards saw; one job per (task, shard),
        all handed to the backend at once."""
        shards = shards_of(member_params, self.cfg.shards)
        jobs = [(*self.models[name], self.policy_name, self.cfg.n_up, self.stats, block,
                 episodes, seed) for name in tasks for block in shards]
        outcomes = self.backend.map(_evaluate_task, jobs)
        n = len(shards)
        per_task = [outcomes[i:i + n] for i in range(0, len(outcomes), n)]
        return [(np.concatenate([scores for scores, _, _ in done]),
                 [r for _, results, _ in done for r in results],
                 [stats for _, _, stats in done]) for done in per_task]

    def evaluate(self, member_params, tasks, episodes, seed):
        """Normalised score per member (mean over tasks and episodes), mean cache size,
        and the standardisation statistics the rollouts saw (collected if not frozen)."""
        outcomes = self.run_tasks(member_params, tasks, episodes, seed)
        scores = np.mean([scores.mean(1) for scores, _, _ in outcomes], axis=0)
        tokens = float(np.mean([r.mean_tokens for _, results, _ in outcomes for r in results]))
        stats = self.stats
        if stats is None:  # collecting: pool what every job's rollout saw
            stats = functools.reduce(merge_stats, [s for _, _, seen in outcomes for s in seen])
        return scores, tokens, stats

    def episode_scores(self, member_params, task, episodes, seed):
        """[members, episodes] normalised scores on one task (frozen statistics)."""
        return self.run_tasks(member_params, [task], episodes, seed)[0][0]

    def collect_stats(self):
        """Standardisation statistics from the all-zero NAMM (which keeps everything) on
        the first stage's tasks, then frozen for the whole run."""
        zero = np.zeros((1, self.n_params))
        _, _, self.stats = self.evaluate(zero, self.cfg.stages[0], self.cfg.episodes,
                                         STATS_SEED + 1000 * self.cfg.seed)

    def generation_seed(self, generation):
        return TRAINING_SEED + self.cfg.seed * 1_000_003 + 1000 * (generation + 1)

    def run(self, progress=True, stop_after=None):
        cfg = self.cfg
        total = cfg.generations * len(cfg.stages)
        if self.stats is None:
            self.collect_stats()
        bar = progress_bar(total=total, initial=len(self.history), desc="evolve", show=progress)
        try:
            while len(self.history) < total:
                if stop_after is not None and len(self.history) >= stop_after:
                    break
                generation = len(self.history)
                stage = generation // cfg.generations
                begin = time.perf_counter()
                candidates = np.array(self.es.ask())
                fitness, tokens, _ = self.evaluate(candidates, cfg.stages[stage], cfg.episodes,
                                                   self.generation_seed(generation))
                self.es.tell(list(candidates), list(-fitness))  # cma minimises
                row = {"generation": generation, "stage": stage,
                       "fitness": fitness.tolist(), "best": float(fitness.max()),
                       "mean": float(fitness.mean()), "mean_tokens": tokens, "mean_eval": None,
                       "wall": round(time.perf_counter() - begin, 2), "commit": git_commit()}
                if ((generation + 1) % cfg.eval_mean_every == 0
                        or (generation + 1) % cfg.generations == 0):  # a stage's last
                    mean_fitness, _, _ = self.evaluate(self.es.mean[None], cfg.stages[stage],
                                                       cfg.mean_episodes, VALIDATION_SEED)
                    row["mean_eval"] = float(mean_fitness[0])
                self.history.append(row)
                self.save(row)
                bar.update(1)
                bar.set_postfix(best=f"{row['best']:.1f}", mean=f"{row['mean']:.1f}")
        except KeyboardInterrupt:
            raise Interrupted(f"{len(self.history)} generations are saved in {self.out}; "
                              f"continue with `dtmem evolve --resume {self.out}`") from None
        finally:
            bar.close()

    def save(self, row):
        """Atomic: state.json (config, stats, every fitness), log.csv, latest.pt, best.pt."""
        # A resumed run may span commits: name each, in the order its generations ran.
        commits = list(dict.fromkeys(h.get("commit", "unknown") for h in self.history))
        meta = {"stages": self.cfg.stages, "generations_done": len(self.history),
                "commits": commits, "cma_es": self.recipe,
                "provenance": provenance(evolve_config=asdict(self.cfg))}
        mean = torch.as_tensor(self.es.mean, dtype=torch.float32)
        save_namm(self.out / "latest.pt", self.cfg.scorer, mean, self.stats, self.cfg.n_up,
                  {**meta, "choice": f"the CMA-ES mean after generation {row['generation']}"})
        # Validations of different stages score different task sets: the best is the
        # stage's own, and the last stage's is the run's.
        validated = [h["mean_eval"] for h in self.history
                     if h["stage"] == row["stage"] and h["mean_eval"] is not None]
        if row["mean_eval"] is not None and row["mean_eval"] >= max(validated):
            save_namm(self.out / "best.pt", self.cfg.scorer, mean, self.stats, self.cfg.n_up,
                      {**meta, "mean_eval": row["mean_eval"], "choice": (
                          f"the best-validated CMA-ES mean of stage {row['stage']}: generation "
                          f"{row['generation']}, {row['mean_eval']:.2f} over "
                          f"{self.cfg.mean_episodes} episodes per task from env seed "
                          f"{VALIDATION_SEED}")})
        mean_, var, count = self.stats
        write_json(self.out / "state.json", {
            "config": asdict(self.cfg), "cma_es": self.recipe,
            "stats": [mean_.tolist(), var.tolist(), int(count)], "history": self.history})
        with atomic_path(self.out / "log.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["generation", "stage", "best", "mean", "mean_eval",
                                 "mean_tokens", "wall", "commit"])
                for h in self.history:
                    writer.writerow([h["generation"], h["stage"], h["best"], h["mean"],
                                     h["mean_eval"], h["mean_tokens"], h["wall"],
                                     h.get("commit", "unknown")])

    @classmethod
    def resume(cls, out, device="cpu", backend=None, asked=None):
        """Rebuild a run from its state.json by replaying every told fitness. asked: the
        EvolveConfig settings a user gave along (flags); one that is neither its default
        nor the run's own is refused, since the run keeps its settings."""
        path = Path(out) / "state.json"
        if not path.exists():
            raise UserError(f"nothing to resume: {path} does not exist")
        try:
            state = json.loads(path.read_text())
            run = cls(EvolveConfig(**state["config"]), out, device, backend)
            mean, var, count = state["stats"]
            history = state["history"]
            if not all(len(row["fitness"]) == run.cfg.population
                       and all(math.isfinite(f) for f in row["fitness"]) for row in history):
                raise ValueError("a generation's fitness is not one finite value per member")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); restore it from "
                            "a backup or start a new run") from None
        if state.get("cma_es") != run.recipe:
            raise UserError(f"{path} was made by another CMA-ES recipe ({state.get('cma_es')}); "
                            "resume it with the code that made it, or start a new run")
        defaults = {f.name: f.default for f in fields(EvolveConfig) if f.name != "stages"}
        changed = [f"--{k.replace('_', '-')} {v} (the run has {getattr(run.cfg, k)})"
                   for k, v in (asked or {}).items()
                   if v != defaults[k] and v != getattr(run.cfg, k)]
        if changed:
            raise UserError(f"--resume keeps the run's settings; drop {', '.join(changed)}")
        run.stats = (torch.tensor(mean), torch.tensor(var), count)
        for row in state["history"]:
            candidates = run.es.ask()
            run.es.tell(candidates, [-f for f in row["fitness"]])
        run.history = state["history"]
        return run


def _evaluate_task(task, checkpoint, policy_name, n_up, stats, member_params, episodes, seed):
    """One task's batched rollout of every member: slot = member x episode, and every
    member meets env seeds seed .. seed + episodes - 1. Returns per-episode scores
    [members, episodes], the results, the statistics. A backend's job: module-level, so
    that worker processes can import it, and on one torch thread, the fastest for a
    rollout's many small ops and the same everywhere."""
    torch.set_num_threads(1)
    members = len(member_params)
    params = torch.as_tensor(np.repeat(member_params, episodes, axis=0), dtype=torch.float32)
    policy = build_policy(PolicySpec(policy_name, options={
        "n_up": n_up, "params": params, "stats": stats}), checkpoint, task)
    seeds = [seed + i % episodes for i in range(members * episodes)]
    results, _ = rollout(checkpoint.model, checkpoint.state_mean, checkpoint.state_std, task,
                         policy, episodes=members * episodes, seeds=seeds)
    scores = np.array([r.score for r in results]).reshape(members, episodes)
    return scores, results, policy.stats


ZERO_SHOT_SCORERS = {"default": "bam", "default-mlp": "mlp"}  # shipped zero-shot NAMMs


def ship(run_dir, name, folder=None, overwrite=False):
    """Ship a finished run as NAMM `name`: best.pt (the declared choice: the best-validated
    CMA-ES mean of the last stage, as the original code keeps its checkpoint) as
    <name>.pt, latest.pt (the final mean, the paper's solution) as <name>-final.pt, and
    log.csv as <name>-log.csv, in data/namm/ (or folder). Everything is checked before
    anything is copied; a shipped NAMM is replaced only with overwrite."""
    run_dir, folder = Path(run_dir), Path(folder or SHIPPED_DIR)
    try:
        state = json.loads((run_dir / "state.json").read_text())
        cfg = EvolveConfig(**state["config"])
        total = cfg.generations * len(cfg.stages)
        done = len(state["history"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{run_dir} holds no readable evolution run (state.json)") from None
    if done < total:
        raise UserError(f"{run_dir} has run {done} of {total} generations; "
                        f"finish it with `dtmem evolve --resume {run_dir}` first")
    check_ship_name(name, cfg)
    for source in ("best.pt", "latest.pt"):
        scorer = read_namm(run_dir / source)["scorer"]
        if scorer != cfg.scorer:
            raise UserError(f"{run_dir / source} holds a {scorer} NAMM but the run evolved "
                            f"{cfg.scorer}; restore the run's own files")
    if not (run_dir / "log.csv").is_file():
        raise UserError(f"{run_dir / 'log.csv'} does not exist; restore the run's log")
    targets = {source: folder / f"{name}{suffix}" for source, suffix in
               (("best.pt", ".pt"), ("latest.pt", "-final.pt"), ("log.csv", "-log.csv"))}
    present = [str(t) for t in targets.values() if t.exists()]
    if present and not overwrite:
        raise UserError(f"NAMM {name} is already shipped ({', '.join(present)}); pass "
                        "--overwrite to replace it")
    for source, target in targets.items():
        with atomic_path(target) as tmp:
            shutil.copyfile(run_dir / source, tmp)
    return list(targets.values())


def check_ship_name(name, cfg: EvolveConfig):
    """A shipped NAMM's name says what it is: a zero-shot NAMM of its scorer, or the BAM
    NAMM evolved on exactly that task (the table's namm-local)."""
    if name in ZERO_SHOT_SCORERS:
        if cfg.scorer != ZERO_SHOT_SCORERS[name]:
            raise UserError(f"--as {name} is the zero-shot {ZERO_SHOT_SCORERS[name]} NAMM but "
                            f"the run evolved {cfg.scorer}")
        return
    tasks = all_tasks()
    if name not in tasks:
        raise UserError(f"--as {name!r} is no NAMM name: use default, default-mlp or a task "
                        f"({', '.join(tasks)})")
    if cfg.scorer != "bam" or any(stage != [name] for stage in cfg.stages):
        sources = sorted({task for stage in cfg.stages for task in stage})
        raise UserError(f"--as {name} is the BAM NAMM evolved on {name} alone, but the run "
                        f"evolved {cfg.scorer} on {', '.join(sources)}; ship it as default "
                        "or default-mlp")


def sweep_summary(folder):
    """The table of a sweep of short evolution runs (one state.json copy per setting, e.g.
    results/n-up-sweep/), written to summary.md in the same folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give the sweep's folder of run files")
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            run = json.loads(path.read_text())
            history = run["history"][-5:]
            evals = [f"g{h['generation']}: {h['mean_eval']:.1f}" for h in run["history"]
                     if h["mean_eval"] is not None]
            rows.append((run["config"]["n_up"],
                         f"| {path.stem} | {run['config']['n_up']} | "
                         f"{np.mean([h['mean'] for h in history]):.1f} | {', '.join(evals)} | "
                         f"{np.mean([h['mean_tokens'] for h in history]):.0f} | "
                         f"{sum(h['wall'] for h in run['history']):.0f} |"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not an evolution run's state.json ({type(e).__name__}: "
                            f"{e}); move it out of {folder}") from None
    if not rows:
        raise UserError(f"no run files (*.json) in {folder}")
    lines = ["| run | n_up | population mean, last 5 generations | CMA-ES mean evaluations "
             "| cache tokens, last 5 | wall s |", "|---|---|---|---|---|---|"]
    lines += [row for _, row in sorted(rows, key=lambda row: row[0])]
    table = "\n".join(lines) + "\n"
    with atomic_path(folder / "summary.md") as tmp:
        tmp.write_text(table)
    return table
