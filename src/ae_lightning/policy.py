"""The process policy of the entry points: what a run's ending means to the shell.

Exit codes tell the truth: 0 when the run finished and its results are on disk, 2 for bad
input (one sentence), 1 for a failed write (one sentence), 143 after SIGTERM with the
command that continues. A job of a sweep that fails leaves ``failed.json`` and the sweep
goes on. One process holds a run folder at a time.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import inspect
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from ae_lightning.cpu import share_cores
from ae_lightning.errors import RunInterrupted, UserError
from ae_lightning.interrupts import INTERRUPTED
from ae_lightning.models import init_parameters
from ae_lightning.record import in_multirun, write_json
from ae_lightning.resume import resume_command
from ae_lightning.runlock import LOCK_NAME, RunFolderBusy, run_lock
from ae_lightning.train import train

log = logging.getLogger(__name__)


def run_cli(cfg: DictConfig, task: Callable[[DictConfig], dict[str, Any]] = train) -> float:
    """Entry-point body: train and print the result.

    Bad input exits 2 with one sentence. In a sweep, a failing job writes ``failed.json``
    (its error line) into its folder and the sweep goes on with the next job.
    """
    threading.excepthook = _quiet_write_failures  # TensorBoard's writer thread re-raises
    parallel_jobs = _parallel_jobs()
    if parallel_jobs > 1:
        share_cores(parallel_jobs)
    try:
        with _locked(Path(cfg.run_dir)):
            metrics = task(cfg)
    except RunInterrupted as err:
        if rank_zero_only.rank == 0:
            _mark_interrupted(cfg, err)
            if in_multirun():
                _stop_sweep()
            print(f"interrupted: {err}", file=sys.stderr, flush=True)
        sys.exit(143)  # 128 + SIGTERM, as a shell reports a process the signal ended
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(err, InstantiationException):  # a `_target_` from the command line
            err = UserError(_instantiate_sentence(err, cfg))
        err = _limit_sentence(err)
        disk = _write_failure(err, Path(cfg.run_dir), resume_command(cfg))
        if in_multirun():
            line = disk or f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.exception("Job failed; the sweep goes on: %s", line)
            if isinstance(err, RunFolderBusy):  # the folder is another process's: no write
                return float("nan")
            with contextlib.suppress(OSError):  # the disk may be the very problem
                Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
                write_json(Path(cfg.run_dir) / "failed.json", {"status": "failed", "error": line})
            return float("nan")
        if disk:
            print(f"error: {disk}", file=sys.stderr, flush=True)
            sys.exit(1)
        if not isinstance(err, UserError):
            raise
        if not isinstance(err, RunFolderBusy) and not cfg.get("resume"):
            _leave_refused(Path(cfg.run_dir), str(err))
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if rank_zero_only.rank == 0:
        epochs = f"{metrics['epochs']} epoch{'' if metrics['epochs'] == 1 else 's'}"
        trained = (  # an evaluation trained nothing: its checkpoint's epochs, no time
            f"{epochs}, {metrics['train_time_s']:.1f} s"
            if "train_time_s" in metrics
            else f"a checkpoint of {epochs}, tested"
        )
        print(f"test/mse {metrics['test/mse']:.5f}  ({trained})  -> {cfg.run_dir}", flush=True)
    return sweep_objective(metrics)


# Lightning's refusal of a fraction that leaves no batch (it counts the loader's batches
# before the first step, so nothing has trained).
_NO_BATCH_LEFT = re.compile(r"You requested to check (\S+) of the `(\w+)_dataloader` but (.*) < 1")


def _limit_sentence(err: Exception) -> Exception:
    found = _NO_BATCH_LEFT.search(str(err)) if type(err).__name__.endswith("Exception") else None
    if found is None:
        return err
    fraction, stage, product = found.groups()
    batches = product.rsplit("*", 1)[-1].strip()
    key = f"trainer.limit_{stage}_batches"
    return UserError(
        f"{key}={fraction} of the {stage} split's {batches} batch(es) is less than one batch "
        f"(Lightning counts batches, not images): raise it, e.g. {key}=1.0, or give a whole "
        "number of batches."
    )


def sweep_objective(metrics: dict[str, Any]) -> float:
    """What a sweeper (Optuna) minimises: the best validation MSE, never a test number, so
    a search never selects on the test set. A run without validation gives NaN, which
    Optuna records as a failed trial, and says so."""
    if "best_val/mse" in metrics:
        return float(metrics["best_val/mse"])
    if in_multirun():
        log.warning(
            "This run has no validation score (best_val/mse), so the sweep gets NaN for it: "
            "the test MSE is never handed to a sweeper."
        )
    return float("nan")


WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EFBIG}


def _write_failure(err: BaseException, run_dir: Path, command: str) -> str:
    """One sentence for a failed write (full disk, read-only, I/O error), else ``""``.

    Removes the run's half-written ``*.tmp`` files; what was complete stays. ``command``
    (shell-quoted) continues the run; it ends the sentence, so it pastes as one.
    """
    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in WRITE_ERRORS):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return ""
    for tmp in run_dir.rglob("*.tmp") if run_dir.is_dir() else []:
        if not tmp.is_dir() or tmp.is_symlink():  # a folder of that name is not a half write
            tmp.unlink(missing_ok=True)
    where = str(cause.filename).removesuffix(".tmp") if cause.filename else f"into {run_dir}"
    kept = (
        "metrics.json and the last complete checkpoint are kept"
        if (run_dir / "metrics.json").is_file()
        else "the last complete checkpoint is kept"
    )
    return (
        f"Writing {where} failed ({cause.strerror}): free space on that disk or make it "
        f"writable; {kept}; then continue with: {command}"
    )


def _quiet_write_failures(args: threading.ExceptHookArgs) -> None:
    """A writer thread's disk error is re-raised in the main thread: no second traceback."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRORS:
        log.debug("A writer thread failed: %s", args.exc_value)
        return
    threading.__excepthook__(args)


def _locked(run_dir: Path) -> contextlib.AbstractContextManager:
    """This process's hold on its run folder (rank zero only: DDP ranks share the folder)."""
    if rank_zero_only.rank != 0 or not run_dir.is_dir():
        return contextlib.nullcontext()
    return run_lock(run_dir)


HYDRA_STUB = {".hydra", ".hydra-resumed", "train.log", "eval.log", LOCK_NAME}


def _leave_refused(run_dir: Path, sentence: str) -> None:
    """A refused new run leaves no folder; one that got further keeps failed.json."""
    if not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} <= HYDRA_STUB:
        shutil.rmtree(run_dir, ignore_errors=True)  # only Hydra's config and log: no run
        return
    write_json(run_dir / "failed.json", {"status": "failed", "error": sentence})


def _mark_interrupted(cfg: DictConfig, err: RunInterrupted) -> None:
    """``interrupted.json`` (the line and its command), so a resume is not taken as finished.

    A new run stopped before it kept a checkpoint has nothing to resume: its folder goes if
    only Hydra's files are in it, as a refused run's does. A sweep's job is always marked,
    for the summary.
    """
    run_dir = Path(cfg.run_dir)
    kept = (run_dir / "checkpoints" / "last.ckpt").is_file()
    if not kept and not cfg.get("resume") and not in_multirun():
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_STUB:
            shutil.rmtree(run_dir, ignore_errors=True)
        return
    if run_dir.is_dir():
        write_json(
            run_dir / INTERRUPTED,
            {"status": "interrupted", "error": str(err), "resume": err.resume_command},
        )


def _stop_sweep() -> None:
    """Summarise the sweep's jobs so far (the interrupted one is marked already)."""
    from ae_lightning.sweep import SweepSummary  # the sweep layer sits above this one

    hydra = HydraConfig.get()
    settings = hydra.callbacks.get("sweep_summary") or {}
    summary = SweepSummary(
        enabled=bool(settings.get("enabled", True)),
        sampler=str(settings.get("sampler", "gaussian")),
        seed=int(settings.get("seed", 0)),
    )
    summary.summarise(Path(hydra.sweep.dir))


def _instantiate_sentence(err: InstantiationException, cfg: DictConfig | None = None) -> str:
    """Hydra's refusal to build a config node, as one sentence naming the node, the setting
    at fault where it can be found (a misspelt key, a word where a number goes) and the fix."""
    lines = str(err).splitlines() or [type(err).__name__]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    node = key or "the config node"
    if cfg is not None and key:
        named = _bad_setting(cfg, key, err.__cause__)
        if named:
            return named
    reason = re.sub(r",? set env var HYDRA_FULL_ERROR=1.*$", "", lines[0]).rstrip(" .:")
    cause = err.__cause__
    if cause is not None and str(cause):
        reason += f": {type(cause).__name__}: {str(cause).splitlines()[0]}"
    return (
        f"{node} cannot be built ({reason}): fix {node}._target_ or the values given to it "
        "on the command line."
    )


def _bad_setting(cfg: DictConfig, key: str, cause: BaseException | None) -> str | None:
    """The sentence for a setting the class at ``key`` does not take, or a word given where
    its default is a number; None if neither. Reads the user's own config (trusted)."""
    from hydra.utils import get_class

    node = OmegaConf.select(cfg, key)
    try:
        target = get_class(str(node.get("_target_")))
    except Exception:
        return None
    defaults = {
        name: p.default
        for name, p in init_parameters(target).items()
        if p.default is not inspect.Parameter.empty
    }
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(cause or ""))
    if unexpected:
        name = unexpected.group(1)
        close = difflib.get_close_matches(name, defaults, n=1)
        hint = f"did you mean {key}.{close[0]}?" if close else f"{key} takes {sorted(defaults)}."
        return f"{key}.{name} is not a setting of {target.__name__}: {hint}"
    for name, value in node.items():
        default = defaults.get(name)
        number = isinstance(default, int | float) and not isinstance(default, bool)
        if number and (not isinstance(value, int | float) or isinstance(value, bool)):
            return (
                f"{key}.{name}={value!r} is not a number: use e.g. {key}.{name}={default!r} "
                "(its default)."
            )
    return None


def _parallel_jobs() -> int:
    """Jobs this sweep runs at once (``hydra/launcher=local_parallel``'s n_jobs), else 1."""
    if not in_multirun():
        return 1
    n_jobs = HydraConfig.get().launcher.get("n_jobs")
    return n_jobs if isinstance(n_jobs, int) and n_jobs > 0 else 1
