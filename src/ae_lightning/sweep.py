"""Hydra callback: when a multirun ends, compare its jobs (summary table + figures)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ae_lightning import tb
from ae_lightning.atomic import check_no_links_out, write_atomic
from ae_lightning.compare import compare
from ae_lightning.errors import UserError
from ae_lightning.naming import record_sweep
from ae_lightning.runfolder import find_runs, read_run
from ae_lightning.runlock import SWEEP_LOCK_NAME, acquire

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """Writes ``summary.csv``, ``summary.md`` and ``comparison/*.png`` into the sweep folder.

    Switch off with ``hydra.callbacks.sweep_summary.enabled=false``. A failure here is
    logged and never touches the jobs' results.
    """

    def __init__(self, enabled: bool = True, sampler: str = "auto", seed: int = 0) -> None:
        self.enabled, self.sampler, self.seed = enabled, sampler, seed
        self._lock: FileLock | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Take the sweep folder, then record what the sweep varies (jobs are named by it).

        A second sweep into a folder in use is refused before it writes anything there: its
        jobs would take the first one's job names. The sweep's curves layout goes into its
        ``comparison`` run; its HParams experiment and summary follow at the end.
        """
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            # A received sweep folder: a link out would carry the lock, sweep.json, Hydra's
            # multirun.yaml, the jobs and the summary to its target.
            check_no_links_out(sweep_dir, f"hydra.sweep.dir={sweep_dir}")
            self._lock = acquire(sweep_dir, SWEEP_LOCK_NAME, "sweep folder")
        except UserError as err:  # Hydra would print its own report of a callback's error
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        varying = record_sweep(config)
        tb.write_curves_layout(sweep_dir / "comparison")
        log.info("Sweep over %s: %s", ", ".join(varying) or "nothing", sweep_dir)

    def __getstate__(self) -> dict[str, Any]:
        # Launchers (submitit) pickle the callbacks into each job; the lock stays with the
        # sweep's own process, which holds it.
        return {**self.__dict__, "_lock": None}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.summarise(Path(config.hydra.sweep.dir), data_root=_live_data_root(config))
        finally:
            if self._lock is not None:
                self._lock.release()

    def summarise(self, sweep_dir: Path, data_root: str | None = None) -> None:
        """Compare the sweep's job folders so far (also after SIGTERM stopped the sweep).

        ``data_root``: where this sweep's jobs read their images (the jobs' saved configs
        hold ``${oc.env:AE_DATA_ROOT,...}`` unresolved, and a file is never resolved).
        """
        try:
            write_experiment(sweep_dir)
        except Exception:
            log.exception("The sweep's HParams experiment failed; TensorBoard derives its own.")
        if not self.enabled:
            return
        try:
            out = compare([sweep_dir], sweep_dir / "comparison", data_root=data_root,
                          sampler=self.sampler, seed=self.seed)  # fmt: skip
            for name in ("summary.csv", "summary.md"):
                write_atomic(sweep_dir / name, (out / name).read_bytes())
            log.info("Sweep summary: %s\n%s", sweep_dir / "summary.md",
                     (sweep_dir / "summary.md").read_text())  # fmt: skip
        except Exception:
            log.exception("The sweep summary failed; the jobs' own folders are untouched.")


def _live_data_root(config: DictConfig) -> str | None:
    """The data root this process's own config resolves to (None: none, or not resolvable):
    for an npz file or image folder (``data.path``), the folder that holds it, since a
    comparison looks for a received run's data by its name in the root it is given."""
    try:
        path = OmegaConf.select(config, "data.path", throw_on_resolution_failure=True)
        if isinstance(path, str) and path:
            return str(Path(path).expanduser().absolute().parent)
        root = OmegaConf.select(config, "data.root", throw_on_resolution_failure=True)
    except Exception:  # an interpolation only a job could resolve: the jobs' folders decide
        return None
    return root if isinstance(root, str) and root else None


def write_experiment(sweep_dir: Path) -> None:
    """The sweep's HParams experiment: a column for each knob whose values differ between jobs.

    Read from the jobs' own records once they ran, so a knob a model config changes (``lr``
    of ``hidden1024``) is shown, and one the sweep left alone is not.
    """
    runs = [read_run(path) for path in find_runs([sweep_dir])]
    tb.write_experiment(
        sweep_dir / "comparison", tb.differing_knobs(run.knobs for run in runs if run.knobs)
    )
