"""scripts/build_suite.py end to end in miniature: policy selection from a PPO run,
measured reference returns, datasets, DT training and the results table, on Walker2d-v5
with tiny budgets. The PPO run is made of small numpy policies (Stable-Baselines3 is an
optional extra), laid out exactly as scripts/train_behavior.py writes it."""

import importlib.util
import json
import tomllib

import pytest

from dtmem import checkpoints, data, tasks
from dtmem.behavior import MLPPolicy
from dtmem.checkpoints import read_checkpoint
from tests.test_behavior_bench import tiny_policy


@pytest.fixture
def suite(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("build_suite",
                                                  tasks.ROOT / "scripts" / "build_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    envs, policies, shipped = tmp_path / "envs", tmp_path / "policies", tmp_path / "ckpt"
    envs.mkdir(), policies.mkdir(), shipped.mkdir()
    text = (tasks.ENVS_DIR / "walker2d.toml").read_text()
    # Start from an env without measured references, as before the suite first ran.
    start, end = text.find("# Measured by"), text.find("# D4RL's reference returns")
    (envs / "walker2d.toml").write_text(text[:start] + text[end:] if start >= 0 else text)
    for target, name, value in [(tasks, "ENVS_DIR", envs), (module, "ENVS_DIR", envs),
                                (data, "POLICIES_DIR", policies),
                                (module, "POLICIES_DIR", policies),
                                (checkpoints, "SHIPPED_DIR", shipped),
                                (module, "SHIPPED_DIR", shipped)]:
        monkeypatch.setattr(target, name, value)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    tasks.all_tasks.cache_clear(), tasks.default_tasks.cache_clear()
    yield module, tmp_path
    tasks.all_tasks.cache_clear(), tasks.default_tasks.cache_clear()


def fake_ppo_run(root, returns):
    run = root / "behavior" / "Walker2d-v5"
    rows = ["steps,mean_return,std_return,wall_seconds"]
    for i, ret in enumerate(returns):
        step = 50_000 * (i + 1)
        (run / f"step_{step}").mkdir(parents=True)
        tiny_policy(17, 6, seed=i).save(run / f"step_{step}" / "policy.npz")
        rows.append(f"{step},{ret},1.0,{10 * i}")
    (run / "progress.csv").write_text("\n".join(rows) + "\n")


def test_suite_in_miniature(suite):
    module, tmp = suite
    fake_ppo_run(tmp / "runs", [100.0, 400.0, 1000.0, 900.0])
    cfg = module.SuiteConfig(ppo_steps=200_000, reference_episodes=4, dataset_steps=1500,
                             dt_steps=6, result_episodes=2)
    module.stage_policies("walker2d", cfg, tmp / "runs" / "behavior")
    meta = {q: MLPPolicy.load(module.policy_path("walker2d", q)).meta
            for q in ("medium", "expert")}
    # Best 10-episode return (1000 at 150k) is the expert; medium sits at 1/3..1/2 of it.
    assert meta["expert"]["ppo_steps"] == 150_000 and meta["medium"]["ppo_steps"] == 100_000
    assert meta["expert"]["eval100_mean"] != meta["medium"]["eval100_mean"]

    module.stage_references("walker2d", cfg)
    spec = tomllib.loads((tmp / "envs" / "walker2d.toml").read_text())
    refs = spec["reference"]["dtmem"]
    assert refs["expert"] == pytest.approx(meta["expert"]["eval100_mean"], rel=1e-3)
    task = tasks.resolve_task(task="walker2d-medium")
    assert task.ref_source == "dtmem" and task.target_return == round(refs["expert"], -2)

    walker = [t for t in tasks.all_tasks().values() if t.env == "walker2d"]
    for t in walker:
        module.stage_datasets(t, cfg)
        assert data.find_dataset(t)[0].storage.metadata["ref_max_score"] == refs["expert"]
        module.stage_dts(t, cfg, tmp / "runs")
        shipped = read_checkpoint(tmp / "ckpt" / f"{t.name}.pt")
        assert shipped["steps"] == 6 and shipped["training_state"] is None
    readme = tmp / "README.md"
    readme.write_text("intro\n<!-- suite-table -->\nold\n<!-- /suite-table -->\nrest\n")
    module.stage_results(walker, cfg, tmp / "results" / "suite.json", readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- /suite-table -->\nrest\n")
    assert "old" not in text and text.count("| walker2d-") == 2
    results = json.loads((tmp / "results" / "suite.json").read_text())
    assert set(results["tasks"]) == {"walker2d-medium", "walker2d-expert"}
    for row in results["tasks"].values():
        assert set(row["policies"]) == {"recompute", "window", "full"}
        assert len(row["policies"]["full"]["episodes"]) == 2
    table = (tmp / "results" / "suite.md").read_text()
    assert table.count("| walker2d-") == 2 and "bootstrap" in table
    # Finished stages are skipped on a second run.
    before = (tmp / "ckpt" / "walker2d-medium.pt").stat().st_mtime_ns
    module.stage_dts(walker[0], cfg, tmp / "runs")
    assert (tmp / "ckpt" / "walker2d-medium.pt").stat().st_mtime_ns == before
