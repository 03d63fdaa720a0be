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
from dtmem.stats import bootstrap_ci

BASE = "recompute"  # the field's standard evaluation: gains are measured against it


FIRST_CELLS = ["recompute", "window", "full", "namm", "namm-local", "namm-mlp"]


def cell_order(name):
    """Table order: the base and the NAMMs first, then each heuristic by budget."""
    if name in FIRST_CELLS:
        return (FIRST_CELLS.index(name), "", 0)
    policy, _, budget = name.partition("@")
    return (len(FIRST_CELLS), policy, float(budget or 0))


def summarise(cells, episodes):
    """Rows: task, cell, score mean and CI, gain over the base with its paired CI, tokens."""
    rows = []
    for task, by_name in sorted(cells.items()):
        if BASE not in by_name:
            raise UserError(f"{task} has no {BASE} cell, the base of every gain; run it")
        base = np.array([e["score"] for e in by_name[BASE]["episodes"][:episodes]])
        full = by_name.get("full")
        full_tokens = full["summary"]["mean_tokens"] if full else None
        for name, cell in sorted(by_name.items(), key=lambda item: cell_order(item[0])):
            scores = np.array([e["score"] for e in cell["episodes"][:episodes]])
            if cell["seed"] != by_name[BASE]["seed"]:
                raise UserError(f"{task} {name} used other env seeds than {BASE}; pairing "
                                "needs the same seeds")
            tokens = np.mean([e["mean_tokens"] for e in cell["episodes"][:episodes]])
            rows.append({
                "task": task, "cell": name, "episodes": episodes,
                "score": float(scores.mean()), "score_ci95": list(bootstrap_ci(scores)),
                "gain": float((scores - base).mean()),
                "gain_ci95": list(bootstrap_ci(scores - base)),
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


def transfer(task, sources):
    """How a NAMM relates to the task it runs on: zero-shot unless evolved on it."""
    where = "evolved on " + ", ".join(sources)
    return where if task in sources else f"zero-shot ({where})"


def markdown(rows):
    lines = ["| task | policy | score [95% CI] | gain vs recompute [95% CI] | mean tokens "
             "(x full) | max tokens |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["tokens_vs_full"] is None else f" ({r['tokens_vs_full']:.2f})"
        lines.append(
            f"| {r['task']} | {r['cell']} | {r['score']:.1f} [{r['score_ci95'][0]:.1f}, "
            f"{r['score_ci95'][1]:.1f}] | {r['gain']:+.1f} [{r['gain_ci95'][0]:+.1f}, "
            f"{r['gain_ci95'][1]:+.1f}] | {r['mean_tokens']:.0f}{ratio} | {r['max_tokens']} |")
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
    return "\n".join(lines) + "\n"


def write_report(rows, out):
    out = Path(out)
    write_json(out / "report.json", {"provenance": provenance(), "rows": rows})
    with atomic_path(out / "report.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            fields = ["task", "cell", "episodes", "score", "gain", "mean_tokens", "max_tokens",
                      "tokens_vs_full"]
            writer = csv.DictWriter(f, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown(rows))


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
