"""`dtmem report`: the table of return gains from rollout results files (`--json`).

Each results file is one cell (dtmem/results.py): a task, a memory policy (and budget),
every episode with its env seed. The report refuses cells it cannot trust instead of
averaging them (results.load_cells): fewer episodes than asked, missing or mismatched
seeds (gains are paired by seed), or a checkpoint other than the task's shipped one.
"""

import csv
from pathlib import Path

import numpy as np

from dtmem.errors import UserError
from dtmem.files import atomic_path, provenance, write_json
from dtmem.results import BLOCKS, load_cells, matched_budget
from dtmem.stats import bootstrap_ci, bootstrap_p, holm
from dtmem.tasks import all_tasks

BASE = "recompute"  # the field's standard evaluation: gains are measured against it


FIRST_CELLS = ["recompute", "window", "full", "namm", "namm-local", "namm-mlp"]


def cell_order(name):
    """Table order: the base and the NAMMs first, then each heuristic by budget."""
    if name in FIRST_CELLS:
        return (FIRST_CELLS.index(name), "", 0, "")
    policy, _, budget = name.partition("@")
    size, _, settings = budget.partition("[")
    return (len(FIRST_CELLS), policy, float(size or 0), settings)


def summarise(cells, episodes, block="development"):
    """Rows: task, cell, score mean and CI (and on D4RL's scale), gain over the base with
    its paired CI and p-value, tokens; from the cells of one env seed block."""
    rows = []
    for task, by_name in sorted(cells.items()):
        if BASE not in by_name:
            raise UserError(f"{task} has no {BASE} cell, the base of every gain; run it")
        base = scores_of(by_name[BASE], episodes)
        full = by_name.get("full")
        full_tokens = full["summary"]["mean_tokens"] if full else None
        for name, cell in sorted(by_name.items(), key=lambda item: cell_order(item[0])):
            scores = scores_of(cell, episodes)
            if cell["seed"] != by_name[BASE]["seed"]:
                raise UserError(f"{task} {name} used other env seeds than {BASE}; pairing "
                                "needs the same seeds")
            tokens = np.mean([e["mean_tokens"] for e in cell["episodes"][:episodes]])
            mean_return = np.mean([e["ret"] for e in cell["episodes"][:episodes]])
            d4rl = all_tasks()[task].d4rl_score(mean_return) if task in all_tasks() else None
            rows.append({
                "task": task, "cell": name, "block": block, "seed": cell["seed"],
                "episodes": episodes, "score": float(scores.mean()),
                "score_ci95": list(bootstrap_ci(scores)),
                "d4rl_score": None if d4rl is None else float(d4rl),
                "gain": float((scores - base).mean()),
                "gain_ci95": list(bootstrap_ci(scores - base)),
                "gain_p": None if name == BASE else bootstrap_p(scores - base),
                "clear": False,
                "mean_tokens": float(tokens),
                "max_tokens": max(e["max_tokens"] for e in cell["episodes"][:episodes]),
                "tokens_vs_full": None if not full_tokens else float(tokens / full_tokens),
                "checkpoint_sha256": cell.get("checkpoint_sha256"),
                "checkpoint_steps": cell.get("checkpoint_steps"),
                "dataset_id": cell.get("dataset_id"),
                "namm_sources": cell.get("namm_sources"),
                "reference": cell.get("reference"), "target_return": cell.get("target_return"),
            })
    return rows


def scores_of(cell, episodes):
    return np.array([e["score"] for e in cell["episodes"][:episodes]])


def headline(development, confirmation, episodes, alpha=0.05):
    """The table: each cell from its confirmation block where it has one, else from its
    development block (marked so, and never called clear). A gain is clear when Holm-
    Bonferroni over every non-base confirmation cell of the table rejects "no gain" at
    family-wise error rate alpha, by the paired bootstrap p-value behind its CI."""
    confirmed = {(r["task"], r["cell"]): r
                 for r in summarise(confirmation, episodes, "confirmation")}
    rows = [confirmed.pop((r["task"], r["cell"]), r)
            for r in summarise(development, episodes, "development")]
    rows += list(confirmed.values())  # confirmed cells with no development counterpart
    family = [r for r in rows if r["block"] == "confirmation" and r["cell"] != BASE]
    for row, clear in zip(family, holm([r["gain_p"] for r in family], alpha)):
        row["clear"] = clear
    return rows


def namm_vs_heuristics(development, confirmation, episodes, alpha=0.05):
    """Is it the policy, or just a larger cache? For each NAMM cell of the confirmation
    block, its paired difference to every heuristic at the NAMM's own budget (its
    development-block cache size, fixed before the confirmation block ran), Holm-corrected
    over all these comparisons."""
    rows = []
    for task, by_name in sorted(confirmation.items()):
        for namm in ("namm", "namm-local"):
            if namm not in by_name or namm not in development.get(task, {}):
                continue
            budget = matched_budget(development[task][namm])
            own = scores_of(by_name[namm], episodes)
            for name, cell in sorted(by_name.items()):
                if name.endswith(f"@{budget}"):
                    difference = own - scores_of(cell, episodes)
                    rows.append({"task": task, "namm": namm, "heuristic": name,
                                 "difference": float(difference.mean()),
                                 "difference_ci95": list(bootstrap_ci(difference)),
                                 "p": bootstrap_p(difference)})
    for row, clear in zip(rows, holm([r["p"] for r in rows], alpha)):
        row["clear"] = clear
    return rows


def transfer(task, sources):
    """How a NAMM relates to the task it runs on: zero-shot unless evolved on it."""
    where = "evolved on " + ", ".join(sources)
    return where if task in sources else f"zero-shot ({where})"


def markdown(rows, comparisons=()):
    lines = ["| task | policy | block | score [95% CI] | D4RL scale | gain vs recompute "
             "[95% CI] | clear (Holm) | mean tokens (x full) | max tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["tokens_vs_full"] is None else f" ({r['tokens_vs_full']:.2f})"
        d4rl = "" if r["d4rl_score"] is None else f"{r['d4rl_score']:.1f}"
        clear = ("" if r["cell"] == BASE else "yes" if r["clear"]
                 else "no" if r["block"] == "confirmation" else "development only")
        lines.append(
            f"| {r['task']} | {r['cell']} | {r['block']} | {r['score']:.1f} "
            f"[{r['score_ci95'][0]:.1f}, {r['score_ci95'][1]:.1f}] | {d4rl} | "
            f"{r['gain']:+.1f} [{r['gain_ci95'][0]:+.1f}, {r['gain_ci95'][1]:+.1f}] | "
            f"{clear} | {r['mean_tokens']:.0f}{ratio} | {r['max_tokens']} |")
    lines.append("")
    # What every task's numbers rest on: the DT's budget, its data, the references.
    for task in sorted({r["task"] for r in rows}):
        r = next(r for r in rows if r["task"] == task and r["cell"] == BASE)
        ref = r["reference"] or {}
        origin = "built locally by dtmem" if str(r["dataset_id"]).startswith("dtmem/") \
            else "Minari remote"
        lines.append(f"- {task}: DT of {r['checkpoint_steps']} updates on {r['dataset_id']} "
                     f"({origin}); score 0 = {ref.get('min')}, 100 = {ref.get('max')} "
                     f"({ref.get('source')} references); target return {r['target_return']}; "
                     f"{r['episodes']} episodes per cell, env seeds paired across cells."
                     + "".join(f" {n['cell']}: {transfer(task, n['namm_sources'])}."
                               for n in rows if n["task"] == task and n["namm_sources"]))
    family = sum(r["block"] == "confirmation" and r["cell"] != BASE for r in rows)
    lines += ["", f"Blocks: development = env seeds from {BLOCKS['development']} (every choice "
              f"looked at these); confirmation = env seeds from {BLOCKS['confirmation']}, "
              "run once every choice was fixed. Clear (Holm): Holm-Bonferroni at family-wise "
              f"5% over the {family} non-base confirmation cells of this table, on the paired "
              "bootstrap p-values of their gains; the CIs shown are uncorrected 95% "
              "intervals. A development-only cell is never called clear. D4RL scale: the "
              "same mean return against D4RL's reference returns (older env versions, so "
              "indicative only)."]
    if comparisons:
        lines += ["", "Is it the policy or the cache? Each NAMM against every heuristic at "
                  "the NAMM's own budget (its development-block mean cache size), paired by "
                  f"seed on the confirmation block; Holm over these {len(comparisons)} "
                  "comparisons.", "",
                  "| task | NAMM | heuristic | NAMM minus heuristic [95% CI] | clear (Holm) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['task']} | {c['namm']} | {c['heuristic']} | {c['difference']:+.1f} "
                  f"[{c['difference_ci95'][0]:+.1f}, {c['difference_ci95'][1]:+.1f}] | "
                  f"{'yes' if c['clear'] else 'no'} |" for c in comparisons]
    return "\n".join(lines) + "\n"


def write_report(rows, comparisons, out):
    out = Path(out)
    write_json(out / "report.json", {"provenance": provenance(), "rows": rows,
                                     "namm_vs_heuristics": comparisons})
    with atomic_path(out / "report.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            fields = ["task", "cell", "block", "episodes", "score", "d4rl_score", "gain",
                      "gain_p", "clear", "mean_tokens", "max_tokens", "tokens_vs_full"]
            writer = csv.DictWriter(f, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(rows, comparisons))


def report(development, confirmation, episodes, require_shipped=True):
    """(rows, comparisons) from the folders of the development and confirmation blocks
    (the latter may be absent or empty: then every cell is development only)."""
    dev = load_cells(development, episodes, require_shipped)
    conf = (load_cells(confirmation, episodes, require_shipped)
            if confirmation and any(Path(confirmation).rglob("*.json")) else {})
    return headline(dev, conf, episodes), namm_vs_heuristics(dev, conf, episodes)


def seed_spread(runs, episodes):
    """Beyond env seeds: the same cells made by other training or evolution seeds. runs:
    {run name: folder of cells of one env seed block}. Rows per (task, cell) present in
    every run: for the base, each run's score with its CI and how many episodes ended
    early (the DT's falls); for every other cell, each run's gain over the base with its
    paired CI, and whether the claim holds across runs (every CI excludes zero, on the
    same side)."""
    cells = {name: load_cells(folder, episodes, require_shipped=False)
             for name, folder in runs.items()}
    summaries = {name: {(r["task"], r["cell"]): r for r in summarise(by_task, episodes)}
                 for name, by_task in cells.items()}
    blocks = {row["seed"] for rows in summaries.values() for row in rows.values()}
    if len(blocks) > 1:
        raise UserError("the runs' cells start at different env seeds "
                        f"({', '.join(map(str, sorted(blocks)))}); compare one block")
    common = sorted(set.intersection(*(set(rows) for rows in summaries.values())),
                    key=lambda key: (key[0], cell_order(key[1])))
    rows = []
    for task, cell in common:
        per_run = {name: summaries[name][(task, cell)] for name in runs}
        if cell == BASE:
            rows.append({"task": task, "cell": cell,
                         "scores": {name: [r["score"], *r["score_ci95"]]
                                    for name, r in per_run.items()},
                         "ended_early": {name: ended_early(cells[name][task][cell], episodes)
                                         for name in runs}})
            continue
        sides = {side(r["gain_ci95"]) for r in per_run.values()}
        rows.append({"task": task, "cell": cell,
                     "gains": {name: [r["gain"], *r["gain_ci95"]] for name, r in per_run.items()},
                     "holds": len(sides) == 1 and 0 not in sides,
                     "direction": "gain" if sides == {1} else "loss" if sides == {-1} else None})
    return rows


def ended_early(cell, episodes):
    """Episodes that ended before the task's time limit: in hopper, walker2d and ant the
    body fell (halfcheetah cannot)."""
    limit = all_tasks()[cell["task"]].max_episode_steps
    return sum(e["length"] < limit for e in cell["episodes"][:episodes])


def side(ci):
    """+1 where a CI lies above zero, -1 below it, 0 where it covers zero."""
    return 1 if ci[0] > 0 else -1 if ci[1] < 0 else 0


def spread_markdown(rows, runs):
    header = "| task | cell | " + " | ".join(runs) + " |"
    rule = "|---|---|" + "---|" * len(runs)
    bases = [header, rule]
    gains = [header[:-1] + "| holds across runs |", rule + "---|"]
    for row in rows:
        if "scores" in row:
            cells = " | ".join("{:.1f} [{:.1f}, {:.1f}]".format(*row["scores"][name])
                               + f", {row['ended_early'][name]} ended early" for name in runs)
            bases.append(f"| {row['task']} | {row['cell']} | {cells} |")
            continue
        cells = " | ".join("{:+.1f} [{:+.1f}, {:+.1f}]".format(*row["gains"][name])
                           for name in runs)
        holds = f"yes, a {row['direction']}" if row["holds"] else "no"
        gains.append(f"| {row['task']} | {row['cell']} | {cells} | {holds} |")
    return ("\n".join(bases)
            + f"\n\nThe base of every gain: {BASE}'s normalised score with its 95% CI, and how "
            "many episodes ended before the time limit (a fall), per run.\n\n"
            + "\n".join(gains)
            + f"\n\nGain over {BASE} with its 95% CI paired by env seed, per run; a claim "
            "holds across runs when every run's CI excludes zero on the same side "
            "(uncorrected).\n")


def embed_in_readme(readme, marker, table, command, source):
    """Replace the README's generated block between <!-- marker --> and <!-- /marker -->
    with `table` and the command that made it; a README without the markers is left alone."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    readme = Path(readme)
    text = readme.read_text()
    if start not in text or end not in text:
        return
    head, rest = text.split(start, 1)
    block = f"{start}\nGenerated by `{command}` from `{source}`:\n\n{table}"
    with atomic_path(readme) as tmp:
        tmp.write_text(head + block + end + rest.split(end, 1)[1])
