"""The course lab's runner. The handout (docs/lab/README.md) is the one place the lab's
commands live: this reads them from its ```bash blocks and runs them part by part, each
in a fresh process as a student would type it, with `--preset lab` swapped for another
preset (`tiny` in the test, so the handout cannot silently break)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dtmem.errors import UserError
from dtmem.tasks import ROOT

LAB_DIR = ROOT / "docs" / "lab"
HANDOUT = LAB_DIR / "README.md"


def handout_commands(path=HANDOUT):
    """{part number: [command line, ...]} from the ```bash blocks under '## Part N'."""
    parts, part, in_block = {}, None, False
    for line in Path(path).read_text().splitlines():
        heading = re.match(r"## Part (\d+)", line)
        if heading:
            part = int(heading.group(1))
        elif line.strip() == "```bash":
            in_block = True
        elif line.strip() == "```":
            in_block = False
        elif in_block and part is not None and line.strip() and not line.startswith("#"):
            parts.setdefault(part, []).append(line.split("  #")[0].strip())
    return parts


def argv_of(line, preset):
    """The command as this interpreter runs it, with the lab preset swapped."""
    argv = shlex.split(line.replace("--preset lab", f"--preset {preset}"))
    if argv[0] == "dtmem":
        return [sys.executable, "-m", "dtmem.cli", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    raise UserError(f"handout command {line!r} starts with neither dtmem nor python")


def as_on_screen(output):
    """What a terminal shows of the output: a progress bar's last state, not every redraw."""
    return "".join(line.rsplit("\r", 1)[-1] + "\n" for line in output.rstrip("\n").split("\n"))


def run_lab(work, preset="lab", parts=None, handout=HANDOUT, log=None):
    """Run the handout's parts in folder `work` (datasets in work/minari, as on a new
    laptop); returns {part: wall seconds}. Each command's output is appended to `log`.
    The chosen parts start afresh, as a student's first run does: every part clears
    work/lab/ and the log; some parts clear only their own work/lab/partN/ (later parts
    still need Part 1's DT)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    chosen = {part: commands for part, commands in sorted(handout_commands(handout).items())
              if not parts or part in parts}
    log = Path(log or work / "lab-log.txt")
    for old in ([work / "lab", log] if not parts else
                [work / "lab" / f"part{part}" for part in chosen]):
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    env = {**os.environ, "MINARI_DATASETS_PATH": str(work / "minari")}
    seconds = {}
    links = [work / name for name in ("docs", "scripts")]
    for link in links:  # the handout's paths are relative to the repository
        if not link.exists():
            link.symlink_to(ROOT / link.name)
    try:
        for part, commands in chosen.items():
            begin = time.perf_counter()
            for line in commands:
                done = subprocess.run(argv_of(line, preset), cwd=work, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      check=False)
                with log.open("a") as out:
                    out.write(f"\n$ {line}\n{as_on_screen(done.stdout)}")
                if done.returncode != 0:
                    raise UserError(f"lab part {part}: `{line}` failed (exit "
                                    f"{done.returncode}); see {log}")
            seconds[part] = time.perf_counter() - begin
    finally:
        for link in links:
            link.unlink(missing_ok=True)
    return seconds


def record_times(out, seconds):
    """Write the lab's times (minutes per part, with provenance) to <out>/times.json and
    into the handout and the instructor notes; returns the table."""
    from dtmem.files import provenance, write_json
    from dtmem.report import embed_in_readme

    info = provenance(preset="lab")
    write_json(f"{out}/times.json", {"seconds": seconds, "provenance": info})
    machine = info["machine"]
    table = "| part | minutes |\n|---|---|\n" + "".join(
        f"| {part} | {s / 60:.1f} |\n" for part, s in sorted(seconds.items()))
    table += (f"\nOn {len(os.sched_getaffinity(0))} of the {machine['cores']} CPU cores of "
              f"{machine['platform']}, torch {machine['torch']}, commit {info['commit']}.\n")
    for doc in (HANDOUT, LAB_DIR / "instructor.md"):
        embed_in_readme(doc, "lab-times", table, "python scripts/run_lab.py",
                        "docs/lab/expected/times.json")
    return table
