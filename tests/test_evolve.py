"""CMA-ES evolution of NAMMs, for real but tiny: resume equals an uninterrupted run."""

import json
import shutil

import numpy as np
import pytest
import torch

from dtmem import evolve
from dtmem.backend import LocalBackend
from dtmem.cli import main
from dtmem.errors import UserError


def tiny(**overrides):
    return evolve.EvolveConfig(**{"stages": [["hopper-medium"]], "generations": 3,
                                  "population": 4, "episodes": 1, "n_up": 16,
                                  "eval_mean_every": 2, "mean_episodes": 1, **overrides})


def test_interrupted_and_resumed_equals_uninterrupted(shipped, tmp_path, monkeypatch):
    straight = evolve.Evolution(tiny(), tmp_path / "a")
    straight.run(progress=False)
    monkeypatch.setattr(evolve, "git_commit", lambda: "before")
    first = evolve.Evolution(tiny(), tmp_path / "b")
    first.run(progress=False, stop_after=2)
    with pytest.raises(UserError, match="has run 2 of 3 generations"):
        evolve.ship(tmp_path / "b", "x", tmp_path / "namm")
    monkeypatch.setattr(evolve, "git_commit", lambda: "after")  # resumed on newer code
    resumed = evolve.Evolution.resume(tmp_path / "b")
    assert len(resumed.history) == 2
    resumed.run(progress=False)
    assert np.array_equal(straight.es.mean, resumed.es.mean)
    assert [h["fitness"] for h in straight.history] == [h["fitness"] for h in resumed.history]
    log = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert log[0].startswith("generation,stage,best,mean,mean_eval") and len(log) == 4
    assert [line.split(",")[-1] for line in log] == ["commit", "before", "before", "after"]
    meta = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["meta"]
    assert meta["commits"] == ["before", "after"]
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["history"][1]["mean_eval"] is not None  # every 2 generations
    assert (tmp_path / "b" / "best.pt").exists() and (tmp_path / "b" / "latest.pt").exists()


def test_members_share_env_seeds_and_generations_differ(shipped, tmp_path):
    run = evolve.Evolution(tiny(), tmp_path / "c")
    assert run.generation_seed(0) != run.generation_seed(1)
    zero = np.zeros((3, run.n_params))
    run.collect_stats()
    scores, _, _ = run.evaluate(zero, ["hopper-medium"], 2, seed=5)
    # Same params, same seeds: the same score, up to float rounding (a shrinking batch
    # puts a slot's rows at other positions of the matrix products, which round them
    # differently). Other seeds would move the score by whole points.
    assert scores[1] == pytest.approx(scores[0], rel=1e-6)
    assert scores[2] == pytest.approx(scores[0], rel=1e-6)


def test_incremental_stages_and_cli(shipped, tmp_path, capsys):
    out = tmp_path / "d"
    code = main(["evolve", "--tasks", "hopper-medium", "--then", "hopper-medium,hopper-expert",
                 "--generations", "1", "--population", "4", "--episodes", "1", "--n-up", "16",
                 "--mean-episodes", "1", "--out", str(out)])
    assert code == 2 and "no shipped DT for hopper-expert" in capsys.readouterr().err
    shutil.copy(shipped / "hopper-medium.pt", shipped / "hopper-expert.pt")
    code = main(["evolve", "--tasks", "hopper-medium", "--then", "hopper-medium,hopper-expert",
                 "--generations", "1", "--population", "4", "--episodes", "1", "--n-up", "16",
                 "--mean-episodes", "1", "--out", str(out)])
    assert code == 0
    history = json.loads((out / "state.json").read_text())["history"]
    assert [h["stage"] for h in history] == [0, 1]
    # Each stage's last generation is validated; the last stage's best is the run's best.
    assert all(h["mean_eval"] is not None for h in history)
    assert "stage 1" in torch.load(out / "best.pt", weights_only=True)["meta"]["choice"]
    shipped_namms = tmp_path / "namm"
    paths = evolve.ship(out, "default", shipped_namms)
    assert [p.name for p in paths] == ["default.pt", "default-final.pt", "default-log.csv"]
    assert (shipped_namms / "default.pt").read_bytes() == (out / "best.pt").read_bytes()
    code = main(["evolve", "--tasks", "hopper-medium", "--out", str(out)])
    assert code == 2 and "already holds a run" in capsys.readouterr().err


def test_parallel_workers_give_the_same_fitness(shipped, tmp_path):
    shutil.copy(shipped / "hopper-medium.pt", shipped / "hopper-expert.pt")
    cfg = tiny(stages=[["hopper-medium", "hopper-expert"]])
    members = np.random.default_rng(0).normal(0, 0.065, size=(3, 4172))
    serial = evolve.Evolution(cfg, tmp_path / "e")
    with LocalBackend(2) as backend:
        parallel = evolve.Evolution(cfg, tmp_path / "f", backend=backend)
        for run in (serial, parallel):
            run.collect_stats()
        assert all(torch.equal(a, b) for a, b in zip(serial.stats[:2], parallel.stats[:2]))
        a = serial.evaluate(members, cfg.stages[0], 1, seed=3)[0]
        b = parallel.evaluate(members, cfg.stages[0], 1, seed=3)[0]
    assert np.array_equal(a, b)


def test_one_shard_is_one_rollout_per_task_and_old_state_files_resume(shipped, tmp_path):
    # shards=1, the default and what a state.json from before shards means, scores
    # exactly as one batched rollout of the whole population per task did.
    run = evolve.Evolution(tiny(generations=1), tmp_path / "h")
    run.run(progress=False)
    candidates = np.array(evolve.Evolution(tiny(), None).es.ask())
    scores, _, _ = evolve._evaluate_task(*run.models["hopper-medium"], run.policy_name, 16,
                                         run.stats, candidates, 1, run.generation_seed(0))
    assert run.history[0]["fitness"] == np.mean([scores.mean(1)], axis=0).tolist()
    path = tmp_path / "h" / "state.json"
    state = json.loads(path.read_text())
    del state["config"]["shards"]
    path.write_text(json.dumps(state))
    resumed = evolve.Evolution.resume(tmp_path / "h")
    assert resumed.cfg.shards == 1 and np.array_equal(resumed.es.mean, run.es.mean)
    with pytest.raises(UserError, match="--shards must be an integer from 1 to the population"):
        evolve.Evolution(tiny(shards=5), None)


def test_step_size_is_adapted_by_csa_as_published(shipped, tmp_path):
    run = evolve.Evolution(tiny(population=32), tmp_path / "g")
    assert run.recipe["step_size_rule"] == "CSA" and not run.recipe["mean_shift_samples"]
    assert run.recipe["cs"] == pytest.approx(0.00267, abs=1e-5)  # the original's value
    assert run.recipe["damps"] == pytest.approx(1.00267, abs=1e-5)
    assert run.recipe["mu"] == 16 and run.recipe["negative_weights"] == 16
    # Each generation moves sigma by the CSA rule, exp(cs / damps * (|p_sigma| / chi_n - 1)),
    # from the evolution path it keeps (TPA, pycma's own choice at this size, would not).
    for _ in range(3):
        sigma = run.es.sigma
        candidates = run.es.ask()
        run.es.tell(candidates, [float(np.sum(np.square(c))) for c in candidates])
        path = np.linalg.norm(run.es.adapt_sigma.ps)
        expected = sigma * np.exp(run.recipe["cs"] / run.recipe["damps"]
                                  * (path / run.es.const.chiN - 1))
        assert run.es.sigma == pytest.approx(expected, rel=1e-9)


def test_fitness_noise_study_draws_one_generation_on_two_seed_draws(shipped, tmp_path):
    from dtmem import fitness_noise

    cfg = fitness_noise.NoiseConfig(task="hopper-medium", members=4, episodes=2, n_up=16)
    path, rows = fitness_noise.run(cfg, tmp_path)
    result = json.loads(path.read_text())
    assert np.array(result["scores"]).shape == (2, 4, 2)
    first = result["provenance"]["first_seeds"]
    assert first[0] != first[1] and all(s >= evolve.TRAINING_SEED for s in first)
    assert [r["episodes"] for r in rows] == [1, 2]
    assert all(0 <= r["elite_overlap"] <= 1 and -1 <= r["rank_agreement"] <= 1 for r in rows)
    assert "| hopper-medium-start | 2 |" in fitness_noise.markdown(tmp_path)
