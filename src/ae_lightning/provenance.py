"""Where a run came from: the code's commit, the command, the machine and the versions.

A number in a paper needs the code and environment that produced it; ``run_info.json`` in the
run folder holds them, written when the run starts and completed when it ends. Nothing here
imports torch or Lightning at module level (their versions are read from package metadata).
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "pytorch-lightning", "ae-lightning", "hydra-core", "numpy")
GIT_TIMEOUT_S = 5  # a hung network file system must not hold up a run


def now() -> str:
    """The time as ISO 8601 with its UTC offset, to the second."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # a read must not take git's lock
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_version(folder: Path | None = None) -> dict[str, Any]:
    """The git commit of the checkout holding ``folder`` (the package's own by default) and
    whether tracked files differ from it; nulls outside a checkout (a wheel install)."""
    folder = folder or Path(__file__).resolve().parent
    commit = _git(folder, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "checkout": None}
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "checkout": _git(folder, "rev-parse", "--show-toplevel"),
    }


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(65536)  # the first processor's block is near the top
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run_info(device: str, device_name: str, argv: list[str] | None = None) -> dict[str, Any]:
    """Everything ``run_info.json`` holds at the start of a run (``ended`` comes at its end)."""
    return {
        "code": code_version(),
        "argv": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device,
        "device_name": device_name,
        "versions": package_versions(),
        "started": now(),
        "ended": None,
    }
