"""The experiment behind the table of return gains (`scripts/run_experiment.py`): every
memory policy on every shipped DT, one results file per cell, then the report.

Per task, in two phases (the matched budgets need the NAMMs' cache sizes first); each
phase is one map of a backend (dtmem/backend.py) over every task's cells, which may run
at once:
  1. recompute (the base of every gain), window, full;
     namm        the zero-shot NAMM (<namm_dir>/default.pt, by default the shipped one),
                 where present;
     namm-local  the NAMM evolved on this very task (<namm_dir>/<task>.pt), where present;
     namm-mlp    the MLP NAMM (<namm_dir>/default-mlp.pt), on the tasks of mlp_tasks;
  2. every heuristic at each of `budgets`: token counts, and `matched`: each NAMM's (namm,
     namm-local) own mean cache size on this task in the DEVELOPMENT block, so that the
     confirmation block's budgets are fixed before it runs.
Every cell of a block meets the same env seeds (the block's first seed + 0..episodes-1),
so gains pair by seed. A cell whose results file already holds enough episodes of the
same checkpoint and policy is kept, so an interrupted run resumes where it stopped.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from dtmem.backend import LocalBackend
from dtmem.checkpoints import Checkpoint, shipped_path
from dtmem.errors import UserError
from dtmem.files import ensure_writable
from dtmem.limits import check
from dtmem.memory import POLICIES, PolicySpec, ScoredPolicy
from dtmem.memory.namm.io import SHIPPED_DIR as NAMM_DIR
from dtmem.report import embed_in_readme, markdown, write_report
from dtmem.report import report as report_rows
from dtmem.results import BLOCKS, cell_path, ensure_cell, matched_budget, read_cell
from dtmem.tasks import all_tasks, resolve_task


@dataclass
class ExperimentConfig:
    """One run of the experiment; its cells go to <out>/<block folder>/<task>/<cell>.json."""

    tasks: str = ""
    """comma-separated tasks (default: every task with a shipped DT)"""
    episodes: int = 50
    """episodes per cell (the report refuses cells with fewer)"""
    budgets: str = "matched,60"
    """heuristics' token budgets: numbers, or matched (the NAMM's mean cache size); 60 =
    20 DT steps, the DT's own context"""
    heuristics: str = "streaming,h2o,l2,random,tova,snapkv,keydiff"
    """comma-separated budgeted policies run at the matched and the fixed budget"""
    mlp_tasks: str = "hopper-medium,halfcheetah-medium"
    """tasks that also run the shipped MLP NAMM (the paper's BAM vs MLP ablation)"""
    block: str = "development"
    """env seed block: development (seeds 0..49, cells/) or confirmation (100000.., confirm/)"""
    cells: str = ""
    """run only these cells, by name (e.g. recompute,window,full); default all planned"""
    slots: int = 50
    """episodes run in lockstep"""
    out: str = "results"
    """where cells/, report.{json,csv,md} and the plots go"""
    namm_dir: str = ""
    """NAMM files default.pt (zero-shot), default-mlp.pt, <task>.pt (evolved on it)
    (default: the shipped ones)"""
    dt_dir: str = ""
    """DT checkpoints <task>.pt (default: the shipped ones), e.g. other training seeds'"""


FOLDERS = {"development": "cells", "confirmation": "confirm"}  # below cfg.out
NAMM_CELLS = ("namm", "namm-local")  # the NAMMs heuristics are matched to


def block_folder(cfg: ExperimentConfig, block=None):
    return Path(cfg.out) / FOLDERS[block or cfg.block]


def experiment_tasks(cfg: ExperimentConfig):
    check(cfg)
    if cfg.block not in BLOCKS:
        raise UserError(f"--block must be one of {', '.join(BLOCKS)}, got {cfg.block!r}")
    if cfg.tasks:
        tasks = [resolve_task(task=name) for name in cfg.tasks.split(",")]
    else:
        tasks = [t for t in all_tasks().values() if dt_file(cfg, t.name).exists()]
    if not tasks:  # no --tasks, and no <task>.pt where the DTs should be
        folder = cfg.dt_dir or shipped_path("any").parent
        raise UserError(f"no DT of any task (<task>.pt) in {folder}; give the folder of the "
                        "DTs' checkpoints as --dt-dir")
    missing = [t.name for t in tasks if not dt_file(cfg, t.name).exists()]
    if missing and cfg.dt_dir:
        raise UserError(f"no DT for {', '.join(missing)} in {cfg.dt_dir}; give another --dt-dir")
    if missing:
        raise UserError(f"no shipped DT for {', '.join(missing)}; train it with "
                        "scripts/build_suite.py --stages dts")
    for budget in cfg.budgets.split(","):
        if budget != "matched" and not (budget.isdigit() and int(budget) >= 3):
            raise UserError(f"--budgets: {budget!r} is neither a token count >= 3 nor matched")
    for name in cfg.heuristics.split(","):
        if name not in POLICIES or not issubclass(POLICIES[name], ScoredPolicy):
            raise UserError(f"--heuristics: {name!r} is not a budgeted heuristic policy")
    if not any(namm_cells(cfg, task) for task in tasks):
        raise UserError(f"no NAMM for these tasks in {namm_folder(cfg)} (default.pt or "
                        "<task>.pt); evolve one with scripts/evolve.py or pass --namm-dir")
    if cfg.cells:  # a misspelt name would otherwise run nothing, silently
        planned = {spec.cell_name for task in tasks for spec in planned_cells(task, cfg)}
        heuristics = cfg.heuristics.split(",")
        unknown = sorted(name for name in cfg.cells.split(",") if name not in planned and not (
            name.partition("@")[0] in heuristics and name.partition("@")[2].isdigit()))
        if unknown:
            raise UserError(f"--cells: {', '.join(unknown)} is no cell of this run; its cells "
                            f"are {', '.join(sorted(planned))} and HEURISTIC@BUDGET for a "
                            "heuristic of --heuristics")
    return tasks


def namm_folder(cfg: ExperimentConfig):
    return Path(cfg.namm_dir) if cfg.namm_dir else NAMM_DIR


def namm_file(cfg: ExperimentConfig, name):
    return namm_folder(cfg) / f"{name}.pt"


def dt_file(cfg: ExperimentConfig, name):
    return Path(cfg.dt_dir) / f"{name}.pt" if cfg.dt_dir else shipped_path(name)


def namm_cells(cfg: ExperimentConfig, task):
    """{cell label: NAMM file} of the NAMM cells whose file is there: namm (default.pt) and
    namm-local (<task>.pt); a folder of other evolution seeds' NAMMs may hold only the latter."""
    files = {"namm": namm_file(cfg, "default"), "namm-local": namm_file(cfg, task.name)}
    return {label: path for label, path in files.items() if path.exists()}


def planned_cells(task, cfg: ExperimentConfig):
    """The cells that need no budget, in running order."""
    cells = [PolicySpec("recompute"), PolicySpec("window"), PolicySpec("full")]
    cells += [PolicySpec("namm", options={"namm_file": path}, label=label)
              for label, path in namm_cells(cfg, task).items()]
    if namm_file(cfg, "default-mlp").exists() and task.name in cfg.mlp_tasks.split(","):
        cells.append(PolicySpec("namm-mlp", options={"namm_file": namm_file(cfg, "default-mlp")},
                                label="namm-mlp"))
    return cells


def matched_budgets(task, cfg: ExperimentConfig):
    """Each NAMM's mean cache size on this task in the development block (None where its
    development cell has not run yet)."""
    budgets = {}
    for label in NAMM_CELLS:
        cell = read_cell(cell_path(block_folder(cfg, "development"), task.name, label))
        budgets[label] = cell and matched_budget(cell)
    return budgets


def budgeted_cells(task, cfg: ExperimentConfig):
    """Every heuristic at every budget, fixed and matched; the matched budgets are read from
    the development block's NAMM cells, so these run after the planned cells."""
    wanted = set(cfg.cells.split(",")) if cfg.cells else None
    fixed = {int(b) for b in cfg.budgets.split(",") if b != "matched"}
    matched = matched_budgets(task, cfg) if "matched" in cfg.budgets.split(",") else {}
    planned = list(namm_cells(cfg, task))
    missing = [label for label in planned if label in matched and matched[label] is None]
    if missing and (wanted is None or any("@" in name for name in wanted)):
        raise UserError(f"{task.name}: the matched budgets need the development block's "
                        f"{', '.join(missing)} cells; run them first")
    return [PolicySpec(name, budget=budget)
            for budget in sorted(fixed | {b for b in matched.values() if b is not None})
            for name in cfg.heuristics.split(",")]


def cell_job(path, checkpoint, task, spec, episodes, seed, slots, progress):
    """One cell as a backend's job: ensure_cell on one torch thread (the fastest for a
    rollout's many small ops, and the same wherever the job runs)."""
    torch.set_num_threads(1)
    return ensure_cell(path, checkpoint, task, spec, episodes, seed, slots, progress)


def run(cfg: ExperimentConfig, backend=None):
    """Run (or resume) every cell of every task as jobs of `backend` (default: in this
    process), in two phases, each one map: the planned cells of every task, then the
    heuristics, whose matched budgets are the first phase's NAMM cells."""
    tasks = experiment_tasks(cfg)
    for task in tasks:  # every task's folder of cells is writable, before the first cell
        ensure_writable(cell_path(block_folder(cfg), task.name, "recompute"))
    backend = backend or LocalBackend()
    checkpoints = {task.name: Checkpoint.for_task(task, dt_file(cfg, task.name))
                   for task in tasks}
    wanted = set(cfg.cells.split(",")) if cfg.cells else None
    done = {task.name: set() for task in tasks}
    for phase in (planned_cells, budgeted_cells):
        jobs = [(cell_path(block_folder(cfg), task.name, spec.cell_name),
                 checkpoints[task.name], task, spec, cfg.episodes, BLOCKS[cfg.block],
                 cfg.slots, backend.in_process)
                for task in tasks for spec in phase(task, cfg)
                if wanted is None or spec.cell_name in wanted]
        backend.map(cell_job, jobs)
        for path, _, task, *_ in jobs:
            done[task.name].add(path.stem)
    for task in tasks:
        folder = block_folder(cfg) / task.name
        stale = sorted(p.stem for p in folder.glob("*.json") if p.stem not in done[task.name])
        if stale and wanted is None:  # e.g. a matched budget of an earlier NAMM
            print(f"note: {folder} also holds cells this run did not plan: "
                  f"{', '.join(stale)}; delete them if they are stale")
    return tasks


def report(cfg: ExperimentConfig, readme=None, plots=True):
    """report.{json,csv,md} over every cell in <out>/cells, the plots, and the README's
    table (between its gains-table markers) when readme is given."""
    out = Path(cfg.out)
    rows, comparisons = report_rows(block_folder(cfg, "development"),
                                    block_folder(cfg, "confirmation"), cfg.episodes)
    write_report(rows, comparisons, out)
    table = markdown(rows, comparisons)
    print(table)
    if readme is not None:
        embed_in_readme(readme, "gains-table", table,
                        "python scripts/run_experiment.py --report --update-readme",
                        "results/report.json")
    if plots:
        from dtmem import plots as figures

        figures.pareto(rows, out / "pareto.png")
        for name in sorted({r["task"] for r in rows}):
            task = resolve_task(task=name)
            fractions = figures.kept_tokens(Checkpoint.shipped(name), task,
                                            PolicySpec("namm", options={
                                                "namm_file": namm_file(cfg, "default")}))
            figures.kept_heatmap(fractions, name, out / f"namm-kept-{name}.png")
        logs = figures.evolution_logs(namm_folder(cfg))
        if logs:
            figures.evolution_curves(logs, out / "evolution.png")
    print(f"wrote {out}/report.json, report.csv, report.md" + (" and plots" if plots else ""))
