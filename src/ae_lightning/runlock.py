"""One process per run folder, and one sweep per sweep folder: an OS file lock (``filelock``).

Two ``resume=`` of one folder at once would write the same checkpoints and event files; two
sweeps into one ``hydra.sweep.dir`` would name their jobs alike and write into each other's
folders. The second one is refused. The operating system holds the lock for the process and
drops it when the process dies (also on shared file systems), so a killed run never blocks
its own resume, and what the lock file holds (empty, garbage, an old format) never matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from ae_lightning.errors import UserError

LOCK_NAME = "run.lock"
SWEEP_LOCK_NAME = "sweep.lock"


class RunFolderBusy(UserError):
    """Another live process holds the run (or sweep) folder."""


def acquire(folder: Path, name: str = LOCK_NAME, what: str = "run folder") -> FileLock:
    """Take ``folder/name`` for this process, or raise ``RunFolderBusy`` at once."""
    lock = FileLock(folder / name, timeout=0)  # never wait: the holder may run for hours
    try:
        lock.acquire()
    except Timeout:
        raise RunFolderBusy(
            f"The {what} {folder} is in use by another process: wait for it to finish, or "
            f"choose another folder."
        ) from None
    return lock


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration of the block (the file stays: see filelock)."""
    lock = acquire(run_dir)
    try:
        yield
    finally:
        lock.release()
