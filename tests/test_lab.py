"""The course lab: every command of the handout runs, in miniature (`--preset tiny`)."""

import pytest

from dtmem.errors import UserError
from dtmem.lab import argv_of, handout_commands, run_lab


def test_handout_has_four_parts_of_runnable_commands():
    parts = handout_commands()
    assert sorted(parts) == [1, 2, 3, 4]
    for commands in parts.values():
        for line in commands:
            argv_of(line, "tiny")  # dtmem or python, nothing else
    with pytest.raises(UserError):
        argv_of("rm -rf lab", "tiny")


def test_every_handout_command_runs_in_miniature(tmp_path):
    seconds = run_lab(tmp_path, preset="tiny")
    assert sorted(seconds) == [1, 2, 3, 4]
    lab = tmp_path / "lab"
    assert "| hopper-medium | full |" in (lab / "part1" / "report.md").read_text()
    assert (lab / "part2" / "pareto.png").exists()
    part3 = (lab / "part3" / "report.md").read_text()
    assert "recent-states@30" in part3 and "state-attention@30" in part3
    assert (lab / "part4" / "namm-kept-hopper-medium.png").exists()
    assert (lab / "part4" / "shipped" / "namm-kept-hopper-medium.png").exists()
    assert not (tmp_path / "docs").exists()  # the runner's links are gone
