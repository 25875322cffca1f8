"""Checkpoint files that are either complete or absent, never half-written; SIGTERM saves."""

from __future__ import annotations

import io
import math
import os
import re
import stat
from functools import cached_property
from pathlib import Path
from typing import Any
from weakref import proxy

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ae_lightning.atomic import write_atomic
from ae_lightning.errors import UserError


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

    def __init__(self, *args: Any, save_last: bool | None = None, **kwargs: Any) -> None:
        # Lightning 2.6 writes save_last's copy only when it writes a top-k file too: with
        # save_top_k=1 every epoch that did not improve left last.ckpt at the best epoch,
        # so a resume trained those epochs again. This callback writes last.ckpt itself.
        super().__init__(*args, save_last=False, **kwargs)
        self.keeps_last = bool(save_last)
        self._last_written_at: int | None = None  # the global step of the last write

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._write_last(trainer)

    def _write_last(self, trainer: pl.Trainer) -> None:
        """``last.ckpt`` at the end of every epoch, validated or not.

        Lightning calls this hook after the module's own (its epoch schedulers have stepped)
        and after the other callbacks' (the history holds the epoch's row).
        """
        if (
            not self.keeps_last
            or not self.dirpath
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or bool(trainer.fast_dev_run)
            or trainer.global_step in (0, self._last_written_at)
        ):
            return
        path = Path(self.dirpath) / (self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(path, self.save_weights_only)
        self._last_written_at = trainer.global_step
        self.last_model_path = str(path)
        for logger in trainer.loggers:
            logger.after_save_checkpoint(proxy(self))

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
            """A real floating scalar (a complex one breaks the comparison), else dropped."""
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                return None
            return value if value.is_floating_point() else None

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


# --- a received optimizer state, checked against the optimizer it is loaded into -------------

# How an optimizer runs its step (which kernel, where its state lives): this run's own choice,
# never the file's; a file's fused=True with a short buffer is an out-of-bounds write.
KERNEL_FLAGS = ("fused", "foreach", "capturable", "differentiable")
# Settings that are never negative; Adam's betas lie in [0, 1).
NON_NEGATIVE = {"lr", "eps", "weight_decay", "momentum", "dampening", "initial_lr", "max_lr",
                "min_lr", "max_momentum", "base_momentum", "alpha", "lr_decay"}  # fmt: skip
STEP_LIMIT = 2**63
# The settings torch's schedulers add to an optimizer's groups (one-cycle's, cyclic's).
SCHEDULER_SETTINGS = {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"}


def sound_tensor(tensor: torch.Tensor) -> bool:
    """A tensor as ``torch.save`` writes a weight: dense, real, contiguous, held by its storage.

    A stride-0 view (``torch.zeros(1).expand(2e6, 2e6)``) is a few bytes on disk and declares
    4e12 elements; a storage shorter than its tensor is read past its end by any kernel.
    """
    return (
        tensor.layout == torch.strided
        and not tensor.is_complex()
        and not tensor.is_quantized
        and tensor.is_contiguous()
        and tensor.storage_offset() >= 0
        and (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
        <= tensor.untyped_storage().nbytes()
    )


def check_optimizer_state(
    state: Any,
    params: list[list[torch.Tensor]],
    where: str,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """One sentence unless ``state`` fits the optimizer whose groups hold ``params``.

    Every group lists its parameters' indices in order, its settings are plain finite numbers
    in range, and every state tensor has its parameter's shape and floating dtype (``step`` a
    scalar): the fused kernels index the buffers by the parameter's size, unchecked. Given the
    ``optimizer`` it is loaded into, every saved setting must be one that optimizer keeps:
    another optimizer's state (SGD's momentum buffers in Adam) is a KeyError at the first step.
    """

    def refuse(key: str, value: Any, wanted: str) -> UserError:
        plain = isinstance(value, (type(None), bool, int, float, str, tuple, list))
        shown = repr(value)[:80] if plain else type(value).__name__
        return UserError(
            f"{where} has optimizer_states.{key}={shown}, not {wanted}: it was not written by "
            "train.py for this model (or was damaged); use another checkpoint or retrain."
        )

    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise refuse("param_groups", state, "a list of parameter groups")
    groups, saved = state["param_groups"], state.get("state", {})
    if len(groups) != len(params):
        raise refuse("param_groups", len(groups), f"{len(params)} group(s)")
    flat, start = [], 0
    for i, (group, own) in enumerate(zip(groups, params, strict=True)):
        wanted = list(range(start, start + len(own)))
        if not isinstance(group, dict) or group.get("params") != wanted:
            shown = group.get("params") if isinstance(group, dict) else group
            raise refuse(f"param_groups[{i}].params", shown, f"the indices {wanted}")
        if optimizer is not None:
            _check_optimizer_kind(group, i, optimizer, where)
        for key, value in group.items():
            if key != "params" and not _good_setting(key, value):
                raise refuse(f"param_groups[{i}].{key!s:.40}", value, "a plain number in range")
        flat += own
        start += len(own)
    if not isinstance(saved, dict) or not set(saved) <= set(range(len(flat))):
        raise refuse("state", saved, f"a mapping of parameter indices 0..{len(flat) - 1}")
    for index, entry in saved.items():
        if not isinstance(entry, dict):
            raise refuse(f"state[{index}]", entry, "a mapping of tensors")
        param = flat[index]
        for key, value in entry.items():
            here = f"state[{index}].{key!s:.40}"
            if key == "step":
                if not _good_step(value):
                    raise refuse(here, value, "a step count (a scalar from 0 to 2**63)")
            elif value is not None and not (
                isinstance(value, torch.Tensor)
                and sound_tensor(value)
                and value.shape == param.shape
                and value.dtype == param.dtype
                and bool(torch.isfinite(value).all())
            ):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise refuse(
                    here, shape, f"a finite {param.dtype} tensor of shape {tuple(param.shape)}"
                )


def _check_optimizer_kind(
    group: dict[Any, Any], index: int, optimizer: torch.optim.Optimizer, where: str
) -> None:
    own = set(optimizer.defaults) | {key for g in optimizer.param_groups for key in g}
    own |= SCHEDULER_SETTINGS  # a scheduler built after this check adds them to the groups
    foreign = sorted(str(key)[:40] for key in group if key not in own)
    if foreign:
        raise UserError(
            f"{where} holds the state of another optimizer than {type(optimizer).__name__} "
            f"(its param_groups[{index}] has {', '.join(foreign[:4])}): train on with the "
            "optimizer it was trained with (its run's .hydra/overrides.yaml names it)."
        )


def _good_setting(key: str, value: Any) -> bool:
    """A group setting: a flag, or a finite number (a scalar tensor where lr is one) in range."""
    if key in KERNEL_FLAGS or isinstance(value, bool) or value is None:
        return isinstance(value, bool) or value is None
    if isinstance(value, tuple | list):
        return (
            key == "betas"
            and len(value) == 2
            and all(_number(v) is not None and 0 <= _number(v) < 1 for v in value)
        )
    number = _number(value)
    return number is not None and (key not in NON_NEGATIVE or number >= 0)


def _number(value: Any) -> float | None:
    """``value`` as a finite float (a plain number or a one-element real tensor), else None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or not sound_tensor(value):
            return None
        value = value.item()
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _good_step(value: Any) -> bool:
    if isinstance(value, torch.Tensor) and (value.dim() > 1 or not sound_tensor(value)):
        return False
    number = _number(value)
    return number is not None and 0 <= number < STEP_LIMIT


def guard_optimizer_load(optimizer: torch.optim.Optimizer) -> None:
    """Check a loaded state against ``optimizer`` and keep its own kernel flags (a hook).

    Runs inside ``optimizer.load_state_dict``, the one place every resume goes through.
    """

    def hook(opt: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        params = [list(group["params"]) for group in opt.param_groups]
        check_optimizer_state(state, params, "the checkpoint", opt)
        groups = []
        for group, own in zip(state["param_groups"], opt.param_groups, strict=True):
            flags = {key: own[key] for key in KERNEL_FLAGS if key in own}
            groups.append({k: v for k, v in group.items() if k not in KERNEL_FLAGS} | flags)
        return {**state, "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(hook)
