"""Named sets of defaults, chosen with `--preset NAME` on any command that has one.

`lab` makes each part of the course lab (docs/lab/) fit 15 minutes on a 2-core laptop:
a smaller DT, fewer updates, episodes and generations. `tiny` runs the same lab in
seconds; the test that runs every command of the handout uses it. Flags given
explicitly on the command line still win over a preset.
"""

PRESETS = {
    "lab": {
        "data build": {"behavior": "medium", "steps": 100_000},
        "train": {"steps": 1500, "n_embd": 64, "warmup_steps": 300, "eval_every": 500,
                  "eval_episodes": 5},
        "rollout": {"episodes": 20},
        "evolve": {"generations": 8, "population": 16, "episodes": 2, "eval_mean_every": 4,
                   "mean_episodes": 4},
        "experiment": {"episodes": 10, "budgets": "matched,15,30,60,120"},
        "report": {"episodes": 20},
    },
    "tiny": {
        "data build": {"behavior": "medium", "steps": 3000},
        "train": {"steps": 20, "n_embd": 32, "n_layer": 2, "warmup_steps": 5,
                  "eval_every": 0, "eval_episodes": 1},
        "rollout": {"episodes": 2},
        "evolve": {"generations": 2, "population": 4, "episodes": 1, "eval_mean_every": 1,
                   "mean_episodes": 1},
        "experiment": {"episodes": 2, "budgets": "30", "heuristics": "h2o,random"},
        "report": {"episodes": 2},
    },
}


def preset_defaults(preset, command):
    """The defaults `preset` sets for `command` ("train", "data build", ...), or {}."""
    return PRESETS[preset].get(command, {}) if preset else {}
