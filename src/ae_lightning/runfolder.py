"""Reading a run folder as untrusted DATA: checkpoints, the saved data settings, metrics.

Run folders and checkpoints are shared between people, so nothing read from them may run
code, reach the disk by a path of its own, or exhaust memory: checkpoints load with
``torch.load(weights_only=True)`` after their zip directory says how much they would inflate
to, and their contents are checked by type and model size before a model is built; a saved
``.hydra/config.yaml`` is never instantiated nor resolved (only known data keys with plain
values are read and handed to our own ``MNISTDataModule``); YAML and JSON are read from
regular files only, size- and depth-limited, YAML without aliases. Every reader of run
folders (``ae-compare``, ``eval.py``, ``ae-export``, the notebook API) goes through here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ae_lightning.checkpointing import sound_tensor
from ae_lightning.data import ImageFolderDataModule, MNISTDataModule, NpzDataModule
from ae_lightning.errors import UserError
from ae_lightning.limits import MAX_WIDTH, check_model_size, max_parameters
from ae_lightning.models import checkpoint_family, families, family_class, init_parameters
from ae_lightning.models.ae import Autoencoder
from ae_lightning.nets import IMAGE_SHAPE

log = logging.getLogger(__name__)

# Far above what train.py writes (a config is a few kB, metrics.json grows by one number an
# epoch); a received file past it is refused before it is read into memory.
MAX_TEXT_BYTES = 1 << 20
MAX_DEPTH = 100  # nesting of YAML/JSON: our own files stay under 10
# A checkpoint inflates to at most its weights and Adam's two moments at the parameter limit
# (4 bytes each), plus room for the loops' state; members of torch.save archives are stored,
# not compressed, so a member inflating more than MAX_RATIO times is a bomb, not a model.
CHECKPOINT_OVERHEAD_BYTES = 64 << 20
MAX_RATIO = 100
# data._target_ of a saved config -> our own class and the keys only it takes (beside
# DATA_KEYS' shared ones), looked up by name and never imported.
DATA_CLASSES: dict[str, tuple[type[MNISTDataModule], tuple[str, ...]]] = {
    "ae_lightning.data.MNISTDataModule": (MNISTDataModule, ()),
    "ae_lightning.data.NpzDataModule": (NpzDataModule, ("path", "test_size")),
    "ae_lightning.data.ImageFolderDataModule": (
        ImageFolderDataModule, ("path", "test_size", "image_size", "channels"),
    ),
}  # fmt: skip
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
    "path": str,  # data=npz, data=image_folder
    "test_size": int,
    "image_size": list,  # data=image_folder, checked by its class
    "channels": int,
}
OWN_KEYS = ("path", "test_size", "image_size", "channels")
STATUS_FILES = ("interrupted.json", "failed.json")


class UnsafeCheckpointError(UserError):
    """A checkpoint whose pickle asks to run code: refused, never a mere failed row."""


# --- bounded reading of files ---------------------------------------------------------------


def read_bytes(path: Path, limit: int = MAX_TEXT_BYTES, within: Path | None = None) -> bytes:
    """At most ``limit`` bytes of a regular file, else one sentence (``UserError``).

    ``/dev/zero``, FIFOs and, when ``within`` is given, links out of that folder are refused
    before a byte is read; ``FileNotFoundError`` passes through for callers with a default.
    """
    check_regular(path, within)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO swapped in: no hang
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UserError(
                f"{path} is not a regular file: replace it with the file train.py wrote."
            )
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(
            f"{path} is larger than {limit:,} bytes, far more than train.py writes: replace it "
            "with the file the run wrote, or remove the run from the command."
        )
    return data


def check_regular(path: Path, within: Path | None = None) -> None:
    """One sentence unless ``path`` is a regular file (inside ``within``, when given).

    Inside means where the file really is: a link anywhere on the way (``.hydra/`` itself a
    link out, not only the file's own name) counts, so the real path is compared.
    """
    os.lstat(path)  # FileNotFoundError passes through
    if within is not None:
        target, root = Path(os.path.realpath(path)), Path(os.path.realpath(within))
        if root not in target.parents:
            raise UserError(
                f"{path} leads to {target}, outside the run folder {within}: replace it "
                "with the file train.py wrote."
            )
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UserError(
            f"{path} is not a regular file (a device, pipe or folder): replace it with the "
            "file train.py wrote."
        )


class _BoundedLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (a few kB of them expand to gigabytes) or deep nests."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "holds a YAML alias (*name), which train.py never writes",
                self.peek_event().start_mark,
            )  # fmt: skip
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"is nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,
                )  # fmt: skip
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_yaml(path: Path, within: Path | None = None) -> Any:
    """A YAML file as plain data (safe types only), bounded in size, aliases and depth."""
    text = read_bytes(path, within=within)
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader subclass)
    except (yaml.YAMLError, ValueError, OverflowError) as err:  # 2024-13-45, 5000 digits
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UserError(
            f"{path} cannot be read as train.py's YAML ({problem}): restore the file the run "
            "wrote, or remove the run from the command."
        ) from None


_JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')


def read_json_file(path: Path, within: Path | None = None) -> Any:
    """A JSON file as plain data, bounded in size and depth (``ValueError`` if not JSON).

    Decoded as strict UTF-8 first (what train.py writes): ``json.loads`` of bytes would also
    take UTF-16 and UTF-32, whose brackets a byte-level depth scan does not see.
    """
    data = read_bytes(path, within=within)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"{path} is not UTF-8 text, as train.py writes its JSON: replace it with the file "
            "the run wrote."
        ) from None
    depth = deepest = 0
    for char in _JSON_STRING.sub("", text):  # brackets inside strings do not nest
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    if deepest > MAX_DEPTH:
        raise UserError(
            f"{path} is nested {deepest} levels deep, more than {MAX_DEPTH}: replace it with "
            "the file train.py wrote."
        )
    try:
        return json.loads(text)
    except RecursionError:  # a nest the scan did not count: still a refusal, not a crash
        raise UserError(
            f"{path} is nested too deep to read: replace it with the file train.py wrote."
        ) from None


# --- checkpoints ----------------------------------------------------------------------------


def load_checkpoint(path: Path | str, within: Path | None = None) -> dict[str, Any]:
    """A checkpoint's contents, refusing anything but tensors and plain data (one sentence).

    Bounded before anything inflates (``check_archive``) and checked by type and model size
    (``check_checkpoint``), so what comes back can be restored without a traceback. A path
    derived from a run folder passes that folder as ``within``: a link out is refused.
    """
    path = Path(path)
    try:
        check_regular(path, within)
    except FileNotFoundError:
        raise UserError(
            f"{path} does not exist: point at a .ckpt file in a run's checkpoints/ folder."
        ) from None
    check_archive(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):  # not a call to code: a foreign or damaged pickle
            raise UserError(_unreadable(path, err)) from None
        raise UnsafeCheckpointError(
            f"{path} asks to run code when loaded (it holds more than weights), so it was not "
            "loaded: use a checkpoint written by train.py, from a source you trust."
        ) from None
    except MemoryError:
        raise UserError(
            f"{path} needs more memory to load than this machine allows: load it on a larger "
            "machine, or use a smaller checkpoint."
        ) from None
    except Exception as err:  # OSError, EOFError, RuntimeError: a cut or corrupted file
        raise UserError(_unreadable(path, err)) from None
    check_checkpoint(checkpoint, path)
    return checkpoint


def checkpoint_limit() -> int:
    """Bytes a checkpoint may inflate to: weights and two Adam moments at the parameter limit."""
    return 3 * 4 * max_parameters() + CHECKPOINT_OVERHEAD_BYTES


def check_archive(path: Path) -> None:
    """One sentence if the checkpoint would inflate past ``checkpoint_limit()``.

    Reads only the zip's central directory (sizes as stored there), never a member's data;
    a non-zip (legacy) file is bounded by its size on disk.
    """
    limit = checkpoint_limit()
    fix = (
        f"use a checkpoint written by train.py, or raise the limit with "
        f"AE_MAX_PARAMETERS (now {max_parameters():,} parameters)"
    )
    if not zipfile.is_zipfile(path):
        if path.stat().st_size > limit:
            raise UserError(f"{path} is larger than {limit:,} bytes: {fix}.")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(_unreadable(path, err)) from None
    total = sum(m.file_size for m in members)
    if total > limit:
        raise UserError(
            f"{path} would inflate to {total:,} bytes, more than the limit of {limit:,}: {fix}."
        )
    for member in members:
        if member.file_size > MAX_RATIO * max(member.compress_size, 1) + 4096:
            ratio = member.file_size // max(member.compress_size, 1)
            raise UserError(
                f"{path} holds {member.filename[:80]}, compressed {ratio:,} to 1 (torch.save "
                "stores its tensors uncompressed): use a checkpoint written by train.py."
            )


def _unreadable(path: Path, err: Exception) -> str:
    return (
        f"{path} is not an ae-lightning checkpoint that can be read ({type(err).__name__}): "
        "it is truncated or corrupted; use another checkpoint of the run (e.g. "
        "checkpoints/best.ckpt) or retrain."
    )


PLAIN = (type(None), bool, int, float, str)
# Settings that multiply each step's memory (codes per image, codebook distances, prior
# components per code): far above the papers' 5000, 512 and 500, far below gigabytes a step.
PER_STEP_LIMITS = {"samples": 10_000, "codebook_size": 1 << 16, "pseudo_inputs": 1 << 16}
# Counters in the state Lightning writes for loops and callbacks: whole numbers only.
COUNTER_KEYS = {
    "ready", "started", "processed", "completed", "epoch", "minibatches", "wait_count",
    "stopped_epoch", "patience", "_batches_that_stepped",
}  # fmt: skip


def check_checkpoint(checkpoint: Any, path: Path) -> None:
    """The one check of a checkpoint's contents, by type, before anything is restored.

    ``epoch``/``global_step`` whole numbers, ``hyper_parameters`` a mapping of the model's own
    keys with plain values and a size within the limits, ``state_dict`` names -> finite
    tensors, ``loops``/``callbacks``/``optimizer_states``/``lr_schedulers`` shaped as
    Lightning writes them. Each refusal names the checkpoint and the key.
    """

    def refuse(key: str, value: Any, wanted: str) -> UserError:
        shown = repr(value) if isinstance(value, PLAIN) else type(value).__name__
        return UserError(
            f"{path} has {key}={shown[:80]}, not {wanted}: it was not written by train.py "
            "(or was damaged); use another checkpoint of the run or retrain."
        )

    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"{path} is not an ae-lightning checkpoint (no state_dict): point at a checkpoint "
            "written by train.py."
        )
    for key in ("epoch", "global_step"):
        value = checkpoint.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or not -1 <= value < SEED_LIMIT:
            raise refuse(key, value, "a whole number")
    family = checkpoint_family(checkpoint)
    model_class = family_class(family) if isinstance(family, str) else None
    if model_class is None:
        raise UserError(
            f"{path} holds an unknown model family {family!r}: this version of ae-lightning "
            f"knows {sorted(families())}; load it with the version that wrote it."
        )
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams, dict):
        raise refuse("hyper_parameters", hparams, "a mapping of model settings")
    known = set(init_parameters(model_class))
    for key, value in hparams.items():
        if key not in known:
            raise refuse(f"hyper_parameters.{key!s:.40}", value, f"one of {sorted(known)}")
        if key in ("hidden", "decoder_hidden"):
            if value is None and key == "decoder_hidden":
                continue
            if not isinstance(value, list | tuple) or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in value
            ):
                raise refuse(f"hyper_parameters.{key}", value, "a list of positive widths")
        elif key == "image_shape":
            if (
                not isinstance(value, list | tuple)
                or len(value) != 3
                or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_WIDTH
                    for d in value
                )
            ):
                raise refuse("hyper_parameters.image_shape", value, "a (C, H, W) image shape")
        elif key == "bottleneck":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise refuse("hyper_parameters.bottleneck", value, "a positive whole number")
        elif not isinstance(value, PLAIN):
            raise refuse(f"hyper_parameters.{key}", value, "a plain value")
    pixels = math.prod(hparams.get("image_shape", IMAGE_SHAPE))
    try:  # a family's own weights (pseudo-inputs, codebooks), counted before any is built
        extra = int(model_class.extra_parameters(hparams.get("bottleneck", 2), hparams, pixels))
    except (TypeError, ValueError, OverflowError):
        raise UserError(
            f"{path} holds a model setting of the wrong type for a {model_class.family} model: "
            "point at a checkpoint written by train.py."
        ) from None
    check_model_size(
        hparams.get("bottleneck", 2), list(hparams.get("hidden") or []),
        hparams.get("decoder_hidden"), pixels, str(path),
        code_outputs=model_class.code_outputs, extra_parameters=extra,
    )  # fmt: skip
    for key, limit in PER_STEP_LIMITS.items():
        value = hparams.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise UserError(
                f"{path} has hyper_parameters.{key}={value:,}, more than {limit:,}: it "
                "multiplies each step's memory far past what any run needs; use a checkpoint "
                "written by train.py."
            )
    weights = checkpoint["state_dict"]
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise refuse("state_dict", weights, "a mapping of names to tensors")
    unsound = _unsound_tensor(checkpoint, "checkpoint")
    if unsound is not None:
        raise refuse(*unsound, "a plain tensor (contiguous, real, held whole by its storage)")
    sizes = [t.numel() for t in weights.values()]
    if sum(sizes) > max_parameters():
        raise UserError(
            f"{path} holds {sum(sizes):,} weights, more than the limit of {max_parameters():,} "
            f"parameters: use a checkpoint written by train.py, or raise the limit with "
            f"AE_MAX_PARAMETERS."
        )
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"{path} holds non-finite weights (NaN or inf in {name}): the run diverged "
                f"before it was saved; use {_other_checkpoint(path)} or retrain with a smaller "
                "model.optimizer.lr."
            )
    for key, outer, inner in (
        ("loops", dict, dict), ("callbacks", dict, dict),
        ("optimizer_states", list, dict), ("lr_schedulers", list, dict),
    ):  # fmt: skip
        value = checkpoint.get(key, outer())
        items = value.values() if isinstance(value, dict) else value
        if not isinstance(value, outer) or not all(isinstance(v, inner) for v in items):
            kind = "a mapping of" if outer is dict else "a list of"
            raise refuse(key, value, f"{kind} mappings as Lightning writes them")
        bad = _bad_counter(value, key) if key in ("loops", "callbacks") else None
        if bad is not None:
            raise refuse(*bad, "a whole number from 0 to 2**63-1")


def _bad_counter(node: Any, where: str, depth: int = 0) -> tuple[str, Any] | None:
    """The first counter (``COUNTER_KEYS``) under ``node`` that is not a whole number."""
    if depth > MAX_DEPTH:
        return where, node
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            if key in COUNTER_KEYS and not _is_whole(value):
                return here, value
            found = _bad_counter(value, here, depth + 1)
            if found is not None:
                return found
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            found = _bad_counter(value, f"{where}[{i}]", depth + 1)
            if found is not None:
                return found
    return None


def _is_whole(value: Any) -> bool:
    """A counter as Lightning writes it: a whole number from 0 to 2**63 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT


def _unsound_tensor(node: Any, where: str, depth: int = 0) -> tuple[str, Any] | None:
    """The first tensor under ``node`` that is not what ``torch.save`` writes of a weight.

    Anything touching a stride-0 view's values (``isfinite``, a copy) allocates all it
    declares: such a tensor, a sparse or complex one, or one its storage does not cover
    (``sound_tensor``) is refused before any value is read; so are more elements in all than
    weights and moments at the parameter limit.
    """
    limit = 4 * max_parameters() + CHECKPOINT_OVERHEAD_BYTES // 4  # weights, moments, steps
    seen = 0
    stack = [(node, where, depth)]
    while stack:
        item, here, level = stack.pop()
        if level > MAX_DEPTH:
            return here, item
        if isinstance(item, dict):
            stack += [(v, f"{here}.{k!s:.40}", level + 1) for k, v in item.items()]
        elif isinstance(item, list | tuple):
            stack += [(v, f"{here}[{i}]", level + 1) for i, v in enumerate(item)]
        elif isinstance(item, torch.Tensor):
            if not sound_tensor(item):
                return here, item
            seen += item.numel()
            if seen > limit:
                return here, item
    return None


def _other_checkpoint(path: Path) -> str:
    """The run's other checkpoint, to suggest in place of a bad one."""
    other = {"best.ckpt": "last.ckpt", "last.ckpt": "best.ckpt"}.get(path.name)
    return f"checkpoints/{other} if it is sound" if other else "another checkpoint of the run"


def load_autoencoder(
    path: Path | str, map_location: torch.device | str = "cpu", within: Path | None = None
) -> Autoencoder:
    """The model of a checkpoint (on the CPU by default), in eval mode, without running code.

    The class comes from the checkpoint's ``model_family`` among this package's own models;
    ``within``: the run folder the path was derived from (``load_checkpoint``).
    """
    checkpoint = load_checkpoint(path, within)  # the one-sentence refusals
    family = checkpoint_family(checkpoint)
    model_class = family_class(family)  # looked up among our classes, never imported
    if model_class is None:
        raise UserError(
            f"{path} holds an unknown model family {family!r}: this version of ae-lightning "
            f"knows {sorted(families())}; load it with the version that wrote it."
        )
    try:
        model = model_class.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    except UserError as err:  # the model's own sentence about a setting (dropout=5.0)
        raise UserError(f"{path}: {err}") from None
    except Exception as err:
        raise UserError(
            f"{path} is not an ae-lightning checkpoint ({type(err).__name__}): point at a "
            "checkpoint written by train.py."
        ) from None
    return model.eval()


# --- the saved config -----------------------------------------------------------------------


def read_config(run: Path, name: str = "config.yaml") -> dict[str, Any]:
    """The run's saved ``.hydra/<name>`` as plain data (bounded YAML: no tags, no code)."""
    path = run / ".hydra" / name
    try:
        config = read_yaml(path, within=run)
    except OSError as err:
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


def is_interpolation(value: Any) -> bool:
    """``${...}``: a reference (to the environment, to Hydra) that is never resolved here."""
    return isinstance(value, str) and "${" in value


def plain_values(node: Any) -> Any:
    """``node`` with every interpolation string and every value of another type than
    str/int/float/bool/None/list/dict (a YAML date, ``!!set``, ``!!binary``) removed: what a
    received config says itself, in types ``OmegaConf.create`` takes."""
    if isinstance(node, dict):
        return {
            k: plain_values(v) for k, v in node.items()
            if isinstance(k, str | int) and _kept(v)
        }  # fmt: skip
    if isinstance(node, list):
        return [plain_values(v) for v in node if _kept(v)]
    return node


def _kept(value: Any) -> bool:
    return isinstance(value, (*PLAIN, list, dict)) and not is_interpolation(value)


SEED_LIMIT = 2**63  # torch.Generator().manual_seed takes a 64-bit seed


def data_settings(run: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's data settings: known keys with plain values; interpolations count as absent.

    Never resolved: ``${oc.env:...}`` in a received file would read this machine's
    environment. Refuses (one sentence) a data section that names any other class or
    function to build.
    """
    config = read_config(run) if config is None else config
    data = config.get("data")
    path = run / ".hydra" / "config.yaml"
    if not isinstance(data, dict):
        raise UserError(f"{path} has no data section: remove {run} from the command.")
    extra = [t for t in _targets(data, "data") if t != "data._target_"]
    target = data.get("_target_", DATA_TARGET)
    if not isinstance(target, str) or target not in DATA_CLASSES or extra:
        where = extra[0] if extra else "data._target_"
        node = data
        for part in where.split(".")[1:-1]:  # the node holding the offending _target_
            node = node.get(part) if isinstance(node, dict) else None
        target = node.get("_target_") if isinstance(node, dict) else "code"
        shown = "an interpolation" if is_interpolation(target) else repr(target)[:80]
        raise UserError(
            f"{path} asks to build code at {where} ({shown}); ae-lightning reads run folders "
            f"as data only: remove {run} from the command, it was not written by train.py."
        )
    settings = {}
    for key, kind in DATA_KEYS.items():
        value = data.get(key)
        if value is None or is_interpolation(value):
            continue  # the default: a reference is never resolved from a received file
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(
                f"{path} has data.{key}={repr(value)[:80]}, not a {kind.__name__}: remove "
                f"{run} from the command or fix that value."
            )
        if kind is int and not 0 <= value < SEED_LIMIT:
            raise UserError(
                f"{path} has data.{key}={value}, outside 0 to 2**63-1: remove {run} from the "
                "command or fix that value."
            )
        settings[key] = value
    return settings


def data_module(run: Path, data_root: str | None = None) -> MNISTDataModule:
    """Our own data module with the run's data settings (never the file's own ``_target_``).

    A received file never names the place this machine reads: the MNIST root is
    ``data_root`` (the folder the caller named), else this shell's ``AE_DATA_ROOT``, else
    ``./data``, whatever the file says; an npz file or image folder is re-derived
    (``data_path``).
    """
    config = read_config(run)
    settings = data_settings(run, config)
    settings.pop("root", None)  # the sender's machine's folder, not ours
    if data_root is not None:
        settings["root"] = data_root
    elif os.environ.get("AE_DATA_ROOT"):
        settings["root"] = os.environ["AE_DATA_ROOT"]
    data_class, own = DATA_CLASSES[config["data"].get("_target_", DATA_TARGET)]
    for key in OWN_KEYS:  # each class takes its own of these, and no other's
        if key not in own:
            settings.pop(key, None)
    if "path" in own:
        settings["path"] = data_path(run, settings.get("path", ""), data_root)
    return data_class(**settings, download=False)


def data_path(run: Path, saved: str, data_root: str | None) -> str:
    """Where a run's npz file or image folder is read: never where its config says.

    With ``data_root`` (the folder the user named): the saved path's last name inside it.
    Without: the saved path only where it lies inside the run folder. Else one sentence.
    """
    name = Path(saved).name
    if data_root is not None and name not in ("", ".", ".."):
        return str(Path(data_root) / name)
    target = Path(os.path.realpath(run / saved)) if saved else None
    if target is not None and Path(os.path.realpath(run)) in target.parents:
        return str(target)
    raise UserError(
        f"{run / '.hydra' / 'config.yaml'} names data.path={saved[:200]!r}, outside the run "
        f"folder {run}, and a received run does not choose what this machine reads: pass the "
        f"folder that holds {name or 'the data'} yourself (ae-compare --data-root DIR, "
        "load_run(..., data_root=DIR))."
    )


# --- metrics and status ---------------------------------------------------------------------


def read_json(path: Path, within: Path | None = None) -> dict[str, Any]:
    """A JSON object from a run folder; ``{}`` when absent or not an object.

    Too large, too deep, not a regular file or a link out of ``within``: one sentence.
    """
    try:
        payload = read_json_file(path, within=within or path.parent)
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        return {}
    return payload if isinstance(payload, dict) else {}


TEXT_METRICS = {"family", "dataset", "recipe", "test_checkpoint"}
LIST_METRICS = {"epoch_times_s"}
ROW_METRICS = {"history"}  # lists of {name: number} rows, one per epoch


def metrics(run: Path) -> dict[str, Any]:
    """The final metrics (``metrics.json``): numbers, a few words, lists of numbers.

    A value of another type (``test/mse: "abc"``) is refused in one sentence: the summary
    sorts and formats these numbers.
    """
    path = run / "metrics.json"
    found = {}
    for key, value in read_json(path, within=run).items():
        if value is None:
            continue  # not measured
        if key in TEXT_METRICS:
            ok = isinstance(value, str)
        elif key in LIST_METRICS:
            ok = isinstance(value, list) and all(_is_number(v) for v in value)
        elif key in ROW_METRICS:
            ok = isinstance(value, list) and all(
                isinstance(row, dict) and all(_is_number(v) for v in row.values()) for row in value
            )
        else:
            ok = _is_number(value)
        if not ok:
            raise UserError(
                f"{path} has {key!s:.60}={repr(value)[:80]}, not "
                f"{'text' if key in TEXT_METRICS else 'numbers'}: remove {run} from the "
                "command or restore the metrics.json the run wrote."
            )
        found[key] = value
    return found


def knobs(run: Path) -> dict[str, Any]:
    """The run's HParams knobs (``hparams.yaml``, written by the logger): plain values only.

    A missing or unreadable file is no knobs, not a refused run: the knobs only choose which
    HParams columns a sweep shows.
    """
    path = run / "hparams.yaml"
    if not path.is_file():
        return {}
    try:
        found = read_yaml(path, within=run)
    except UserError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {
        str(key): value
        for key, value in found.items()
        if isinstance(value, (str, bool, int, float))
    }


def _is_number(value: Any) -> bool:
    """A finite int or float that a float holds (a 400-digit int overflows the summary)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def status(run: Path) -> tuple[str, str]:
    """``(status, error)``: ``interrupted`` or ``failed`` from their files, else ``("", "")``."""
    for name in STATUS_FILES:
        payload = read_json(run / name, within=run)
        if payload:
            state = str(payload.get("status", name.split(".")[0]))[:200]
            detail = payload.get("error") or payload.get("resume") or state
            return state, str(detail)[:2000]
    return "", ""


def choose_checkpoint(run: Path) -> Path | None:
    """``checkpoints/best.ckpt``, else ``last.ckpt``, else None; a link out is refused."""
    for name in ("best.ckpt", "last.ckpt"):
        path = run / "checkpoints" / name
        if path.is_file():
            check_regular(path, within=run)
            return path
    return None


# --- a run folder as a whole: the API's and the comparison's view -------------------------


@dataclass
class RunFiles:
    """Where a run's pieces are: its folder (None for a lone .ckpt) and the checkpoint."""

    folder: Path | None
    checkpoint: Path


def find_files(path: Path, checkpoint: str) -> RunFiles:
    """A run folder, a sweep job folder or a .ckpt file -> the checkpoint to load."""
    if checkpoint not in ("best", "last"):
        raise UserError(f"checkpoint={checkpoint!r} is not a choice: use 'best' or 'last'.")
    if path.is_file():
        if path.suffix != ".ckpt":
            raise UserError(f"{path} is not a .ckpt file: pass a run folder or a checkpoint.")
        folder = path.parent.parent if path.parent.name == "checkpoints" else None
        return RunFiles(folder, path)
    if not path.is_dir():
        raise UserError(f"{path} does not exist: pass a run folder such as logs/runs/<run>.")
    folder = path / "checkpoints"
    order = ("best.ckpt", "last.ckpt") if checkpoint == "best" else ("last.ckpt", "best.ckpt")
    for name in order:
        if (folder / name).is_file():
            check_regular(folder / name, within=path)  # found in the folder named: stays there
            return RunFiles(path, folder / name)
    jobs = sorted(p.name for p in path.iterdir() if (p / "checkpoints").is_dir())
    if jobs:
        raise UserError(
            f"{path} is a sweep with {len(jobs)} jobs, not one run: pass one job folder, "
            f"e.g. {path / jobs[0]}."
        )
    raise UserError(
        f"{path} has no checkpoints/best.ckpt or last.ckpt: pass a run folder that finished "
        "at least one epoch."
    )


def saved_config(folder: Path | None) -> dict[str, Any]:
    """The run's saved config, plain values only: the resolved copy if written, else config.yaml.

    Interpolations left in the file are dropped, never resolved (``plain_values``).
    """
    if folder is None:
        return {}
    for name in ("config_resolved.yaml", "config.yaml"):
        if (folder / ".hydra" / name).is_file():
            return plain_values(read_config(folder, name))
    return {}


def training_settings(checkpoint: Path) -> dict[str, Any]:
    """How the run that wrote ``checkpoint`` trained it, for an evaluation to report: the
    optimiser's and schedule's class names, lr and weight decay, the batch size, epochs and
    seed of that run's saved config, each kept only if of its type. Empty for a checkpoint
    outside a run's ``checkpoints/`` folder or beside an unreadable config."""
    folder = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
    try:
        config = saved_config(folder)
    except UserError as err:  # the evaluation goes on; only its recipe is unknown
        log.warning("%s The recipe of %s is recorded as unknown.", err, checkpoint)
        return {}

    def node(*keys: str) -> dict[str, Any]:
        found: Any = config
        for key in keys:
            found = found.get(key) if isinstance(found, dict) else None
        return found if isinstance(found, dict) else {}

    def number(value: Any, kind: type | tuple[type, ...]) -> bool:  # finite, a float holds it
        return isinstance(value, kind) and _is_number(value)

    model: dict[str, Any] = {}
    for part in ("optimizer", "scheduler"):
        kept = {k: v for k, v in node("model", part).items()
                if (k == "_target_" and isinstance(v, str))
                or (k in ("lr", "weight_decay") and number(v, (int, float)))}  # fmt: skip
        if kept:
            model[part] = kept
    settings: dict[str, Any] = {"model": model} if model else {}
    for group, key in (("data", "batch_size"), ("trainer", "max_epochs")):
        if number(node(group).get(key), int):
            settings[group] = {key: node(group)[key]}
    if number(config.get("seed"), int):
        settings["seed"] = config["seed"]
    return settings


def saved_data_settings(folder: Path | None) -> dict[str, Any]:
    """The run's known data settings (``data_settings``); defaults for a lone .ckpt."""
    if folder is None or not (folder / ".hydra" / "config.yaml").is_file():
        return {}
    return data_settings(folder)


def saved_data_module(folder: Path | None, data_root: str | None = None) -> MNISTDataModule:
    """The run's own data module (``data_module``); MNIST's defaults for a lone .ckpt."""
    if folder is None or not (folder / ".hydra" / "config.yaml").is_file():
        root = data_root if data_root is not None else os.environ.get("AE_DATA_ROOT")
        return MNISTDataModule(download=False, **({} if root is None else {"root": root}))
    return data_module(folder, data_root)


@dataclass
class RunRecord:
    """One run folder as a comparison sees it: overrides, metrics, best checkpoint, problems."""

    path: Path
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    error: str = ""
    label: str = ""
    status: str = ""  # "interrupted" or "failed" from the folder's own files
    knobs: dict[str, Any] = field(default_factory=dict)  # its HParams row (hparams.yaml)

    @property
    def ok(self) -> bool:
        return self.checkpoint is not None and not self.error


def is_run(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders among ``paths``: each one itself, or a sweep's job folders in job order."""
    runs = []
    for path in paths:
        if is_run(path):
            runs.append(path)
            continue
        jobs = [p for p in path.iterdir() if p.is_dir() and is_run(p)] if path.is_dir() else []
        runs.extend(sorted(jobs, key=lambda p: (job_number(p), p.name)))
    if not runs:
        shown = ", ".join(str(p) for p in paths)
        raise UserError(
            f"No run folders (with .hydra/config.yaml) in {shown}: pass run folders from "
            "logs/runs/ or a sweep folder from logs/multiruns/."
        )
    return runs


def job_number(path: Path) -> int:
    """The job's number in its sweep (folders are named by what varies, not by number)."""
    try:
        saved = read_yaml(path / ".hydra" / "hydra.yaml", within=path)
        return int(saved["hydra"]["job"]["num"])
    except Exception:  # a hand-made or older run folder: after the numbered ones
        head = path.name.split("_", 1)[0]
        return int(head) if head.isdigit() else 1 << 30


def read_run(path: Path) -> RunRecord:
    """Overrides, metrics and best checkpoint of a run, read as data; problems become ``error``.

    A run folder whose saved config asks to build code, or whose files exceed the bounds, is
    refused (``UserError``).
    """
    run = RunRecord(path)
    data_settings(path)  # refuses a data section that names code to build
    overrides_file = path / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        overrides = read_yaml(overrides_file, within=path) or []
        run.overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    run.metrics = metrics(path)
    run.knobs = knobs(path)
    run.status, run.error = status(path)
    run.checkpoint = choose_checkpoint(path)
    if run.checkpoint is None:
        run.error = run.error or "no checkpoint (the run did not finish an epoch)"
    return run
