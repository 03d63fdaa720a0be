"""`dtmem report` on real rollout cells, and its refusals."""

import json

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
    assert (out / "report.csv").read_text().startswith("task,cell,episodes")


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
