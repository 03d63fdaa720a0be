"""Atomic file writes and the provenance every results file and checkpoint carries."""

import datetime
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from dtmem.errors import UserError
from dtmem.tasks import ROOT

TMP_PREFIX = ".dtmem-"  # .dtmem-<pid>-<random>.tmp: short whatever the target's name
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_stale_temporaries(folder):
    """Remove temporary files (and staging folders) of dtmem processes that died before
    finishing (SIGKILL, power loss); those of live processes are theirs."""
    for tmp in Path(folder).glob(f"{TMP_PREFIX}*"):
        pid = tmp.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(True)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one step,
    so readers never see a half-written file. An unwritable place or a full disk is a
    UserError, and leaves nothing behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{os.getpid()}-",
                                   suffix=".tmp")
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}; choose a writable path") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        full = (isinstance(e, OSError) and e.errno in DISK_FULL
                or shutil.disk_usage(path.parent).free < 2**20)
        if not full:
            raise
        raise UserError(f"no space left on the disk writing {path}; nothing was written, "
                        "free some space and run again") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_new_output(path, replace, other=""):
    """ensure_writable, and an existing file at `path` is replaced only when asked
    (`replace`, e.g. --overwrite; `other` names another way out, e.g. "--resume to ...")."""
    ensure_writable(path)
    if Path(path).exists() and not replace:
        raise UserError(f"{path} already exists; pass {other}--overwrite to replace it")


def ensure_writable(path, size=0):
    """Fail now, before any work, if `path` could not be written later: a directory in
    its place, a file where a folder should be, no permission, or less free space than
    `size` bytes (plus a margin)."""
    path = Path(path)
    long = next((part for part in path.parts if len(part.encode()) > 255), None)
    if long:
        raise UserError(f"{long[:40]}... is too long a file name (255 bytes at most)")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name")
    folder = path.parent
    while not folder.exists():  # the folders atomic_path would create
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {folder} is not writable; choose another path")
    free, needed = shutil.disk_usage(folder).free, size + 2**20
    if free < needed:
        raise UserError(f"not enough space for {path}: {free / 2**20:.0f} MiB free, about "
                        f"{needed / 2**20:.0f} MiB needed; free some space")


@contextmanager
def lock(path):
    """Hold `path` (a run directory or an output file) for this process: the lock file
    <path>.lock holds the owner's pid. A second dtmem process on the same path is refused;
    a lock whose process is gone (killed) is stale and taken over."""
    lock_file = Path(f"{path}.lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = lock_file.read_text().strip()
            if owner.isdigit() and process_alive(int(owner)) and int(owner) != os.getpid():
                raise UserError(f"{path} is in use by dtmem process {owner}; wait for it to "
                                "finish or choose another path") from None
            lock_file.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise UserError(f"cannot lock {path}; remove {lock_file} if no dtmem process runs")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)


def safe_load(path, what, remedy):
    """A torch file's contents, with weights_only=True: tensors and plain containers only,
    so no code from the file ever runs. `what` names the file, `remedy` the fix."""
    import warnings

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {remedy}")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 116": noise before our line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    # The weights-only unpickler runs no code, so whatever it raises on bytes that are not
    # a torch file (IndexError, UnicodeDecodeError, struct.error, ...) says just that.
    except Exception as e:
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
    """A path as results and metas record it: relative to the repository when inside it or
    beside it (the workspace's ../runs, ../shared), so that nothing committed names a
    directory of the machine that made it. Paths elsewhere are kept as given."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(ROOT.parent):
        return os.path.relpath(resolved, ROOT)
    return str(path)


ENTRY_POINTS = {Path(__file__).with_name(name) for name in ("cli.py", "__main__.py")}
"""what sys.argv[0] is under `python -m dtmem` or `python -m dtmem.cli`: the dtmem command"""


def command_line():
    """This process's command, with the repository's own paths made relative to it and an
    installed console script (e.g. .../bin/dtmem) or `python -m dtmem` named dtmem."""
    program = Path(sys.argv[0])
    if program.resolve() in ENTRY_POINTS:
        words = ["dtmem"]
    elif program.resolve().is_relative_to(ROOT):  # one of the repository's scripts
        words = [relative_to_root(program)]
    else:  # an installed console script, wherever its environment lives
        words = [program.name]
    return " ".join(words + [relative_to_root(a) if a.startswith("/") else a
                             for a in sys.argv[1:]])


def cpu_model():
    """The CPU's model name, as Linux reports it (else what platform knows, maybe "")."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def provenance(**extra):
    """Who made a result and how: command, commit, date, machine, plus `extra`."""
    import torch

    return {
        "command": command_line(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Float results depend on torch's thread count (reduction order) and on the CPU
        # (torch and MKL pick their kernels by it): both are recorded.
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cpu": cpu_model(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "platform": platform.platform(),
                    "python": platform.python_version(), "torch": str(torch.__version__)},
        **extra,
    }


_COMMIT_AT_IMPORT = _read_git_commit()
