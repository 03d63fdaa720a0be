"""`dtmem report` on real rollout cells, and its refusals."""

import json

import numpy as np
import pytest

from dtmem import checkpoints
from dtmem.cli import main


@pytest.fixture
def cells(tmp_path, checkpoint, monkeypatch, capsys):
    import shutil

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(checkpoint, shipped / "hopper-medium.pt")
    monkeypatch.setattr(checkpoints, "SHIPPED_DIR", shipped)
    folder = tmp_path / "cells"
    for policy, extra in (("recompute", []), ("full", []), ("streaming", ["--budget", "12"])):
        assert main(["rollout", "--task", "hopper-medium", "--policy", policy, "--episodes", "4",
                     "--json", str(folder / f"{policy}.json"), *extra]) == 0
    capsys.readouterr()
    return folder


def test_report_tables_gains_with_paired_cis(cells, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", "--results", str(cells), "--out", str(out), "--episodes", "4"]) == 0
    rows = {r["cell"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert set(rows) == {"recompute", "full", "streaming@12"}
    assert rows["recompute"]["gain"] == 0 and rows["recompute"]["gain_ci95"] == [0, 0]
    assert rows["full"]["tokens_vs_full"] == 1.0
    assert rows["streaming@12"]["max_tokens"] <= 15
    assert "| hopper-medium | streaming@12 |" in (out / "report.md").read_text()
    assert (out / "report.csv").read_text().startswith("task,cell,block,episodes")
    # With no confirmation block every cell is development only, and none is clear.
    assert all(r["block"] == "development" and not r["clear"] for r in rows.values())
    assert "| streaming@12 | development |" in (out / "report.md").read_text()


def test_report_refuses_short_or_foreign_cells(cells, tmp_path, capsys):
    code = main(["report", "--results", str(cells), "--out", str(tmp_path / "o"),
                 "--episodes", "5"])
    assert code == 2 and "fewer than the 5 asked" in capsys.readouterr().err
    cell = json.loads((cells / "full.json").read_text())
    cell["checkpoint_sha256"] = "0" * 64
    (cells / "full.json").write_text(json.dumps(cell))
    code = main(["report", "--results", str(cells), "--out", str(tmp_path / "o"),
                 "--episodes", "4"])
    assert code == 2 and "not made with the shipped checkpoint" in capsys.readouterr().err
    cell["episodes"] = cell["episodes"][1:] + cell["episodes"][:1]
    cell["checkpoint_sha256"] = None
    (cells / "full.json").write_text(json.dumps(cell))
    code = main(["report", "--results", str(cells), "--out", str(tmp_path / "o"),
                 "--episodes", "4", "--any-checkpoint"])
    assert code == 2 and "seeds" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_holm_steps_down_and_bootstrap_p_matches_the_interval():
    from dtmem.stats import bootstrap_ci, bootstrap_p, holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    assert holm([0.04, 0.2]) == [False, False]  # 0.04 > 0.05 / 2
    rng = np.random.default_rng(0)
    for shift in (0.0, 0.3, 1.0):
        values = rng.normal(shift, 1.0, 50)
        lo, hi = bootstrap_ci(values)
        assert (bootstrap_p(values) < 0.05) == (lo > 0 or hi < 0)


def test_confirmation_cells_replace_development_ones_and_namms_meet_matched_heuristics(
        cells, tmp_path, capsys, checkpoint):
    import torch

    from dtmem.memory.namm.io import save_namm

    namm = tmp_path / "namm.pt"
    params = 0.1 * torch.randn(4172, generator=torch.Generator().manual_seed(0))
    save_namm(namm, "bam", params, (torch.zeros(17), torch.ones(17), 1), 48, {})
    assert main(["rollout", "--task", "hopper-medium", "--policy", "namm", "--namm", str(namm),
                 "--episodes", "4", "--json", str(cells / "namm.json")]) == 0
    budget = max(3, round(json.loads((cells / "namm.json").read_text())["summary"]["mean_tokens"]))
    confirm = tmp_path / "confirm"
    for policy, extra in (("recompute", []), ("full", []), ("namm", ["--namm", str(namm)]),
                          ("streaming", ["--budget", str(budget)])):
        name = policy if policy != "streaming" else f"streaming@{budget}"
        assert main(["rollout", "--task", "hopper-medium", "--policy", policy, "--episodes", "4",
                     "--seed", "100000", "--json", str(confirm / f"{name}.json"), *extra]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["report", "--results", str(cells), "--out", str(out), "--episodes", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["cell"]: r for r in report["rows"]}
    assert rows["recompute"]["block"] == rows["namm"]["block"] == "confirmation"
    assert rows["recompute"]["seed"] == 100000
    assert rows["streaming@12"]["block"] == "development" and not rows["streaming@12"]["clear"]
    assert [(c["namm"], c["heuristic"]) for c in report["namm_vs_heuristics"]] == [
        ("namm", f"streaming@{budget}")]
    assert "Is it the policy or the cache?" in (out / "report.md").read_text()


def shifted_copy(cells, folder, full_minus_base):
    """A copy of the cells whose `full` scores are recompute's plus a constant, so that
    its gain and CI are exactly that constant."""
    import shutil

    shutil.copytree(cells, folder)
    base = json.loads((folder / "recompute.json").read_text())
    full = json.loads((folder / "full.json").read_text())
    for mine, theirs in zip(full["episodes"], base["episodes"]):
        mine["score"] = theirs["score"] + full_minus_base
    (folder / "full.json").write_text(json.dumps(full))
    return folder


def test_seed_spread_says_which_claims_hold_across_runs(cells, tmp_path, capsys):
    from scripts.seed_spread import main as spread

    up = shifted_copy(cells, tmp_path / "up", 1.0)
    up_again = shifted_copy(cells, tmp_path / "up-again", 2.0)
    down = shifted_copy(cells, tmp_path / "down", -1.0)
    for folder, lengths in ((up, [5, 6, 1000, 999]), (up_again, [1000, 1000, 1000, 7])):
        base = json.loads((folder / "recompute.json").read_text())
        for episode, length in zip(base["episodes"], lengths):
            episode["length"] = length  # hopper's time limit is 1000 steps
        (folder / "recompute.json").write_text(json.dumps(base))
    out = tmp_path / "spread.md"
    assert spread([f"a={up}", f"b={up_again}", "--episodes", "4", "--out", str(out)]) == 0
    base_row = next(line for line in out.read_text().splitlines() if "| recompute |" in line)
    assert ", 3 ended early | " in base_row and base_row.endswith(", 1 ended early |")
    assert "| hopper-medium | full | +1.0 [+1.0, +1.0] | +2.0 [+2.0, +2.0] | yes, a gain |" \
        in out.read_text()
    assert spread([f"a={up}", f"b={down}", "--episodes", "4"]) == 0
    assert "| +1.0 [+1.0, +1.0] | -1.0 [-1.0, -1.0] | no |" in capsys.readouterr().out
    for path in down.glob("*.json"):  # the same cells, one env seed later: another block
        later = json.loads(path.read_text())
        later["seed"] += 1
        for episode in later["episodes"]:
            episode["seed"] += 1
        path.write_text(json.dumps(later))
    code = spread([f"a={up}", f"b={down}", "--episodes", "4"])
    assert code == 2 and "compare one block" in capsys.readouterr().err
    code = spread([f"a={up}", f"a={down}", "--episodes", "4"])
    assert code == 2 and "distinct names" in capsys.readouterr().err
