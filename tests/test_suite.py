"""The suite (dtmem/suite.py) end to end in miniature: policy selection from a PPO run,
measured reference returns written into the env's TOML file, datasets, DT training and the
results table, on Walker2d-v5 with tiny budgets. The PPO run is made of small numpy
policies (Stable-Baselines3 is an optional extra), laid out exactly as dtmem/ppo.py
writes it."""

import json
import tomllib

import pytest
import torch

from dtmem import checkpoints, data, suite, tasks
from dtmem.backend import LocalBackend
from dtmem.behavior import MLPPolicy
from dtmem.checkpoints import read_checkpoint
from dtmem.errors import UserError
from dtmem.files import sha256
from tests.test_behavior_bench import tiny_policy


SHIPPED_ENVS = tasks.ENVS_DIR


@pytest.fixture
def tmp_suite(tmp_path, monkeypatch):
    use_suite_folder(tmp_path, monkeypatch)
    yield tmp_path
    tasks.all_envs.cache_clear()


def use_suite_folder(tmp_path, monkeypatch):
    envs, policies, shipped = tmp_path / "envs", tmp_path / "policies", tmp_path / "ckpt"
    envs.mkdir(parents=True), policies.mkdir(), shipped.mkdir()
    text = (SHIPPED_ENVS / "walker2d.toml").read_text()
    # Start from an env without measured references, as before the suite first ran, and
    # whose PPO run is complete at 200k steps.
    text = text[:text.index("\n[reference.dtmem]") + 1].replace("steps = 1_000_000",
                                                          "steps = 200_000")
    (envs / "walker2d.toml").write_text(text)
    monkeypatch.setattr(tasks, "ENVS_DIR", envs)
    monkeypatch.setattr(data, "POLICIES_DIR", policies)
    monkeypatch.setattr(checkpoints, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    tasks.all_envs.cache_clear()


def fake_ppo_run(root, returns):
    run = root / "behavior" / "Walker2d-v5"
    rows = ["steps,mean_return,std_return,wall_seconds"]
    for i, ret in enumerate(returns):
        step = 50_000 * (i + 1)
        (run / f"step_{step}").mkdir(parents=True)
        tiny_policy(17, 6, seed=i).save(run / f"step_{step}" / "policy.npz")
        rows.append(f"{step},{ret},1.0,{10 * i}")
    (run / "progress.csv").write_text("\n".join(rows) + "\n")


def test_checkpoint_choice():
    # The best is the expert; medium is the earlier one in 1/3..1/2 of it closest to 0.4x
    # (320 is closer, but below a third), else the earlier one closest to 0.4x.
    assert suite.choose_checkpoints([320, 495, 1000, 900], "run") == (2, 1)
    assert suite.choose_checkpoints([100, 900, 1000], "run") == (2, 0)
    with pytest.raises(UserError, match="first checkpoint is its best"):
        suite.choose_checkpoints([1000, 900], "run")


def test_suite_in_miniature(tmp_suite):
    tmp, runs = tmp_suite, tmp_suite / "runs"
    fake_ppo_run(runs, [100.0, 400.0, 1000.0, 900.0])
    cfg = suite.SuiteConfig(reference_episodes=4, dataset_steps=1500, dt_steps=6,
                            result_episodes=2)
    suite.stage_policies("walker2d", cfg, runs / "behavior")
    meta = {q: MLPPolicy.load(suite.policy_path("walker2d", q)).meta
            for q in ("medium", "expert")}
    # Best 10-episode return (1000 at 150k) is the expert; medium sits at 1/3..1/2 of it.
    assert meta["expert"]["ppo_steps"] == 150_000 and meta["medium"]["ppo_steps"] == 100_000
    assert meta["expert"]["eval100_mean"] != meta["medium"]["eval100_mean"]
    assert (tmp / "policies" / "walker2d-progress.csv").exists()

    before = (tmp / "envs" / "walker2d.toml").read_text()
    suite.stage_references("walker2d", cfg)
    after = (tmp / "envs" / "walker2d.toml").read_text()
    # The file is only added to: its comments and settings stay as they were.
    assert after.startswith(before) and "# Measured by scripts/build_suite.py" in after
    refs = tomllib.loads(after)["reference"]["dtmem"]
    assert refs["expert"] == pytest.approx(meta["expert"]["eval100_mean"], abs=1e-3)
    assert refs["episodes"] == 4
    task = tasks.resolve_task(task="walker2d-medium")
    assert task.ref_source == "dtmem" and task.target_return == round(refs["expert"], -2)

    walker = [t for t in tasks.all_tasks().values() if t.env == "walker2d"]
    for t in walker:
        suite.stage_datasets(t, cfg)
        assert data.find_dataset(t)[0].storage.metadata["ref_max_score"] == refs["expert"]
        suite.stage_dts(t, cfg, runs)
        shipped = read_checkpoint(tmp / "ckpt" / f"{t.name}.pt")
        assert shipped["steps"] == 6 and shipped["training_state"] is None
    readme = tmp / "README.md"
    readme.write_text("intro\n<!-- suite-table -->\nold\n<!-- /suite-table -->\nrest\n")
    suite.stage_results(walker, cfg, tmp / "results" / "suite.json", readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- /suite-table -->\nrest\n")
    assert "old" not in text and text.count("| walker2d-") == 2
    results = json.loads((tmp / "results" / "suite.json").read_text())
    assert set(results["tasks"]) == {"walker2d-medium", "walker2d-expert"}
    for name, row in results["tasks"].items():
        assert set(row["policies"]) == {"recompute", "window", "full"}
        # Each policy is a results cell (dtmem/results.py) naming the exact checkpoint.
        for policy, cell in row["policies"].items():
            assert cell["task"] == name and cell["policy"] == policy
            assert cell["checkpoint_sha256"] == sha256(tmp / "ckpt" / f"{name}.pt")
            assert [e["seed"] for e in cell["episodes"]] == [0, 1]
    table = (tmp / "results" / "suite.md").read_text()
    assert table.count("| walker2d-") == 2 and "bootstrap" in table

    # Finished stages are skipped on a second run.
    shipped_dt = tmp / "ckpt" / "walker2d-medium.pt"
    files = [shipped_dt, tmp / "envs" / "walker2d.toml", suite.policy_path("walker2d", "expert")]
    before = [path.stat().st_mtime_ns for path in files]
    suite.build(cfg, ["policies", "references", "datasets", "dts"], ["walker2d"], None, runs,
                tmp / "results" / "suite.json")
    assert [path.stat().st_mtime_ns for path in files] == before


MINIATURE = suite.SuiteConfig(reference_episodes=4, dataset_steps=1500, dt_steps=6)


def built_suite(root, monkeypatch, backend=None):
    """walker2d's policies, references, datasets and DTs in miniature, built in a fresh
    folder by `backend`: (the env file's text, each shipped DT's weights)."""
    use_suite_folder(root, monkeypatch)
    fake_ppo_run(root / "runs", [100.0, 400.0, 1000.0, 900.0])
    suite.build(MINIATURE, ["policies", "references", "datasets", "dts"], ["walker2d"], None,
                root / "runs", root / "results" / "suite.json", backend=backend)
    weights = {name: read_checkpoint(root / "ckpt" / f"{name}.pt")["model"]
               for name in ("walker2d-medium", "walker2d-expert")}
    return (root / "envs" / "walker2d.toml").read_text(), weights


def assert_same_suite(a, b):
    assert a[0] == b[0]
    assert all(torch.equal(a[1][name][key], b[1][name][key])
               for name in a[1] for key in a[1][name])


def test_the_suite_on_two_workers_builds_what_one_process_builds(tmp_path, monkeypatch):
    """The env's stages, then the two tasks' stages, as jobs of two worker processes
    (started before the folders were chosen: they learn them from the jobs)."""
    alone = built_suite(tmp_path / "one", monkeypatch)
    with LocalBackend(2) as workers:
        assert_same_suite(alone, built_suite(tmp_path / "two", monkeypatch, workers))
    tasks.all_envs.cache_clear()
