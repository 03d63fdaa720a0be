"""Cells: one memory policy on one DT over a block of env seeds, as one results file.

The single results schema: what ran (task, policy and its settings, the checkpoint and
its hash), on which env seeds, every episode, the summary with a 95% bootstrap CI, and
the provenance. `dtmem rollout --json`, the experiment, the report, the plots and the
suite all read and write cells through this module. Paths in cells are relative to the
repository.
"""

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dtmem.checkpoints import Checkpoint, shipped_path
from dtmem.errors import UserError
from dtmem.files import provenance, sha256, write_json
from dtmem.memory import PolicySpec, cell_name_of
from dtmem.rollout import rollout
from dtmem.stats import bootstrap_ci
from dtmem.tasks import ROOT, Task, all_tasks
from dtmem.video import VideoRecorder

# Env seed blocks of the table. Development: the only block any choice may look at
# (budgets, n_up, recipes, which NAMM ships). Confirmation: run once the choices are
# fixed, never used to choose. Both hold 50 episodes.
BLOCKS = {"development": 0, "confirmation": 100_000}


def summarize(results):
    """Mean, 95% bootstrap CI and token counts over episodes."""
    scores = np.array([r.score for r in results])
    returns = np.array([r.ret for r in results])
    lo, hi = bootstrap_ci(scores)
    return {
        "episodes": len(results),
        "mean_return": float(returns.mean()),
        "mean_score": float(scores.mean()),
        "score_ci95": [lo, hi],
        "mean_length": float(np.mean([r.length for r in results])),
        "mean_tokens": float(np.mean([r.mean_tokens for r in results])),
        "max_tokens": int(max(r.max_tokens for r in results)),
        "layer_mean_tokens": np.mean([r.layer_mean_tokens for r in results], 0).round(2).tolist(),
        "layer_max_tokens": np.max([r.layer_max_tokens for r in results], 0).tolist(),
    }


def build_policy(spec: PolicySpec, checkpoint: Checkpoint, task: Task):
    return spec.build(checkpoint.model.cfg.context_steps, 3 * task.max_episode_steps,
                      task.name)


def run_cell(checkpoint: Checkpoint, task: Task, spec: PolicySpec, episodes, seed=0,
             slots=None, target_return=None, progress=True, video=None, policy=None, shards=1,
             backend=None):
    """One cell: episodes seed .. seed + episodes - 1 under the policy of `spec` (or the
    `policy` already built from it); video: (folder, episodes) to film the first ones;
    shards: batched rollouts of episode blocks, jobs of `backend` (dtmem/rollout.py)."""
    task = checkpoint.scoring(task)
    policy = policy or build_policy(spec, checkpoint, task)
    recorder = video and VideoRecorder(video[0], f"{task.name}-{spec.cell_name}", video[1])
    begin = time.perf_counter()
    results, _ = rollout(checkpoint.model, checkpoint.state_mean, checkpoint.state_std, task,
                         policy, episodes, slots, seed, target_return, progress=progress,
                         video=recorder, shards=shards, backend=backend)
    wall = time.perf_counter() - begin
    return {"task": task.name, "policy": spec.name, "label": spec.label, **policy.describe(),
            **checkpoint.record(),
            "target_return": task.target_return if target_return is None else target_return,
            "seed": seed, **({"shards": shards} if shards > 1 else {}), "reference": {"min": task.ref_min, "max": task.ref_max,
                                        "source": task.ref_source},
            "provenance": provenance(wall_seconds=round(wall, 2)),
            "summary": summarize(results), "episodes": [asdict(r) for r in results]}


MIN_CI_EPISODES = 10  # fewer episodes give a bootstrap CI too unreliable to print

REFERENCE_MEANINGS = {
    "dtmem": "uniform random actions and dtmem's expert behaviour policy, measured by dtmem",
    "d4rl": "D4RL's random and expert returns (older env versions: indicative only)",
}


def full_cache_tokens(length):
    """Mean tokens a whole-episode cache holds at a decode step of an episode of `length`
    steps: 3t + 2 at step t (the first step has no previous action)."""
    return 1.5 * (length - 1) + 2


def explain(cell, base=None):
    """A cell in words a newcomer can read; base: the same seeds under another policy
    (e.g. recompute), for the paired gain."""
    s, episodes = cell["summary"], cell["episodes"]
    n, ref = len(episodes), cell["reference"]
    full = np.mean([full_cache_tokens(e["length"]) for e in episodes])
    ci = (f" (95% CI {s['score_ci95'][0]:.1f}..{s['score_ci95'][1]:.1f})"
          if n >= MIN_CI_EPISODES else f" (no CI: run {MIN_CI_EPISODES}+ episodes for one)")
    meaning = REFERENCE_MEANINGS.get(ref["source"], f"the {ref['source']}'s own references")
    lines = [f"{cell['task']} {cell_name(cell)}: {n} episodes, env seeds {cell['seed']}.."
             f"{cell['seed'] + n - 1}",
             f"  normalised score {s['mean_score']:.1f}{ci}; return {s['mean_return']:.1f}, "
             f"episode length {s['mean_length']:.0f}",
             f"  cached tokens per layer: mean {s['mean_tokens']:.0f} ({s['mean_tokens'] / full:.0%}"
             f" of a whole-episode cache), max {s['max_tokens']}",
             f"  score 0 = return {ref['min']:g}, 100 = return {ref['max']:g}: {meaning}"]
    if base is not None:
        gain = np.array([e["score"] for e in episodes]) - [e["score"] for e in base["episodes"]]
        lo, hi = bootstrap_ci(gain)
        paired = (f" (paired 95% CI {lo:+.1f}..{hi:+.1f})" if n >= MIN_CI_EPISODES else "")
        lines.append(f"  vs {cell_name(base)} on the same seeds: gain {gain.mean():+.1f}{paired}")
    return "\n".join(lines)


def read_cell(path):
    """The cell in a results file, or None where there is none (or it is unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def cell_is_done(cell, checkpoint: Checkpoint, policy_record, episodes, seed):
    """Whether an existing cell already holds `episodes` episodes from `seed` of the same
    checkpoint and the same policy settings (e.g. the same NAMM file)."""
    return (cell is not None and len(cell.get("episodes", [])) >= episodes
            and cell.get("seed") == seed
            and cell.get("checkpoint_sha256") == checkpoint.sha256
            and all(cell.get(key) == value for key, value in policy_record.items()))


def ensure_cell(path, checkpoint, task, spec, episodes, seed, slots=None, progress=True):
    """The cell at `path`, run (and written) unless a finished one is already there."""
    cell = read_cell(path)
    policy = build_policy(spec, checkpoint, task)
    if not cell_is_done(cell, checkpoint, policy.describe(), episodes, seed):
        cell = run_cell(checkpoint, task, spec, episodes, seed, slots, progress=progress,
                        policy=policy)
        write_json(path, cell)
    return cell


def spec_of(cell):
    """The PolicySpec a cell records (paths in cells are relative to the repository)."""
    options = {**cell.get("settings", {}),
               **({"namm_file": ROOT / cell["namm"]} if cell.get("namm") else {})}
    return PolicySpec(cell["policy"], cell.get("budget"), cell.get("ratio"), options,
                      cell.get("label"))


def reproduce(cell, progress=False):
    """Run a cell again from what it records (checkpoint, policy, seeds, episodes, target
    return, shards: one unless it says); with as many slots as episodes, as the experiment
    and `dtmem rollout` run."""
    task = all_tasks()[cell["task"]]
    checkpoint = Checkpoint.for_task(task, ROOT / cell["checkpoint"])
    return run_cell(checkpoint, task, spec_of(cell), len(cell["episodes"]), cell["seed"],
                    target_return=cell["target_return"], progress=progress,
                    shards=cell.get("shards", 1))


def matched_budget(cell):
    """The budget heuristics are matched to: a NAMM cell's mean cache size, in tokens."""
    return max(3, round(cell["summary"]["mean_tokens"]))


def cell_path(folder, task_name, name):
    """Where a block's folder of cells keeps one: <folder>/<task>/<cell name>.json."""
    return Path(folder) / task_name / f"{name}.json"


def cell_name(cell):
    return cell.get("label") or cell_name_of(cell["policy"], cell.get("budget"),
                                              cell.get("ratio"), cell.get("settings", {}))


EPISODE_NUMBERS = ("seed", "ret", "score", "mean_tokens", "max_tokens")  # what tables read


def checked_cell(path):
    """The cell of a results file that tables can read: every episode with a finite
    seed, return, score and token counts; else a UserError."""
    try:
        cell = json.loads(Path(path).read_text())
        cell["task"], cell_name(cell)
        numbers = [float(e[key]) for e in cell["episodes"] for key in EPISODE_NUMBERS]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path} is not a dtmem rollout results file") from None
    if not all(map(math.isfinite, numbers)):
        raise UserError(f"{path} holds a non-finite return, score or token count; rerun "
                        "the cell")
    return cell


def load_cells(folder, episodes, require_shipped=True):
    """{task: {cell name: cell}} from every *.json below folder, checked: enough episodes,
    consecutive seeds (gains pair by seed), and by default the task's shipped DT."""
    cells, shipped_hashes = {}, {}
    if Path(folder).is_file():
        raise UserError(f"{folder} is a file; give the folder of results files it is in")
    paths = sorted(Path(folder).rglob("*.json"))
    if not paths:
        raise UserError(f"no results files in {folder}; make them with `dtmem rollout --json`")
    for path in paths:
        cell = checked_cell(path)
        task, name, seeds = cell["task"], cell_name(cell), [e["seed"] for e in cell["episodes"]]
        if len(seeds) < episodes:
            raise UserError(f"{path}: {len(seeds)} episodes, fewer than the {episodes} asked; "
                            "rerun the cell")
        if seeds != list(range(cell["seed"], cell["seed"] + len(seeds))):
            raise UserError(f"{path}: episode seeds are not {cell['seed']}..; rerun the cell")
        shipped = shipped_path(task)
        if require_shipped and shipped.exists() and task not in shipped_hashes:
            shipped_hashes[task] = sha256(shipped)  # once per task, not once per cell
        if require_shipped and (not shipped.exists()
                                or cell.get("checkpoint_sha256") != shipped_hashes[task]):
            raise UserError(f"{path} was not made with the shipped checkpoint of {task}; "
                            "rerun it (or pass --any-checkpoint)")
        if name in cells.setdefault(task, {}):
            raise UserError(f"two results files for {task} {name}: {path} and another")
        cells[task][name] = cell
    return cells
