"""Checkpoint files that are either complete or absent, never half-written; SIGTERM saves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<path>.tmp`` then renames it over ``path``.

    A rename within one folder is atomic, so a kill during the save (SIGKILL, power, a full
    disk) leaves the previous ``last.ckpt`` intact instead of a truncated file. The temporary
    file sits beside its destination (not in ``$TMPDIR``), so it needs no other disk's room,
    and is removed when the save fails.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class CheckpointOnSigterm(Callback):
    """On SIGTERM, save ``checkpoints/last.ckpt`` of the exact step, then let the run stop.

    Lightning notices SIGTERM at the end of the current training step and raises
    ``SIGTERMException`` through ``on_exception``; the checkpoint holds the loops' progress and
    the in-memory loader's position, so ``resume=`` continues with the next minibatch.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.saved_step: int | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full training state
        self.saved_step = trainer.global_step
