"""Reading a run folder as untrusted DATA: checkpoints, the saved data settings, metrics.

Run folders and checkpoints are shared between people, so nothing read from them may run
code: checkpoints load with ``torch.load(weights_only=True)`` (tensors and plain containers
only), and a saved ``.hydra/config.yaml`` is never instantiated; only known data keys with
plain values are read and handed to our own ``MNISTDataModule``. Every reader of run folders
(``ae-compare``, ``eval.py``, the notebook API) goes through here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from ae_lightning.data import MNISTDataModule
from ae_lightning.errors import UserError
from ae_lightning.models import checkpoint_family, families, family_class
from ae_lightning.models.ae import Autoencoder

DATA_TARGET = "ae_lightning.data.MNISTDataModule"
# Data keys a comparison may take from a run, with the types they must have.
DATA_KEYS: dict[str, type | tuple[type, ...]] = {
    "root": str,
    "batch_size": int,
    "eval_batch_size": int,
    "val_size": int,
    "split_seed": int,
    "seed": int,
    "drop_last": bool,
    "loader": str,
    "num_workers": int,
    "steps_per_call": int,
    "dataset": str,
    "binarize": str,  # load_run and ae-compare see the images the run was tested on
    "binarize_seed": int,
}
STATUS_FILES = ("interrupted.json", "failed.json")


class UnsafeCheckpointError(UserError):
    """A checkpoint whose pickle asks to run code: refused, never a mere failed row."""


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """A checkpoint's contents, refusing anything but tensors and plain data (one sentence)."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(
            f"{path} does not exist: point at a .ckpt file in a run's checkpoints/ folder."
        ) from None
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a call to code: a foreign or damaged pickle
            raise UserError(_unreadable(path, err)) from None
        raise UnsafeCheckpointError(
            f"{path} asks to run code when loaded (it holds more than weights), so it was not "
            "loaded: use a checkpoint written by train.py, from a source you trust."
        ) from None
    except Exception as err:  # OSError, EOFError, RuntimeError: a cut or corrupted file
        raise UserError(_unreadable(path, err)) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"{path} is not an ae-lightning checkpoint (no state_dict): point at a checkpoint "
            "written by train.py."
        )
    return checkpoint


def _unreadable(path: Path, err: Exception) -> str:
    return (
        f"{path} is not an ae-lightning checkpoint that can be read ({type(err).__name__}): "
        "it is truncated or corrupted; use another checkpoint of the run (e.g. "
        "checkpoints/best.ckpt) or retrain."
    )


def load_autoencoder(path: Path | str, map_location: torch.device | str = "cpu") -> Autoencoder:
    """The model of a checkpoint (on the CPU by default), in eval mode, without running code.

    The class comes from the checkpoint's ``model_family`` among this package's own models.
    """
    checkpoint = load_checkpoint(path)  # the one-sentence refusals
    family = checkpoint_family(checkpoint)
    model_class = family_class(family)  # looked up among our classes, never imported
    if model_class is None:
        raise UserError(
            f"{path} holds an unknown model family {family!r}: this version of ae-lightning "
            f"knows {sorted(families())}; load it with the version that wrote it."
        )
    try:
        model = model_class.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise UserError(
            f"{path} is not an ae-lightning checkpoint ({type(err).__name__}): point at a "
            "checkpoint written by train.py."
        ) from None
    return model.eval()


def read_config(run: Path) -> dict[str, Any]:
    """The run's saved ``.hydra/config.yaml`` as plain data (YAML safe_load: no tags, no code)."""
    path = run / ".hydra" / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(
            f"{path} cannot be read ({type(err).__name__}): remove {run} from the command or "
            "restore its .hydra/ folder."
        ) from None
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a mapping of settings: remove {run} from the command.")
    return config


def _targets(node: Any, where: str) -> list[str]:
    """Every ``_target_`` under ``node`` (dotted paths), the marks of code to instantiate."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            if key == "_target_":
                found.append(here)
            found += _targets(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _targets(value, f"{where}[{i}]")
    return found


def data_settings(run: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's data settings: known keys with plain values, interpolations resolved.

    Refuses (one sentence) a data section that names any other class or function to build.
    """
    config = read_config(run) if config is None else config
    data = config.get("data")
    path = run / ".hydra" / "config.yaml"
    if not isinstance(data, dict):
        raise UserError(f"{path} has no data section: remove {run} from the command.")
    extra = [t for t in _targets(data, "data") if t != "data._target_"]
    if data.get("_target_", DATA_TARGET) != DATA_TARGET or extra:
        where = extra[0] if extra else "data._target_"
        raise UserError(
            f"{path} asks to build code at {where} ({data.get('_target_')!r}); ae-lightning "
            f"reads run folders as data only: remove {run} from the command, it was not "
            "written by train.py."
        )
    # Interpolations (``${seed}``, ``${oc.env:...}``) refer to plain values in the same file
    # or to the environment; OmegaConf's built-in resolvers run no code of the file's choosing.
    resolvable = OmegaConf.create({k: v for k, v in config.items() if k != "hydra"})
    settings = {}
    for key, kind in DATA_KEYS.items():
        if key not in data:
            continue
        try:
            value = OmegaConf.select(resolvable, f"data.{key}", throw_on_resolution_failure=True)
        except Exception:
            continue  # e.g. a resolver of another tool: fall back to the default
        if value is None:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(
                f"{path} has data.{key}={value!r}, not a {kind.__name__}: remove {run} from "
                "the command or fix that value."
            )
        settings[key] = value
    return settings


def data_module(run: Path, data_root: str | None = None) -> MNISTDataModule:
    """Our own data module with the run's data settings (never the file's own ``_target_``)."""
    settings = data_settings(run)
    if data_root is not None:
        settings["root"] = data_root
    return MNISTDataModule(**settings, download=False)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a run folder; ``{}`` when absent or not an object."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def metrics(run: Path) -> dict[str, Any]:
    """The final metrics (``metrics.json``), numbers and strings only."""
    return {
        k: v for k, v in read_json(run / "metrics.json").items()
        if isinstance(v, int | float | str | list)
    }  # fmt: skip


def status(run: Path) -> tuple[str, str]:
    """``(status, error)``: ``interrupted`` or ``failed`` from their files, else ``("", "")``."""
    for name in STATUS_FILES:
        payload = read_json(run / name)
        if payload:
            state = str(payload.get("status", name.split(".")[0]))
            detail = payload.get("error") or payload.get("resume") or state
            return state, str(detail)
    return "", ""


def choose_checkpoint(run: Path) -> Path | None:
    """``checkpoints/best.ckpt``, else ``last.ckpt``, else None."""
    for name in ("best.ckpt", "last.ckpt"):
        path = run / "checkpoints" / name
        if path.is_file():
            return path
    return None
