"""The experiment runner in miniature: every cell of a task, resume, report, plots."""

import json
import shutil

import pytest
import torch

from dtmem import checkpoints, experiment
from dtmem.cli import main
from dtmem.errors import UserError
from dtmem.experiment import ExperimentConfig
from dtmem.memory.namm.io import save_namm
from dtmem.memory.namm.scorers import SCORERS
from dtmem.results import matched_budget


@pytest.fixture
def setup(tmp_path, monkeypatch, checkpoint):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(checkpoint, shipped / "hopper-medium.pt")
    monkeypatch.setattr(checkpoints, "SHIPPED_DIR", shipped)
    namms = tmp_path / "namm"
    generator = torch.Generator().manual_seed(0)
    stats = (torch.zeros(17), torch.ones(17), 1)
    for name, scorer, source in (("default", "bam", "hopper-medium"),
                                 ("default-mlp", "mlp", "walker2d-medium")):
        params = 0.1 * torch.randn(SCORERS[scorer][1], generator=generator)
        save_namm(namms / f"{name}.pt", scorer, params, stats, 16, {"stages": [[source]]})
    return ExperimentConfig(tasks="hopper-medium", episodes=3, budgets="matched,30",
                            heuristics="h2o,random", slots=3, out=str(tmp_path / "results"),
                            namm_dir=str(namms))


def test_experiment_runs_every_cell_resumes_and_reports(setup, tmp_path, capsys):
    cfg = setup
    experiment.run(cfg)
    folder = tmp_path / "results" / "cells" / "hopper-medium"
    cells = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    matched = round(cells["namm"]["summary"]["mean_tokens"])
    assert set(cells) == {"recompute", "window", "full", "namm", "namm-mlp", f"h2o@{matched}",
                          "h2o@30", f"random@{matched}", "random@30"}
    assert all(c["seed"] == 0 and len(c["episodes"]) == 3 for c in cells.values())
    assert cells[f"h2o@{matched}"]["summary"]["max_tokens"] <= matched + 3

    before = {p: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    (folder / "h2o@30.json").unlink()
    experiment.run(cfg)  # resumes: only the missing cell runs again
    after = {p: p.stat().st_mtime_ns for p in folder.glob("*.json")}
    assert {p for p in after if after[p] != before.get(p)} == {folder / "h2o@30.json"}

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- gains-table -->\nold\n<!-- /gains-table -->\nend\n")
    evolve_log = tmp_path / "evolved"
    assert main(["evolve", "--tasks", "hopper-medium", "--generations", "2", "--population",
                 "4", "--episodes", "1", "--n-up", "16", "--eval-mean-every", "1",
                 "--mean-episodes", "1", "--out", str(evolve_log)]) == 0
    shutil.copy(evolve_log / "log.csv", tmp_path / "namm" / "hopper-medium-log.csv")
    experiment.report(cfg, readme)
    out = tmp_path / "results"
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert {r["cell"] for r in rows} == set(cells)
    text = readme.read_text()
    assert "| hopper-medium | namm-mlp |" in text and "\nold\n" not in text
    assert text.endswith("end\n")
    assert "DT of" in text and "references" in text
    assert "namm: evolved on hopper-medium." in text
    assert "namm-mlp: zero-shot (evolved on walker2d-medium)." in text
    for png in ("pareto.png", "namm-kept-hopper-medium.png", "evolution.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_experiment_refuses_bad_config(setup):
    for bad in ({"heuristics": "namm"}, {"heuristics": "window"}, {"tasks": "hopper-expert"},
                {"namm_dir": "/nonexistent"}, {"budgets": "matched,2"}, {"budgets": "x"},
                {"cells": "recompte"}, {"cells": "window,tova@60"}):
        with pytest.raises(UserError):
            experiment.experiment_tasks(ExperimentConfig(**{**setup.__dict__, **bad}))


def test_another_dt_folder_runs_its_own_dts(setup, tmp_path, hopper_dataset):
    """--dt-dir: the same cells on other DTs (e.g. other training seeds), naming them."""
    seed_one = tmp_path / "dt-seed-1"
    assert main(["train", "--task", "hopper-medium", "--steps", "2", "--eval-every", "0",
                 "--eval-episodes", "1", "--seed", "1", "--n-embd", "16", "--n-layer", "1",
                 "--out", str(seed_one / "hopper-medium.pt")]) == 0
    cfg = ExperimentConfig(**{**setup.__dict__, "dt_dir": str(seed_one), "cells": "recompute",
                              "out": str(tmp_path / "seed-1")})
    experiment.run(cfg)
    cell = json.loads((tmp_path / "seed-1" / "cells" / "hopper-medium" / "recompute.json")
                      .read_text())
    assert cell["checkpoint_sha256"] == checkpoints.sha256(seed_one / "hopper-medium.pt")
    with pytest.raises(UserError, match="--dt-dir"):
        experiment.experiment_tasks(ExperimentConfig(**{**cfg.__dict__, "tasks": "hopper-expert"}))
    empty = {"tasks": "", "dt_dir": str(tmp_path / "none")}  # and no --tasks: no DT at all
    with pytest.raises(UserError, match="no DT of any task .* in .*none; give the folder"):
        experiment.experiment_tasks(ExperimentConfig(**{**cfg.__dict__, **empty}))


def test_a_folder_of_local_namms_only_runs_them(setup, tmp_path):
    """--namm-dir with only <task>.pt (another evolution seed's local NAMMs): no namm cell,
    the heuristics matched to namm-local; a folder with no NAMM for the tasks is refused."""
    seed_one = tmp_path / "namm-seed-1"
    seed_one.mkdir()
    shutil.copy(tmp_path / "namm" / "default.pt", seed_one / "hopper-medium.pt")
    cfg = ExperimentConfig(**{**setup.__dict__, "namm_dir": str(seed_one), "budgets": "matched",
                              "heuristics": "h2o", "out": str(tmp_path / "seed-1")})
    experiment.run(cfg)
    folder = tmp_path / "seed-1" / "cells" / "hopper-medium"
    local = json.loads((folder / "namm-local.json").read_text())
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(
        ["recompute", "window", "full", "namm-local",
         f"h2o@{matched_budget(local)}"])
    (seed_one / "hopper-medium.pt").rename(seed_one / "walker2d-medium.pt")
    with pytest.raises(UserError, match="no NAMM for these tasks"):
        experiment.experiment_tasks(cfg)
