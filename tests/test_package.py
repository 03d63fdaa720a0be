"""dtmem as an installed package: the wheel carries the task specs and the shipped DTs and
NAMMs, and runs from any directory; `python -m dtmem` and `dtmem --version` work."""

import subprocess
import sys
import tomllib
import zipfile

from setuptools import find_packages

from dtmem.tasks import ROOT


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    assert set(find_packages(str(ROOT), include=["dtmem*"])) <= listed


# Runs the unpacked wheel, not the repository: the editable install's finder is removed.
FROM_WHEEL = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, sys.argv.pop(1))
import dtmem.cli
assert "site" in dtmem.cli.__file__, dtmem.cli.__file__
sys.exit(dtmem.cli.main(sys.argv[1:]))
"""


def test_the_wheel_runs_the_shipped_namm_from_an_empty_directory(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(ROOT)], check=True,
                   capture_output=True)
    wheel = next((tmp_path / "dist").glob("dtmem-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "dtmem" / "_shipped" / "envs" / "hopper.toml").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    run = subprocess.run([sys.executable, "-c", FROM_WHEEL, str(site), "rollout", "--env",
                          "hopper", "--policy", "namm", "--episodes", "1"],
                         cwd=empty, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "hopper-medium namm: 1 episodes" in run.stdout and "normalised score" in run.stdout
    assert not list(empty.iterdir())


def test_python_m_dtmem_and_version():
    from dtmem import __version__

    run = subprocess.run([sys.executable, "-m", "dtmem", "--version"], capture_output=True,
                         text=True)
    assert run.returncode == 0 and run.stdout.strip() == f"dtmem {__version__}"
    run = subprocess.run([sys.executable, "-m", "dtmem", "rollout", "--policy", "nope"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "unknown policy" in run.stderr
