"""One process per run folder: a lock file naming its holder (pid and host).

Two ``resume=`` of one folder at once would write the same checkpoints and event files; the
second one is refused with the holder's name. A lock whose process is gone (same host, pid
dead) is stale and taken over, so a killed run never blocks its own resume.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ae_lightning.errors import UserError

LOCK_NAME = "run.lock"


class RunFolderBusy(UserError):
    """Another live process holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def _holder(path: Path) -> dict:
    """The lock's content; a received folder's lock may be a link, a pipe or huge: read 4 kB."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
            holder = json.loads(f.read(4096)) if regular else {}
    except (OSError, ValueError, RecursionError):
        return {}  # being written right now, or garbage: treated as held (below) or stale
    return holder if isinstance(holder, dict) else {}


def acquire(run_dir: Path) -> Path:
    """Create ``run_dir/run.lock`` for this process, or raise ``RunFolderBusy``."""
    path = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            pid, host = holder.get("pid"), holder.get("host")
            stale = host == me["host"] and isinstance(pid, int) and not _alive(pid)
            if stale or pid == me["pid"]:
                path.unlink(missing_ok=True)
                continue
            raise RunFolderBusy(
                f"The run folder {run_dir} is in use by process {pid} on {host} (since "
                f"{holder.get('since', '?')}): wait for it to finish, or if that process is "
                f"gone, delete {path}."
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RunFolderBusy(f"The lock {path} keeps changing: delete it if no run uses {run_dir}.")


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration of the block."""
    path = acquire(run_dir)
    try:
        yield
    finally:
        if _holder(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
