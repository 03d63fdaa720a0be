"""The backends on a real local Ray of 2 CPUs: evolution's fitness and the experiment's
cells are the same whichever backend runs the jobs, on however many workers, and when a
Ray worker dies mid-generation."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ray")

from dtmem import evolve, experiment
from dtmem.backend import LocalBackend, RayBackend
from dtmem.errors import UserError
from dtmem.memory.namm.io import save_namm
from dtmem.memory.namm.scorers import SCORERS

evaluate_task = evolve._evaluate_task  # the real job, kept before a test replaces it


@pytest.fixture(scope="module")
def ray_backend():
    with RayBackend(workers=2) as backend:  # one Ray for the module: it takes seconds to start
        yield backend


def evolved(backend, out):
    """A tiny run: 2 generations of 4 members in 2 shards, so 2 jobs per generation."""
    cfg = evolve.EvolveConfig(stages=[["hopper-medium"]], generations=2, population=4,
                              episodes=1, n_up=16, eval_mean_every=2, mean_episodes=1,
                              shards=2)
    run = evolve.Evolution(cfg, out, backend=backend)
    run.run(progress=False)
    return run


def assert_same_run(a, b):
    assert [h["fitness"] for h in a.history] == [h["fitness"] for h in b.history]
    assert [h["mean_eval"] for h in a.history] == [h["mean_eval"] for h in b.history]
    assert all(torch.equal(x, y) for x, y in zip(a.stats[:2], b.stats[:2]))
    assert np.array_equal(a.es.mean, b.es.mean)


def test_fitness_is_the_same_on_every_backend_and_worker_count(shipped, tmp_path, ray_backend):
    one = evolved(LocalBackend(1), tmp_path / "one")
    with LocalBackend(2) as two_workers:
        two = evolved(two_workers, tmp_path / "two")
    on_ray = evolved(ray_backend, tmp_path / "ray")
    assert_same_run(one, two)
    assert_same_run(one, on_ray)


def dies_once(task, checkpoint, policy_name, n_up, stats, *rest):
    """The evaluation job, except that the first generation job kills its own worker
    process, as the kernel's OOM killer or a lost node would."""
    marker = Path(checkpoint.path).parent / "a-worker-died"
    if stats is not None and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return evaluate_task(task, checkpoint, policy_name, n_up, stats, *rest)


def test_a_killed_ray_worker_is_retried_and_changes_nothing(shipped, tmp_path, ray_backend,
                                                            monkeypatch):
    reference = evolved(LocalBackend(1), tmp_path / "local")
    monkeypatch.setattr(evolve, "_evaluate_task", dies_once)
    retried = evolved(ray_backend, tmp_path / "ray")
    assert (shipped / "a-worker-died").exists()
    assert_same_run(reference, retried)


def always_dies(_):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_job_whose_worker_always_dies_ends_in_a_user_error(ray_backend, monkeypatch):
    monkeypatch.setattr(ray_backend, "RETRIES", 0)  # Ray waits between retries: seconds each
    with pytest.raises(UserError, match="WorkerCrashedError: a job's worker died in each of its 1 runs"):
        ray_backend.map(always_dies, [(0,)])


def test_an_address_that_is_no_ray_cluster_is_one_line(tmp_path):
    """In a process of its own: this one has joined the module's Ray already. (An address
    where nothing answers fails the same way, after Ray's minutes of retrying.)"""
    import subprocess
    import sys

    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "dtmem", "rollout", "--env", "hopper",
                           "--episodes", "2", "--shards", "2", "--backend", "ray",
                           "--address", "nonsense", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "cannot join Ray at nonsense" in proc.stderr and not out.exists()


def test_experiment_cells_are_the_same_on_ray(shipped, tmp_path, ray_backend):
    params = 0.1 * torch.randn(SCORERS["bam"][1], generator=torch.Generator().manual_seed(0))
    save_namm(tmp_path / "namm" / "default.pt", "bam", params,
              (torch.zeros(17), torch.ones(17), 1), 16, {"stages": [["hopper-medium"]]})
    cells = {}
    for name, backend in (("local", LocalBackend()), ("ray", ray_backend)):
        cfg = experiment.ExperimentConfig(tasks="hopper-medium", episodes=2, budgets="matched",
                                          heuristics="h2o", slots=2, out=str(tmp_path / name),
                                          namm_dir=str(tmp_path / "namm"))
        experiment.run(cfg, backend)
        folder = tmp_path / name / "cells" / "hopper-medium"
        cells[name] = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
        for cell in cells[name].values():
            del cell["provenance"]  # when and how long it ran
    matched = round(cells["ray"]["namm"]["summary"]["mean_tokens"])
    assert set(cells["ray"]) == {"recompute", "window", "full", "namm", f"h2o@{matched}"}
    assert cells["ray"] == cells["local"]

