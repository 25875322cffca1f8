"""Resuming: which checkpoint a run continues from, the checks before it does, and the
shell-quoted commands that continue or repeat a run.
"""

from __future__ import annotations

import inspect
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

from ae_lightning.checkpointing import (
    KERNEL_FLAGS,
    OWN_NAME,
    STEP_LIMIT,
    check_optimizer_state,
)
from ae_lightning.errors import UserError
from ae_lightning.models import checkpoint_family
from ae_lightning.runfolder import PLAIN, load_checkpoint, saved_config

ARCHITECTURE = ("bottleneck", "hidden", "decoder_hidden", "activation")


def resume_checkpoint(cfg: DictConfig, model: pl.LightningModule) -> str | None:
    """The checkpoint ``fit`` continues from: ``resume``'s last.ckpt, ``ckpt_path``, or none.

    Refuses, in one sentence, a missing file or a checkpoint of another architecture.
    """
    if cfg.get("resume"):
        path = Path(cfg.resume) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise UserError(
                f"resume={cfg.resume} needs {path}, which does not exist: point it at a run "
                "folder that trained at least one epoch."
            )
    elif cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise UserError(
                f"ckpt_path={cfg.ckpt_path} {what}: point it at a .ckpt file, e.g. "
                "<run>/checkpoints/last.ckpt (resume=<run> continues that run in place)."
            )
    else:
        return None
    within = Path(cfg.resume) if cfg.get("resume") else None  # the folder the user named
    checkpoint = load_checkpoint(path, within)  # tensors and plain data only
    family = checkpoint_family(checkpoint)
    if family != model.family:
        raise UserError(
            f"{path} holds a model of the {family} family but this config builds the "
            f"{model.family} family: repeat "
            "the run's original overrides (see its .hydra/overrides.yaml)."
        )
    saved = checkpoint.get("hyper_parameters", {})
    # ckpt_path= starts a new run from the weights, so the objective's knobs (beta, samples,
    # the loss...) may change there; resume= goes on with the run as it was trained.
    shared = sorted(set(saved) & set(model.hparams)) if cfg.get("resume") else ARCHITECTURE
    for key in shared:
        if key in saved and saved[key] != model.hparams.get(key):
            raise UserError(
                f"{path} was trained with {key}={saved[key]!r} but this config has "
                f"{key}={model.hparams.get(key)!r}: repeat the run's original overrides "
                f"(see its .hydra/overrides.yaml)."
            )
    # The weights themselves, not only the settings that claim to describe them.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    for name in sorted(expected.keys() | found.keys()):
        if expected.get(name) != found.get(name):
            raise UserError(
                f"{path} holds {name[:80]} of shape {found.get(name)} but this config's model "
                f"has {expected.get(name)}: repeat the run's original overrides (see its "
                ".hydra/overrides.yaml)."
            )
    check_training_state(checkpoint, model, path)
    reached = checkpoint.get("epoch", -1) + 1  # the epoch it was trained in (1-based)
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs not in (None, -1) and max_epochs < reached:
        raise UserError(
            f"{path} has already trained into epoch {reached} but trainer.max_epochs="
            f"{max_epochs}: add trainer.max_epochs={reached} or more."
        )
    completed = reached if _epoch_completed(checkpoint) else reached - 1
    if not cfg.get("resume") and max_epochs not in (None, -1) and max_epochs <= completed:
        # A new run folder with nothing trained in it, holding no checkpoint of its own.
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} has trained {completed} epochs and trainer.max_epochs="
            f"{max_epochs} leaves a new run nothing to train: add trainer.max_epochs="
            f"{completed + 1} or more, or test it as it is with eval.py ckpt_path={cfg.ckpt_path}."
        )
    if cfg.get("resume"):
        _refuse_stopped_early(checkpoint, cfg)
        _check_resumed_data(cfg)
        _check_resumed_test_checkpoint(checkpoint, cfg)
    return str(path)


# The data settings that decide what a run trains and validates on (not where the files
# are, or how they travel to the device).
TRAINED_DATA_KEYS = (
    "_target_", "dataset", "batch_size", "val_size", "split_seed", "seed", "drop_last",
    "binarize", "binarize_seed", "test_size", "image_size", "channels",
)  # fmt: skip


def _check_resumed_data(cfg: DictConfig) -> None:
    """One sentence unless ``resume=`` goes on with the data the run was trained on, as its
    own saved config says (read as data; a key it lacks is not compared)."""
    saved = saved_config(Path(cfg.resume)).get("data")
    if not isinstance(saved, dict):
        return  # a run folder without its config: nothing to compare with
    for key in TRAINED_DATA_KEYS:
        if key not in saved or key not in cfg.data:
            continue
        wanted = cfg.data.get(key)
        wanted = list(wanted) if isinstance(wanted, ListConfig) else wanted
        if not _same_setting(saved[key], wanted):
            raise UserError(
                f"resume={cfg.resume} was trained with data.{key}={repr(saved[key])[:60]} but "
                f"this config has {repr(wanted)[:60]}, and a resumed run goes on with the "
                "data it was trained on: repeat the run's original overrides (see its "
                ".hydra/overrides.yaml)."
            )


def _epoch_completed(checkpoint: dict[str, Any]) -> bool:
    """Whether the checkpoint was written after its epoch's last batch (not mid-epoch)."""
    loops = checkpoint.get("loops")
    fit = loops.get("fit_loop") if isinstance(loops, dict) else None
    progress = fit.get("epoch_loop.batch_progress") if isinstance(fit, dict) else None
    last = progress.get("is_last_batch") if isinstance(progress, dict) else None
    return last is not False  # unknown: as at an epoch's end, where train.py writes them


def _refuse_stopped_early(checkpoint: dict[str, Any], cfg: DictConfig) -> None:
    """A run early stopping ended stops again after one epoch when resumed with it on: its
    patience was used up. Say so before training, with the override that trains on."""
    if not (cfg.get("callbacks") or {}).get("early_stopping"):
        return
    states = checkpoint.get("callbacks")
    for name, state in states.items() if isinstance(states, dict) else ():
        if not (isinstance(name, str) and name.startswith("EarlyStopping")):
            continue
        stopped = state.get("stopped_epoch") if isinstance(state, dict) else None
        if isinstance(stopped, int) and not isinstance(stopped, bool) and stopped > 0:
            raise UserError(
                f"resume={cfg.resume} was stopped early at epoch {min(stopped, STEP_LIMIT) + 1} "
                "and its early stopping's patience is used up, so it would stop again after "
                "one epoch: add early_stopping=none to train it on to trainer.max_epochs="
                f"{cfg.trainer.get('max_epochs')}."
            )


def check_training_state(checkpoint: dict[str, Any], model: pl.LightningModule, path: Path) -> None:
    """Refuse, before the Trainer starts, an optimizer or scheduler state that does not fit.

    The same check runs again inside the optimizer's ``load_state_dict``
    (``guard_optimizer_load``); here it names the file and comes before the Trainer's chatter.
    """
    states = checkpoint.get("optimizer_states", [])
    if len(states) > 1:
        raise UserError(
            f"{path} holds {len(states)} optimizer states but train.py trains with one: use a "
            "checkpoint written by train.py."
        )
    optimizer = _optimizer(model)
    for state in states:
        check_optimizer_state(state, [list(model.parameters())], str(path), optimizer)
    schedulers = checkpoint.get("lr_schedulers", [])
    configured = getattr(model, "scheduler_factory", None) is not None
    if states and bool(schedulers) != configured:
        had = "a learning-rate schedule" if schedulers else "no learning-rate schedule"
        raise UserError(
            f"{path} was trained with {had} but this config has "
            f"{'one' if configured else 'none'}, and a schedule cannot start or stop in the "
            "middle of a resumed optimizer: repeat the run's original scheduler= override "
            "(see its .hydra/overrides.yaml)."
        )
    for state in states:
        if optimizer is not None:
            _check_optimizer_settings(state, optimizer, path, bool(schedulers or configured))
    bad = None if len(schedulers) <= 1 else ("lr_schedulers", len(schedulers))
    for state in schedulers:
        bad = bad or _bad_scheduler_value(state, "lr_schedulers[0]")
    if bad is not None:
        where, value = bad
        shown = repr(value)[:80] if isinstance(value, PLAIN) else type(value).__name__
        raise UserError(
            f"{path} has {where}={shown}, not a plain setting of one scheduler: it was not "
            "written by train.py (or was damaged); use another checkpoint of the run or retrain."
        )
    for state in schedulers if states and configured and optimizer is not None else ():
        _check_scheduler(state, model, optimizer, path)  # plain data, checked above


# The group settings torch's schedulers move as they step.
SCHEDULED_SETTINGS = ("lr", "betas", "momentum")


def _check_optimizer_settings(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path, scheduled: bool
) -> None:
    """One sentence unless the checkpoint's optimizer was set up as this config sets it up.

    Lightning restores the saved groups over the configured ones, so a changed lr or weight
    decay would be recorded in the recipe but never used. A schedule moves the lr and the
    momentum (one-cycle cycles Adam's first beta): those are compared only without one.
    """
    own = optimizer.param_groups[0]
    moved = SCHEDULED_SETTINGS if scheduled else ()
    for group in state["param_groups"]:
        for key, wanted in own.items():
            if key in ("params", *KERNEL_FLAGS, *moved) or key not in group:
                continue
            if not _same_setting(group[key], wanted):
                _refuse_setting(path, key, group[key], wanted)


# The word of scheduler= for each of torch's classes, and a key only its state has.
SCHEDULE_NAMES = {
    "CosineAnnealingLR": "cosine", "OneCycleLR": "onecycle",
    "ReduceLROnPlateau": "plateau", "StepLR": "step",
}  # fmt: skip
SCHEDULE_MARKS = {"T_max": "cosine", "total_steps": "onecycle", "patience": "plateau",
                  "step_size": "step"}  # fmt: skip


def _check_scheduler(
    saved: dict[str, Any],
    model: pl.LightningModule,
    optimizer: torch.optim.Optimizer,
    path: Path,
) -> None:
    """One sentence unless the checkpoint's schedule is this config's, set up the same way.

    Lightning loads the saved state over the configured scheduler: another class's state
    would be merged into it, and a changed setting (a plateau's patience, a cosine's T_max)
    recorded in the recipe but never used.
    """
    built = _scheduler(model, optimizer, saved)
    if built is None:
        return
    own = built.state_dict()
    if set(saved) != set(own):
        had = next((name for key, name in SCHEDULE_MARKS.items() if key in saved), "another")
        name = SCHEDULE_NAMES.get(type(built).__name__, type(built).__name__)
        raise UserError(
            f"{path} holds the state of a {had} learning-rate schedule but this config has "
            f"scheduler={name}, and a resumed schedule keeps the checkpoint's state: repeat "
            "the run's original scheduler= override (see its .hydra/overrides.yaml)."
        )
    for key in getattr(model.scheduler_factory, "keywords", None) or {}:
        if key in saved and key in own and not _same_setting(saved[key], own[key]):
            hint = (
                f"; T_max follows trainer.max_epochs: model.scheduler.T_max={saved[key]!r} "
                "goes on past the cosine's end, where torch's cosine warms the lr up again"
                if key == "T_max"
                else " (see its .hydra/overrides.yaml)"
            )
            raise UserError(
                f"{path} was trained with model.scheduler.{key}={repr(saved[key])[:40]} but "
                f"this config has {repr(own[key])[:40]}, and a resumed schedule keeps the "
                f"checkpoint's settings: repeat the run's original overrides{hint}."
            )


def _scheduler(
    model: pl.LightningModule, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> Any:
    """The scheduler this config builds on ``optimizer`` (the checks' throwaway one; its
    length taken from the checkpoint where the run's length would be filled in); None where
    it cannot be built here (its own error comes when the Trainer builds it)."""
    factory = model.scheduler_factory
    target = getattr(factory, "func", None)
    length = {}
    takes_length = target is not None and "total_steps" in inspect.signature(target).parameters
    if takes_length and not (getattr(factory, "keywords", None) or {}).get("total_steps"):
        steps = saved.get("total_steps")
        length = {"total_steps": steps if _length(steps) and isinstance(steps, int) else 1}
    try:
        return factory(optimizer, **length)
    except (TypeError, ValueError):
        return None


def _same_setting(saved: Any, wanted: Any) -> bool:
    if isinstance(saved, torch.Tensor):
        saved = saved.item() if saved.numel() == 1 else saved.tolist()
    if isinstance(wanted, torch.Tensor):
        wanted = wanted.item() if wanted.numel() == 1 else wanted.tolist()
    if isinstance(saved, list | tuple) and isinstance(wanted, list | tuple):
        return len(saved) == len(wanted) and all(map(_same_setting, saved, wanted))
    if isinstance(saved, bool | None) or isinstance(wanted, bool | None):
        return saved is wanted or saved == wanted
    if isinstance(saved, int | float) and isinstance(wanted, int | float):
        return math.isclose(saved, wanted, rel_tol=1e-6, abs_tol=1e-12)
    return saved == wanted


def _refuse_setting(path: Path, key: str, saved: Any, wanted: Any) -> None:
    def shown(value: Any) -> str:
        value = value.tolist() if isinstance(value, torch.Tensor) else value
        return repr(value)[:40]

    raise UserError(
        f"{path} was trained with model.optimizer.{key}={shown(saved)} but this config has "
        f"{shown(wanted)}, and a resumed optimizer keeps the checkpoint's settings: repeat the "
        "run's original overrides (see its .hydra/overrides.yaml)."
    )


def _optimizer(model: pl.LightningModule) -> torch.optim.Optimizer | None:
    """The optimizer the run will build, for the settings it keeps; none where it cannot be
    built here (its own error comes when the Trainer builds it)."""
    factory = getattr(model, "optimizer_factory", None)
    try:
        return factory(model.parameters()) if factory is not None else None
    except (TypeError, ValueError):
        return None


# The words torch's schedulers keep in their state (one-cycle's phases name param-group keys,
# the plateau scheduler its modes): any other is a KeyError or ValueError mid-run.
SCHEDULER_WORDS = {
    "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "cos", "linear",
    "min", "max", "rel", "abs",
}  # fmt: skip


# The lengths torch's schedulers divide by or count down (step, cosine, one-cycle, warm
# restarts): positive numbers.
SCHEDULER_LENGTHS = {"step_size", "T_max", "total_steps", "T_0", "T_mult"}


def _length(value: Any) -> bool:
    plain = isinstance(value, int | float) and not isinstance(value, bool)
    return plain and 0 < value < STEP_LIMIT


def _bad_scheduler_value(node: Any, where: str, depth: int = 0) -> tuple[str, Any] | None:
    """The first value under a scheduler's state that is not plain data in range."""
    if depth > 8:
        return where, node
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key!s:.40}"
            if not isinstance(key, str) or (depth == 0 and key == "optimizer"):
                return here, key
            if depth == 0 and key in SCHEDULER_LENGTHS and not _length(value):
                return here, value  # a ZeroDivisionError (or torch's ValueError) mid-run
            if depth == 0 and key == "lr_lambdas":
                if not isinstance(value, list) or any(v is not None for v in value):
                    return here, value  # a lambda's own state: train.py's have none
                continue
            found = _bad_scheduler_value(value, here, depth + 1)
            if found:
                return found
        return None
    if isinstance(node, list | tuple):
        for i, value in enumerate(node):
            found = _bad_scheduler_value(value, f"{where}[{i}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(node, float) and math.isnan(node):
        return where, node
    if isinstance(node, int) and not isinstance(node, bool) and not -STEP_LIMIT < node < STEP_LIMIT:
        return where, node
    if isinstance(node, str) and node not in SCHEDULER_WORDS:
        return where, node
    return None if isinstance(node, PLAIN) else (where, node)


def _check_resumed_test_checkpoint(checkpoint: dict[str, Any], cfg: DictConfig) -> None:
    """Refuse a resume whose test would need a best checkpoint that is gone (before training).

    ``last.ckpt`` records the best checkpoint's path; the file is looked for in this folder.
    """
    if cfg.get("test_ckpt") != "best":
        return
    folder = Path(cfg.resume) / "checkpoints"
    states = checkpoint.get("callbacks")
    states = states if isinstance(states, dict) else {}
    for state in states.values():
        best = state.get("best_model_path") if isinstance(state, dict) else None
        name = Path(str(best)).name if best else ""
        if not OWN_NAME.fullmatch(name):  # not a name this package writes: dropped on resume
            continue
        if not (folder / name).is_file():
            raise UserError(
                f"resume={cfg.resume} would test its best checkpoint {folder / Path(best).name}, "
                "which is missing: put it back, or add test_ckpt=last to test "
                f"{folder / 'last.ckpt'} instead."
            )


def resume_command(cfg: DictConfig) -> str:
    """The command line that continues this run in its own folder (shell-quoted)."""
    kept = [o for o in _overrides() if not o.startswith(("resume=", "ckpt_path=", "+ckpt_path="))]
    return shlex.join([*_program(), *kept, f"resume={Path(cfg.run_dir).resolve()}"])


def rerun_command() -> str:
    """The command line that started this run (shell-quoted), ``hydra.*`` overrides too."""
    hydra = list(HydraConfig.get().overrides.hydra) if HydraConfig.initialized() else []
    own = [o for o in hydra if not o.startswith("hydra.mode=")]  # Hydra adds that one itself
    return shlex.join([*_program(), *_overrides(), *own])


def _program() -> list[str]:
    script = Path(sys.argv[0]).name
    return ["python", script] if script.endswith(".py") else [script]


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
