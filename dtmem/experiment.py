"""The experiment behind the table of return gains (`scripts/run_experiment.py`): every
memory policy on every shipped DT, one results file per cell, then the report.

Per task, in this order (the matched budgets need the NAMM's cache size first):
  recompute (the base of every gain), window, full;
  namm        the zero-shot NAMM (<namm_dir>/default.pt, by default the shipped one);
  namm-local  the NAMM evolved on this very task (<namm_dir>/<task>.pt), where present;
  namm-mlp    the MLP NAMM (<namm_dir>/default-mlp.pt), on the tasks of mlp_tasks;
  every heuristic at each of `budgets`: token counts, and `matched`, the zero-shot NAMM's
  own mean cache size on this task.
Every cell meets the same env seeds (seed .. seed + episodes - 1), so gains pair by
seed. A cell whose results file already holds enough episodes of the same checkpoint
and NAMM is kept, so an interrupted run resumes where it stopped.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from dtmem.checkpoints import SHIPPED_DIR, load_model
from dtmem.errors import UserError
from dtmem.files import sha256, write_json
from dtmem.memory import POLICIES
from dtmem.namm import DEFAULT_FILES
from dtmem.namm import SHIPPED_DIR as NAMM_DIR
from dtmem.report import embed_in_readme, load_cells, markdown, summarise, write_report
from dtmem.rollout import rollout_cell
from dtmem.tasks import all_tasks, resolve_task

@dataclass
class ExperimentConfig:
    """One run of the experiment; its cells go to <out>/cells/<task>/<cell>.json."""

    tasks: str = ""
    """comma-separated tasks (default: every task with a shipped DT)"""
    episodes: int = 50
    """episodes per cell (the report refuses cells with fewer)"""
    budgets: str = "matched,60"
    """heuristics' token budgets: numbers, or matched (the NAMM's mean cache size); 60 =
    20 DT steps, the DT's own context"""
    heuristics: str = "streaming,h2o,l2,random"
    """comma-separated budgeted policies run at the matched and the fixed budget"""
    mlp_tasks: str = "hopper-medium,halfcheetah-medium"
    """tasks that also run the shipped MLP NAMM (the paper's BAM vs MLP ablation)"""
    seed: int = 0
    """env seed of the first episode of every cell"""
    slots: int = 50
    """episodes run in lockstep"""
    out: str = "results"
    """where cells/, report.{json,csv,md} and the plots go"""
    namm_dir: str = str(NAMM_DIR)
    """NAMM files: default.pt (zero-shot), default-mlp.pt, <task>.pt (evolved on it)"""


def experiment_tasks(cfg: ExperimentConfig):
    if cfg.tasks:
        tasks = [resolve_task(task=name) for name in cfg.tasks.split(",")]
    else:
        tasks = [t for t in all_tasks().values() if (SHIPPED_DIR / f"{t.name}.pt").exists()]
    missing = [t.name for t in tasks if not (SHIPPED_DIR / f"{t.name}.pt").exists()]
    if missing:
        raise UserError(f"no shipped DT for {', '.join(missing)}; train it with "
                        "scripts/build_suite.py --stages dts")
    for budget in cfg.budgets.split(","):
        if budget != "matched" and not (budget.isdigit() and int(budget) >= 3):
            raise UserError(f"--budgets: {budget!r} is neither a token count >= 3 nor matched")
    for name in cfg.heuristics.split(","):
        if name not in POLICIES or not POLICIES[name].takes_budget or name.startswith("namm"):
            raise UserError(f"--heuristics: {name!r} is not a budgeted heuristic policy")
    if not (Path(cfg.namm_dir) / DEFAULT_FILES["namm"]).exists():
        raise UserError(f"no zero-shot NAMM {cfg.namm_dir}/{DEFAULT_FILES['namm']}; evolve "
                        "one with scripts/evolve.py or pass --namm-dir")
    return tasks


def planned_cells(task, cfg: ExperimentConfig):
    """(label, policy, NAMM file) of the cells that need no budget, in running order."""
    folder = Path(cfg.namm_dir)
    zero_shot, mlp = (folder / DEFAULT_FILES[p] for p in ("namm", "namm-mlp"))
    cells = [("recompute", "recompute", None), ("window", "window", None),
             ("full", "full", None), ("namm", "namm", zero_shot)]
    if (folder / f"{task.name}.pt").exists():
        cells.append(("namm-local", "namm", folder / f"{task.name}.pt"))
    if mlp.exists() and task.name in cfg.mlp_tasks.split(","):
        cells.append(("namm-mlp", "namm-mlp", mlp))
    return cells


def cell_is_done(path, cfg, checkpoint_hash, namm_file):
    try:
        cell = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    same_namm = cell.get("namm_sha256") == (namm_file and sha256(namm_file))
    if (len(cell.get("episodes", [])) >= cfg.episodes and cell.get("seed") == cfg.seed
            and cell.get("checkpoint_sha256") == checkpoint_hash and same_namm):
        return cell
    return None


def run_task(task, cfg: ExperimentConfig, progress=True):
    """Run (or resume) every cell of one task; returns {label: results file}."""
    checkpoint = SHIPPED_DIR / f"{task.name}.pt"
    model, payload = load_model(checkpoint)
    checkpoint_hash = sha256(checkpoint)
    folder = Path(cfg.out) / "cells" / task.name
    done = {}

    def cell(label, policy, namm_file=None, budget=None):
        path = folder / f"{label}.json"
        done[label] = cell_is_done(path, cfg, checkpoint_hash, namm_file)
        if done[label] is None:
            done[label] = rollout_cell(model, payload, checkpoint, task, policy, cfg.episodes,
                                       cfg.seed, cfg.slots, budget=budget, namm_file=namm_file,
                                       progress=progress, label=label)
            write_json(path, done[label])

    for label, policy, namm_file in planned_cells(task, cfg):
        cell(label, policy, namm_file)
    matched = max(3, round(done["namm"]["summary"]["mean_tokens"]))
    budgets = sorted({matched if b == "matched" else int(b) for b in cfg.budgets.split(",")})
    for name in cfg.heuristics.split(","):
        for budget in budgets:
            cell(f"{name}@{budget}", name, budget=budget)
    stale = sorted(p.stem for p in folder.glob("*.json") if p.stem not in done)
    if stale:  # e.g. a matched budget of an earlier NAMM: the report would include them
        print(f"note: {folder} also holds cells this run did not plan: {', '.join(stale)}; "
              "delete them if they are stale")
    return done


def run(cfg: ExperimentConfig):
    tasks = experiment_tasks(cfg)
    for task in tqdm(tasks, desc="experiment", unit="task"):
        run_task(task, cfg)
    return tasks


def report(cfg: ExperimentConfig, readme=None, plots=True):
    """report.{json,csv,md} over every cell in <out>/cells, the plots, and the README's
    table (between its gains-table markers) when readme is given."""
    out = Path(cfg.out)
    rows = summarise(load_cells(out / "cells", cfg.episodes), cfg.episodes)
    write_report(rows, out)
    table = markdown(rows)
    print(table)
    if readme is not None:
        embed_in_readme(readme, "gains-table", table,
                        "python scripts/run_experiment.py --update-readme", "results/report.json")
    if plots:
        from dtmem import plots as figures

        figures.pareto(rows, out / "pareto.png")
        for name in sorted({r["task"] for r in rows}):
            task = resolve_task(task=name)
            model, payload = load_model(SHIPPED_DIR / f"{name}.pt")
            fractions = figures.kept_tokens(model, payload, task,
                                            Path(cfg.namm_dir) / DEFAULT_FILES["namm"])
            figures.kept_heatmap(fractions, name, out / f"namm-kept-{name}.png")
        logs = figures.evolution_logs(cfg.namm_dir)
        if logs:
            figures.evolution_curves(logs, out / "evolution.png")
    print(f"wrote {out}/report.json, report.csv, report.md" + (" and plots" if plots else ""))
