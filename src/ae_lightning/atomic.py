"""Writes into run folders that people send each other: atomic, and never through a link.

``write_atomic`` is the one way this package writes a file: a temporary file of a fresh,
unpredictable name created exclusively beside the target (``tempfile.mkstemp``: ``O_EXCL |
O_NOFOLLOW``, so nothing planted in the folder can block or redirect it), fsync, then
``os.replace``, which swaps the name itself and never follows a link at the target.
``check_no_links_out`` walks a received run folder before anything writes into it: a link
there pointing outside would carry every later write (logs, Hydra's ``.hydra*``, figures,
checkpoints, exports) to its target.

Standard library only: the command line calls it before Hydra (or torch) starts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ae_lightning.errors import UserError

# More entries than any run folder holds (figures per epoch, event files); the walk stops
# there so a folder of millions of files cannot stall a start.
MAX_WALK_ENTRIES = 100_000
# What open() would give a new file: 0666 less the umask (read once; setting it is global).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` atomically.

    A reader never sees half a file and a crash never leaves one at ``path``. A link at
    ``path`` is replaced, never followed. An ``OSError`` names ``path`` itself (not the
    temporary file), and the temporary file is removed.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with open(fd, "wb") as f:
                os.fchmod(fd, _FILE_MODE)  # not mkstemp's 0600: runs are shared
                if callable(data):
                    data(f)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the file
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from err


def check_no_links_out(folder: str | os.PathLike, what: str) -> None:
    """One sentence if anything in ``folder`` is a symlink pointing outside it (``UserError``).

    The walk never follows a link and stops after ``MAX_WALK_ENTRIES`` entries; a folder it
    cannot list is refused too. ``what`` names the command-line value in the sentence
    (``resume=<folder>``).
    """
    top = Path(folder)
    root = Path(os.path.realpath(top))
    pending, seen = [top], 0
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError as err:  # a folder of mode 0300 can still be written into by name
            raise UserError(
                f"{what}: {current} cannot be listed ({err.strerror}), so a link in it could "
                "not be ruled out: make it readable (chmod -R u+rwX) or delete it."
            ) from None
        for entry in entries:
            seen += 1
            if seen > MAX_WALK_ENTRIES:
                raise UserError(
                    f"{what} holds more than {MAX_WALK_ENTRIES:,} files: that is not a run "
                    "folder written by train.py; point it at one."
                )
            if entry.is_symlink():
                target = Path(os.path.realpath(entry.path))
                if target != root and root not in target.parents:
                    raise UserError(
                        f"{what}: {entry.path} is a link to {target}, outside the folder "
                        f"{top}, so a write there would overwrite its target: replace the link "
                        "with a plain file or folder (or delete it)."
                    )
            elif entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))


def check_run_to_resume(value: str | os.PathLike) -> None:
    """One sentence unless ``value`` is a run folder to continue with no link out of it."""
    _check_run_to_resume(Path(value))
    check_no_links_out(value, f"resume={value}")


def _check_run_to_resume(run: Path) -> None:
    """One sentence unless ``run`` is a folder holding ``checkpoints/last.ckpt``."""
    if run.is_file() and run.suffix == ".ckpt":
        folder = run.parent.parent if run.parent.name == "checkpoints" else run.parent
        raise UserError(
            f"resume={run} is a checkpoint file, not a run folder: resume={folder} continues "
            f"that run in place, ckpt_path={run} starts a new run from its weights."
        )
    if not run.is_dir():
        raise UserError(
            f"resume={run} does not exist: point it at a run folder (logs/runs/<run>) that "
            "trained at least one epoch."
        )
    if not (run / "checkpoints" / "last.ckpt").is_file():
        raise UserError(
            f"resume={run} holds no checkpoints/last.ckpt, so it is not a run to continue: "
            "point it at a run folder (logs/runs/<run>) that trained at least one epoch."
        )
