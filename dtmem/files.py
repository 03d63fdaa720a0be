"""Atomic file writes and the provenance every results file and checkpoint carries."""

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from dtmem.errors import UserError
from dtmem.tasks import ROOT


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one step,
    so readers never see a half-written file. An unwritable place is a UserError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; choose a writable path") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_writable(path):
    """Fail now, before any work, if `path` could not be written later."""
    with atomic_path(Path(path).with_name(Path(path).name + ".check")) as tmp:
        tmp.write_text("")
    os.unlink(Path(path).with_name(Path(path).name + ".check"))


def safe_load(path, what, remedy):
    """A torch file's contents, with weights_only=True: tensors and plain containers only,
    so no code from the file ever runs. `what` names the file, `remedy` the fix."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {remedy}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError,
            OSError, KeyError) as e:
        raise UserError(f"{what} {path} is corrupt or holds more than tensors "
                        f"({type(e).__name__}); nothing from it was run; {remedy}") from None


def sha256(path):
    """Hex digest of a file: results name the exact checkpoint and NAMM they came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def git_commit():
    """The commit of the code this process runs (+dirty for uncommitted changes to tracked
    files): read once, at import, so that a long run that outlives a commit, or a
    checkpoint saved after one, still names the code that made it."""
    return _COMMIT_AT_IMPORT


def _read_git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    return commit + ("+dirty" if dirty.strip() and commit != "unknown" else "")


def relative_to_root(path):
    """A path as results and metas record it: relative to the repository when inside it,
    so that nothing committed names a directory of the machine that made it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def command_line():
    """This process's command, with the repository's own paths made relative to it and an
    installed console script (e.g. .../bin/dtmem) named by its name."""
    program = Path(sys.argv[0])
    words = [program.name if program.is_absolute() and relative_to_root(program) == str(program)
             else relative_to_root(program)]
    return " ".join(words + [relative_to_root(a) if a.startswith("/") else a
                             for a in sys.argv[1:]])


def provenance(**extra):
    """Who made a result and how: command, commit, date, machine, plus `extra`."""
    import torch

    return {
        "command": command_line(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": str(torch.__version__)},
        **extra,
    }


_COMMIT_AT_IMPORT = _read_git_commit()
