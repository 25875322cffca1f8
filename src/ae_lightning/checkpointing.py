"""Checkpoint files that are either complete or absent, never half-written; SIGTERM saves."""

from __future__ import annotations

import io
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``<path>.tmp`` beside ``path``, then renames it over ``path``.

    A rename within one folder is atomic, so a kill during the save (SIGKILL, power, a full
    disk) leaves the previous ``last.ckpt`` intact instead of a truncated file. The temporary
    file sits in the destination folder, not in ``$TMPDIR`` (where Lightning's fsspec
    transaction stages it), so a small ``$TMPDIR`` does not matter; a failed save removes it.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised first: a disk error stays an OSError
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror, str(path)) from err  # name the file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class CheckpointOnSigterm(Callback):
    """On SIGTERM, save ``checkpoints/last.ckpt`` of the exact step, then let the run stop.

    Lightning notices SIGTERM at the end of the current training step and raises
    ``SIGTERMException`` through ``on_exception``; the checkpoint holds the loops' progress and
    the in-memory loader's position, so ``resume=`` continues with the next minibatch. Only
    while fitting: after training, ``last.ckpt`` is the finished training and stays so.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.saved_step: int | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not isinstance(exception, SIGTERMException) or trainer.sanity_checking or not fitting:
            return
        # Writes, never reads: Lightning's `weights_only=False` here means "with the optimizer
        # and loop state" (what resume= needs), not torch.load's unpickling flag. Every load
        # of a checkpoint in this package uses torch.load(weights_only=True).
        trainer.save_checkpoint(self.path, weights_only=False)
        self.saved_step = trainer.global_step


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that follows its run folder when the folder is moved.

    Lightning forgets the best score and path when a checkpoint's saved ``dirpath`` differs
    from the current one; a moved run would then test on the last weights, or overwrite
    best.ckpt with a worse model. The saved paths are mapped into the current folder (the
    file names are the same) so ``resume=`` of a moved or copied run keeps its best model.
    """

    @cached_property
    def state_key(self) -> str:
        # Checkpoints written by a plain ModelCheckpoint keep loading into this one. Cached:
        # Lightning reads it for every hook it dispatches, and building it formats the
        # settings anew each time; they do not change after __init__.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and os.path.realpath(saved) != os.path.realpath(self.dirpath):
            here = Path(self.dirpath)

            def moved(path: Any) -> Any:
                return str(here / Path(path).name) if path else path

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": moved(state_dict.get("best_model_path")),
                "kth_best_model_path": moved(state_dict.get("kth_best_model_path")),
                "last_model_path": moved(state_dict.get("last_model_path")),
                "best_k_models": {
                    moved(k): v for k, v in (state_dict.get("best_k_models") or {}).items()
                },
            }
        super().load_state_dict(state_dict)
