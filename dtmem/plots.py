"""The report's figures (PNG, matplotlib from the `plots` extra):
  pareto.png             per task, normalised score vs mean cache size of every cell;
  namm-kept-<task>.png   which tokens the NAMM keeps over an episode: kind by age, per layer;
  evolution.png          the CMA-ES curves of the shipped NAMMs' evolution logs.
"""

import csv
from pathlib import Path

import numpy as np
import torch

from dtmem.cache import ACTION, RETURN, STATE
from dtmem.errors import UserError
from dtmem.results import build_policy
from dtmem.rollout import rollout

KIND_NAMES = {RETURN: "return-to-go", STATE: "state", ACTION: "action"}


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install -e \".[plots]\"") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def pareto(rows, path):
    """Score [95% CI] against mean cached tokens, one panel per task, one point per cell.
    One colour and marker per policy, named once in a shared legend, so that the labels
    of a task's dozen cells do not pile up on each other."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    tasks = sorted({r["task"] for r in rows})
    policies = list(dict.fromkeys(r["cell"].split("@")[0] for r in rows))
    style = {p: (f"C{i % 10}", "*" if p.startswith("namm") else "osD^v<>ph"[i % 9])
             for i, p in enumerate(policies)}
    cols = min(4, len(tasks))
    n_rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.6 * n_rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for r in (r for r in rows if r["task"] == task):
            lo, hi = r["score_ci95"]
            color, marker = style[r["cell"].split("@")[0]]
            ax.errorbar(r["mean_tokens"], r["score"], yerr=[[r["score"] - lo], [hi - r["score"]]],
                        fmt=marker, color=color, capsize=2,
                        markersize=9 if marker == "*" else 5)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor log ticks' labels collide
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("mean cached tokens per layer")
        ax.set_ylabel("normalised score")
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=color, marker=marker, linestyle="", label=policy)
               for policy, (color, marker) in style.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=7,
               title="policy (budgets as in the table)", title_fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


class KeptTokens:
    """Wraps a memory policy and counts, after each eviction, the tokens up to max_age steps
    old each layer still holds, by kind and age (it watches slot 0: run one episode)."""

    def __init__(self, policy, max_age):
        self.policy, self.max_age = policy, max_age
        self.name, self.uses_cache = policy.name, policy.uses_cache
        self.needs_attention = policy.needs_attention
        self.kept = None  # [L, 3, max_age + 1] token counts summed over steps
        self.steps = np.zeros(max_age + 1)  # steps at which each age was possible

    def capacity(self):
        return self.policy.capacity()

    def prepare(self, cache):
        self.policy.prepare(cache)
        self.kept = torch.zeros(cache.n_layers, 3, self.max_age + 1)

    def reset(self, slots):
        self.policy.reset(slots)

    def keep_slots(self, slots):
        self.policy.keep_slots(slots)

    def after_step(self, cache, timestep, attention):
        self.policy.after_step(cache, timestep, attention)
        t = int(timestep[0])
        for layer in range(cache.n_layers):
            age = t - cache.timestep[layer, 0]
            held = cache.valid[layer, 0] & (age <= self.max_age)
            age = age[held]
            self.kept[layer].index_put_((cache.kind[layer, 0, held].cpu(), age.cpu()),
                                        torch.ones(len(age)), accumulate=True)
        self.steps[: min(t, self.max_age) + 1] += 1


def kept_tokens(checkpoint, task, spec, seed=0, max_age=200):
    """Fraction of tokens of each kind and age the policy of `spec` (a NAMM) holds over
    one episode, [L, 3, ages]."""
    recorder = KeptTokens(build_policy(spec, checkpoint, task), max_age)
    rollout(checkpoint.model, checkpoint.state_mean, checkpoint.state_std, task, recorder,
            episodes=1, seed=seed)
    ages = int((recorder.steps > 0).sum())  # the episode may end before max_age
    return recorder.kept.numpy()[..., :ages] / recorder.steps[:ages]


def kept_table(fractions):
    """The fractions of kept_tokens as text: layer and kind by age band."""
    ages = [(0, 5), (5, 20), (20, fractions.shape[-1])]
    lines = [f"{'layer':>5} {'kind':>13} " + " ".join(f"{f'age {a}-{b - 1}':>11}"
                                                     for a, b in ages)]
    for layer in range(fractions.shape[0]):
        for kind, name in KIND_NAMES.items():
            cells = [fractions[layer, kind, a:b] for a, b in ages]
            lines.append(f"{layer:5d} {name:>13} " + " ".join(
                f"{np.mean(c):11.2f}" if len(c) else f"{'-':>11}" for c in cells))
    return "\n".join(lines)


def kept_heatmap(fractions, task_name, path):
    plt = pyplot()
    n_layers, n_kinds, n_ages = fractions.shape
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.3 * n_layers + 1.0), sharex=True,
                             squeeze=False, layout="constrained")
    for layer, ax in enumerate(axes[:, 0]):
        image = ax.imshow(fractions[layer], aspect="auto", vmin=0, vmax=1, cmap="viridis",
                          interpolation="nearest")
        ax.set_yticks(range(n_kinds), [KIND_NAMES[k] for k in range(n_kinds)], fontsize=7)
        ax.set_ylabel(f"layer {layer}", fontsize=8)
    axes[-1, 0].set_xlabel("age in steps")
    fig.colorbar(image, ax=axes[:, 0], label="fraction kept")
    fig.suptitle(f"{task_name}: tokens the NAMM keeps, by kind and age", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evolution_curves(logs, path):
    """logs: {name: log.csv path} of `dtmem evolve` runs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, log in sorted(logs.items()):
        with open(log, newline="") as f:
            rows = list(csv.DictReader(f))
        gen = [int(r["generation"]) for r in rows]
        line, = ax.plot(gen, [float(r["mean"]) for r in rows], label=f"{name}: population mean")
        ax.plot(gen, [float(r["best"]) for r in rows], ":", color=line.get_color(),
                label=f"{name}: best member")
        evals = [(g, float(r["mean_eval"])) for g, r in zip(gen, rows) if r["mean_eval"]]
        if evals:
            ax.plot(*zip(*evals), "o-", color=line.get_color(), markersize=3,
                    label=f"{name}: CMA-ES mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (normalised score)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evolution_logs(folder):
    return {p.stem.removesuffix("-log"): p for p in sorted(Path(folder).glob("*-log.csv"))}
