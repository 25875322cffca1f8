"""Checkpoint files that are either complete or absent, never half-written; SIGTERM saves."""

from __future__ import annotations

import io
import os
import re
import stat
from functools import cached_property
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ae_lightning.atomic import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a temporary file beside ``path``, then renames it over ``path`` (``write_atomic``).

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
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised first: a disk error stays an OSError
        write_atomic(path, buffer.getbuffer())


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
    """``ModelCheckpoint`` whose restored paths always lie in its own ``checkpoints/`` folder.

    A checkpoint's saved paths come from a file someone may have crafted, and Lightning
    deletes the "previous" best or last checkpoint by those paths (recursively): a path of
    ``/x/..`` or ``<dirpath>/../../victim`` would remove folders. Every saved path is
    re-derived as a plain file name this callback itself writes (``best.ckpt``,
    ``last.ckpt``) inside the current ``dirpath`` where that file exists, or dropped. That
    also keeps a moved or copied run's best model: Lightning forgets it when the saved
    ``dirpath`` differs.
    """

    @cached_property
    def state_key(self) -> str:
        # Checkpoints written by a plain ModelCheckpoint keep loading into this one. Cached:
        # Lightning reads it for every hook it dispatches, and building it formats the
        # settings anew each time; they do not change after __init__.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        here = Path(self.dirpath) if self.dirpath else None

        def own(path: Any) -> str:
            """The same name in ``here`` if it is one of ours and a file there, else ``""``."""
            name = path.rsplit("/", 1)[-1].rsplit("\\", 1)[-1] if isinstance(path, str) else ""
            if here is None or not self._is_own_name(name):
                return ""
            try:  # a plain file, not a link or a folder (lstat: the name itself)
                regular = stat.S_ISREG(os.lstat(here / name).st_mode)
            except OSError:
                regular = False
            return str(here / name) if regular else ""

        def score(value: Any) -> torch.Tensor | None:
            return value if isinstance(value, torch.Tensor) and value.numel() == 1 else None

        saved_k = state_dict.get("best_k_models")
        best_k = {
            own(k): v for k, v in (saved_k.items() if isinstance(saved_k, dict) else ())
            if own(k) and score(v) is not None
        }  # fmt: skip
        kth_value = score(state_dict.get("kth_value"))
        best = own(state_dict.get("best_model_path"))
        super().load_state_dict(
            {
                "monitor": self.monitor,
                "dirpath": self.dirpath,
                "best_model_score": score(state_dict.get("best_model_score")) if best else None,
                "current_score": score(state_dict.get("current_score")),
                "best_model_path": best,
                "kth_best_model_path": own(state_dict.get("kth_best_model_path")),
                "last_model_path": own(state_dict.get("last_model_path")),
                "best_k_models": best_k,
                **({"kth_value": kth_value} if kth_value is not None else {}),
            }
        )

    def _is_own_name(self, name: str) -> bool:
        """A file name this callback writes: ``<filename>.ckpt`` or ``last.ckpt``."""
        last = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
        if self.filename and "{" not in self.filename:
            return name in (self.filename + self.FILE_EXTENSION, last)
        # A formatted name (``epoch=3-step=40.ckpt``): plain characters, no folder part.
        return name == last or bool(OWN_NAME.fullmatch(name))


OWN_NAME = re.compile(r"[A-Za-z0-9_=+-][A-Za-z0-9._=+-]*\.ckpt")
