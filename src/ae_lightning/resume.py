"""Resuming: which checkpoint a run continues from, the checks before it does, and the
shell-quoted commands that continue or repeat a run.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ae_lightning.checkpointing import OWN_NAME
from ae_lightning.errors import UserError
from ae_lightning.models import checkpoint_family
from ae_lightning.runfolder import load_checkpoint


def resume_checkpoint(cfg: DictConfig, model: pl.LightningModule) -> str | None:
    """The checkpoint ``fit`` continues from: ``resume``'s last.ckpt, ``ckpt_path``, or none.

    Refuses, in one sentence, a missing file or a checkpoint of another architecture.
    """
    if cfg.get("resume"):
        path = Path(cfg.resume) / "checkpoints" / "last.ckpt"
        hint = f"resume={cfg.resume} needs {path}"
    elif cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        hint = f"ckpt_path={cfg.ckpt_path}"
    else:
        return None
    if not path.is_file():
        raise UserError(
            f"{hint}, which does not exist: point it at a run folder (or .ckpt file) that "
            "finished at least one epoch."
        )
    checkpoint = load_checkpoint(path)  # tensors and plain data only
    family = checkpoint_family(checkpoint)
    if family != model.family:
        raise UserError(
            f"{path} holds a {family} model but this config builds a {model.family}: repeat "
            "the run's original overrides (see its .hydra/overrides.yaml)."
        )
    saved = checkpoint.get("hyper_parameters", {})
    for key in ("bottleneck", "hidden", "decoder_hidden", "activation"):
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
    reached = checkpoint.get("epoch", -1) + 1  # the epoch it was trained in (1-based)
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs not in (None, -1) and max_epochs < reached:
        raise UserError(
            f"{path} has already trained into epoch {reached} but trainer.max_epochs="
            f"{max_epochs}: add trainer.max_epochs={reached} or more."
        )
    return str(path)


def check_resumed_test_checkpoint(cfg: DictConfig) -> None:
    """Refuse a resume whose test would need a best checkpoint that is gone (before training).

    ``last.ckpt`` records the best checkpoint's path; the file is looked for in this folder.
    """
    if not cfg.get("resume") or cfg.get("test_ckpt") != "best":
        return
    folder = Path(cfg.resume) / "checkpoints"
    states = load_checkpoint(folder / "last.ckpt").get("callbacks") or {}
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
