"""How noisy is a NAMM's fitness? The study behind evolution's episodes per member.

One CMA-ES generation of `members` candidates (drawn as `dtmem evolve` draws them, around
the zero mean of a fresh run or around an evolved NAMM) is evaluated on two independent
draws of `episodes` env seeds each: the seeds evolution itself would meet in its first
two generations (the training stream, never a table block). From the per-episode scores:
  noise_sd     the standard error of one member's fitness at n episodes per member;
  spread_sd    how far members truly differ (between-member SD, noise removed);
  rank_agreement  Spearman correlation of the members' fitness between the two draws,
               averaged over the disjoint n-episode blocks available;
  elite_overlap   the share of CMA-ES's selected half that both draws select.
CMA-ES sees only ranks, so rank agreement is the number that decides the budget.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dtmem.errors import UserError
from dtmem.evolve import Evolution, EvolveConfig
from dtmem.files import (
    ensure_writable,
    provenance,
    relative_to_root,
    sha256,
    write_json,
)
from dtmem.limits import check
from dtmem.memory.namm import DEFAULT_N_UP
from dtmem.memory.namm.io import load_namm

EPISODE_COUNTS = (1, 2, 4, 8, 16)


@dataclass
class NoiseConfig:
    """One population of the fitness-noise study."""

    task: str = "hopper-medium"
    """task whose shipped DT runs the members"""
    members: int = 32
    """candidates, drawn as CMA-ES draws a generation (the published population)"""
    episodes: int = 16
    """episodes per member in each of the two draws"""
    around: str = ""
    """NAMM file whose parameters are the CMA-ES mean (default: zeros, a fresh run)"""
    sigma: float = 0.065
    """CMA-ES step size of the draw"""
    n_up: int = DEFAULT_N_UP
    """tokens between NAMM updates"""
    seed: int = 0
    """seeds the draw and, as in evolution, the env seeds of generations 0 and 1"""


def ranks(x):
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)


def spearman(a, b):
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def study(cfg: NoiseConfig, device="cpu"):
    """Per-episode scores [2 draws, members, episodes], the summary per episode count, and
    the first env seed of each draw."""
    run = Evolution(EvolveConfig(stages=[[cfg.task]], population=cfg.members,
                                 sigma=cfg.sigma, n_up=cfg.n_up, seed=cfg.seed,
                                 episodes=cfg.episodes), out=None, device=device)
    run.collect_stats()
    if cfg.around:
        params, _, _, _ = load_namm(cfg.around, "bam")
        run.es.mean[:] = params.double().numpy()  # the draw's centre; nothing is told
    candidates = np.array(run.es.ask())
    first_seeds = [run.generation_seed(g) for g in (0, 1)]
    scores = np.stack([run.episode_scores(candidates, cfg.task, cfg.episodes, seed)
                       for seed in first_seeds])  # [2, members, episodes]
    return scores, summarise(scores), first_seeds


def summarise(scores):
    _, members, episodes = scores.shape
    pooled = scores.transpose(1, 0, 2).reshape(members, -1)  # [members, 2 * episodes]
    within = pooled.var(axis=1, ddof=1).mean()  # one episode's variance around its member
    between = max(pooled.mean(axis=1).var(ddof=1) - within / pooled.shape[1], 0.0)
    rows = []
    for n in (n for n in EPISODE_COUNTS if n <= episodes):
        blocks = episodes // n
        agreement, overlap = [], []
        for b in range(blocks):
            a, c = (scores[d, :, b * n:(b + 1) * n].mean(1) for d in (0, 1))
            agreement.append(spearman(a, c))
            elite = members // 2
            top_a, top_c = set(np.argsort(-a)[:elite]), set(np.argsort(-c)[:elite])
            overlap.append(len(top_a & top_c) / elite)
        rows.append({"episodes": n, "noise_sd": float(np.sqrt(within / n)),
                     "spread_sd": float(np.sqrt(between)),
                     "signal_to_noise": float(np.sqrt(between / (within / n))),
                     "rank_agreement": float(np.mean(agreement)),
                     "elite_overlap": float(np.mean(overlap)), "blocks": blocks})
    return rows



def population_name(cfg: NoiseConfig):
    return f"{cfg.task}-" + (f"around-{Path(cfg.around).stem}" if cfg.around else "start")


def run(cfg: NoiseConfig, out, device="cpu"):
    """Run one population and write <out>/<task>-<start|around-NAMM>.json."""
    check(cfg)
    path = Path(out) / f"{population_name(cfg)}.json"
    ensure_writable(path)
    begin = time.perf_counter()
    scores, rows, first_seeds = study(cfg, device)
    around = cfg.around and relative_to_root(cfg.around)
    write_json(path, {"config": {**asdict(cfg), "around": around},
                      "around_sha256": cfg.around and sha256(cfg.around),
                      "summary": rows, "scores": scores.round(4).tolist(),
                      "provenance": provenance(
                          wall_seconds=round(time.perf_counter() - begin, 1),
                          seeds=f"draw d, every member: env seeds first_seeds[d] + "
                                f"0..{cfg.episodes - 1}", first_seeds=first_seeds)})
    return path, rows


def markdown(folder):
    """One table over every population of the study in folder."""
    lines = ["| population | episodes per member | noise SD | member spread SD | "
             "rank agreement | elite overlap |", "|---|---|---|---|---|---|"]
    paths = sorted(Path(folder).glob("*.json"))
    if not paths:
        raise UserError(f"no populations (*.json) in {folder}; run one first, e.g. "
                        "scripts/fitness_noise.py --task hopper-medium")
    for path in paths:
        try:
            for r in json.loads(path.read_text())["summary"]:
                lines.append(f"| {path.stem} | {r['episodes']} | {r['noise_sd']:.1f} | "
                             f"{r['spread_sd']:.1f} | {r['rank_agreement']:.2f} | "
                             f"{r['elite_overlap']:.2f} |")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a population of the study ({type(e).__name__}: "
                            f"{e}); move it out of {folder}") from None
    return "\n".join(lines) + "\n"
