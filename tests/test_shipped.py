"""Every shipped artifact loads safely and fits its task."""

import numpy as np
import pytest

from dtmem.behavior import MLPPolicy
from dtmem.checkpoints import SHIPPED_DIR
from dtmem.data import POLICIES_DIR, make_behavior
from dtmem.memory import POLICIES
from dtmem.memory.namm.io import load_namm, shipped_file
from dtmem.tasks import default_tasks, make_env

POLICY_FILES = sorted(POLICIES_DIR.glob("*.npz"))
CHECKPOINTS = sorted(SHIPPED_DIR.glob("*.pt"))


@pytest.mark.parametrize("path", POLICY_FILES, ids=[p.stem for p in POLICY_FILES])
def test_shipped_policy_fits_its_env_and_records_its_return(path):
    env_name, quality = path.stem.split("-", 1)
    task = default_tasks()[env_name]
    env = make_env(task)
    policy = make_behavior(quality, task, env.observation_space, env.action_space)
    assert isinstance(policy, MLPPolicy) and policy.meta["eval100_mean"] > 0
    obs, _ = env.reset(seed=0)
    action = policy.act(obs[None], np.random.default_rng(0))[0]
    assert env.action_space.contains(action)


@pytest.mark.parametrize("path", CHECKPOINTS, ids=[p.stem for p in CHECKPOINTS])
def test_shipped_checkpoint_runs_its_task(capsys, path):
    from dtmem.cli import main

    env = path.stem.split("-")[0]
    quality = path.stem.split("-", 1)[1]
    assert main(["rollout", "--task", f"{env}-{quality}", "--policy", "window",
                 "--episodes", "1"]) == 0
    assert "normalised score" in capsys.readouterr().out


NAMM_FILES = sorted(shipped_file("default").parent.glob("*.pt"))


def test_the_default_namm_ships():
    assert shipped_file("default").exists(), "`dtmem rollout --policy namm` needs data/namm/default.pt"


@pytest.mark.parametrize("path", NAMM_FILES, ids=[p.stem for p in NAMM_FILES])
def test_shipped_namm_declares_its_sources_and_runs(capsys, path):
    from dtmem.cli import main
    from dtmem.memory.namm import policy_for_file

    policy = policy_for_file(path)
    _, stats, n_up, meta = load_namm(path, POLICIES[policy].scorer)
    assert meta["stages"] and stats[2] > 0 and n_up % 16 == 0
    assert main(["rollout", "--env", "hopper", "--policy", policy, "--namm", str(path),
                 "--episodes", "1"]) == 0
    assert "normalised score" in capsys.readouterr().out


def test_no_committed_result_names_a_machine_path():
    """Results, reports and logs say where things are relative to the repository."""
    import re

    from dtmem.tasks import ROOT

    files = [p for pattern in ("results/**/*.json", "results/**/*.md", "results/**/*.csv",
                               "data/**/*.csv", "data/**/*.json", "docs/**/*.json",
                               "docs/**/*.md", "docs/**/*.txt")
             for p in ROOT.glob(pattern)]
    # torch.save stores its pickles uncompressed, so a checkpoint's strings (its
    # provenance) are read here as bytes, in latin-1 so that every byte maps to a char.
    checkpoints = list(ROOT.glob("data/**/*.pt")) + list(ROOT.glob("results/**/*.pt"))
    assert files and checkpoints
    for path in files + checkpoints:
        text = path.read_bytes().decode("latin-1") if path.suffix == ".pt" else path.read_text()
        assert str(ROOT) not in text, path
        assert not re.search(r'": "/|(?<![\w.])/(?:home|root|tmp|work|Users)/', text), path
