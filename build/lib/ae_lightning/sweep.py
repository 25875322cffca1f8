"""Hydra callback: when a multirun ends, compare its jobs (summary table + figures)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ae_lightning.compare import compare

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """Writes ``summary.csv``, ``summary.md`` and ``comparison/*.png`` into the sweep folder.

    Switch off with ``hydra.callbacks.sweep_summary.enabled=false``. A failure here is
    logged and never touches the jobs' results.
    """

    def __init__(self, enabled: bool = True, sampler: str = "gaussian", seed: int = 0) -> None:
        self.enabled, self.sampler, self.seed = enabled, sampler, seed

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            out = compare([sweep_dir], sweep_dir / "comparison", sampler=self.sampler,
                          seed=self.seed)  # fmt: skip
            for name in ("summary.csv", "summary.md"):
                shutil.copyfile(out / name, sweep_dir / name)
            log.info("Sweep summary: %s\n%s", sweep_dir / "summary.md",
                     (sweep_dir / "summary.md").read_text())  # fmt: skip
        except Exception:
            log.exception("The sweep summary failed; the jobs' own folders are untouched.")
