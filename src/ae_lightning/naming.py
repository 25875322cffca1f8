"""Run-folder names: short, readable, valid on any file system, and pasteable into ``resume=``.

A sweep job's folder is named by the overrides that vary across the sweep, in short words
(``model=linear bottleneck=2`` -> ``linear,z=2``), so TensorBoard, which names a run by its
folder, shows just that; ``ae-compare`` names runs the same way. A single run's folder is
its start time plus its overrides. Names longer than the cap keep their start and end in a
short hash; the full overrides stay in ``.hydra/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ae_lightning.atomic import check_run_to_resume, write_atomic
from ae_lightning.errors import UserError

NAME_LIMIT = 40
SWEEP_RECORD = "sweep.json"
# Overrides that say where things are, not what was trained.
LOCATION_KEYS = (
    "ckpt_path", "resume", "run_dir", "data.root", "data.download", "trainer.accelerator",
    "trainer.devices",
)  # fmt: skip
# Never part of a folder's name: the locations, and what a sweep's folder already says.
NOT_IN_NAMES = (*LOCATION_KEYS, "hparams_search", "experiment")
# Hydra parses these keys' values as paths: quoted for it, so a folder pastes back as printed.
PATH_KEYS = ("resume", "ckpt_path")
_UNSAFE_IN_VALUE = re.compile(r"[^A-Za-z0-9._+-]+")  # `=` and `,` separate the pairs


def override_pairs(overrides: Iterable[str]) -> list[tuple[str, str]]:
    """``["+a.b=[64, 32]", "c=1"]`` -> ``[("a.b", "[64, 32]"), ("c", "1")]``; deletions dropped."""
    pairs = []
    for override in overrides:
        key, sep, value = str(override).partition("=")
        if sep and not key.startswith("~"):
            pairs.append((key.lstrip("+"), value))
    return pairs


def _safe_value(value: str) -> str:
    """``[64, 32]`` -> ``64-32``, ``/a/b`` -> ``a-b``: no character a shell or Hydra trips on.

    Only the unsafe runs become ``-``: the value's own signs stay (``-1``, ``[-1, 2]`` ->
    ``-1-2``), so a folder never names a value other than the one the run used.
    """
    return "-".join(part for part in _UNSAFE_IN_VALUE.split(value) if part) or "none"


# Short words for the common knobs, so a name fits TensorBoard's run labels: ``linear,z=2``.
# ``""``: the value alone (a model config's name says what it is). Other keys are named by
# their last part (``model.beta`` -> ``beta``) unless two of a name's keys share it.
KEY_WORDS = {
    "model": "", "data": "", "bottleneck": "z", "model.optimizer.lr": "lr",
    "model.optimizer.weight_decay": "wd", "data.batch_size": "batch",
    "trainer.max_epochs": "epochs",
}  # fmt: skip
FILE_KEYS = ("data.path",)  # named by the file's own name: `path=faces.npz`


def _name_items(pairs: Sequence[tuple[str, str]]) -> list[str]:
    keys = [KEY_WORDS.get(key, key.rsplit(".", 1)[-1]) for key, _ in pairs]
    items = []
    for (key, value), word in zip(pairs, keys, strict=True):
        if key not in KEY_WORDS and keys.count(word) > 1:
            word = key  # `model.beta` and `data.beta`: the full keys tell them apart
        if key in FILE_KEYS:
            value = value.rstrip("/").rsplit("/", 1)[-1]  # the file's name says which data
        items.append(f"{word}={_safe_value(value)}" if word else _safe_value(value))
    return items


def display_name(pairs: Sequence[tuple[str, str]]) -> str:
    """``linear,z=2`` for ``model=linear bottleneck=2``: how runs are named everywhere."""
    return ",".join(_name_items(pairs))


def short_name(pairs: Sequence[tuple[str, str]], limit: int = NAME_LIMIT) -> str:
    """``display_name``; past ``limit`` characters, cut and ended by a hash."""
    items = _name_items(pairs)
    name = ",".join(items)
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    room, kept = limit - len(digest) - 1, ""
    for item in items:  # whole pairs while they fit, so no value is cut in the middle
        if len(kept) + len(item) + 1 > room:
            break
        kept = f"{kept},{item}" if kept else item
    return f"{kept or items[0][:room]}+{digest}"


def command_line_value(args: Iterable[str], key: str) -> str | None:
    """The value Hydra will give ``key``: the last ``key=``/``+key=``/``++key=`` of ``args``,
    unquoted. None when absent, empty or ``null`` (Hydra's keyword, in any case; a quoted
    ``'null'`` is the word itself). The checks that must run before Hydra read it here."""
    given = [value.strip() for name, value in override_pairs(args) if name == key]
    if not given or given[-1].lower() == "null":
        return None
    return given[-1].strip("'\"") or None


def named_pairs(
    overrides: Iterable[str],
    keys: Iterable[str] | None = None,
    left_out: tuple[str, ...] = NOT_IN_NAMES,
) -> list[tuple[str, str]]:
    """The pairs worth a name: those of ``keys`` (all by default), none of ``left_out``.

    A key given twice (``bottleneck=3 ... bottleneck=5``, an edited shell history) is named
    once, by its last value: the one Hydra applies, so the folder names what the run trained.
    """
    wanted = None if keys is None else set(keys)
    last: dict[str, str] = {}
    for key, value in override_pairs(overrides):
        if not key.startswith(left_out) and (wanted is None or key in wanted):
            last.pop(key, None)  # where it was last given, as the run's config has it
            last[key] = value
    return list(last.items())


def varying_keys(overrides: Iterable[str], sweeper_params: Any = None) -> list[str]:
    """Keys a sweep varies: command-line lists and ranges, then the sweeper's own params."""
    parser = OverridesParser.create()
    keys = [
        o.get_key_element().lstrip("+")
        for o in parser.parse_overrides([str(x) for x in overrides])
        if o.is_sweep_override()
    ]
    keys += [str(k) for k in (sweeper_params or {}) if str(k) not in keys]
    return keys


def record_sweep(config: DictConfig) -> list[str]:
    """Write ``<sweep>/sweep.json`` (the varying keys) for the jobs to name themselves by."""
    overrides = list(config.hydra.overrides.task)
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    keys = varying_keys(overrides, params)
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    payload = {"varying": keys, "overrides": [str(o) for o in overrides]}
    write_atomic(sweep_dir / SWEEP_RECORD, (json.dumps(payload, indent=2) + "\n").encode())
    return keys


def read_varying(sweep_dir: Path | str) -> list[str] | None:
    """The varying keys ``record_sweep`` wrote, or None (an old sweep, or no callback)."""
    try:
        return list(json.loads((Path(sweep_dir) / SWEEP_RECORD).read_text())["varying"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


_job_names: dict[tuple[str, int], str] = {}


def job_dirname(sweep_dir: str, job_num: int, overrides: Sequence[str]) -> str:
    """A sweep job's folder: its values of the varying keys (``job3`` if nothing varies).

    Two jobs with the same values (a repeated seed, an optimiser revisiting a point) get
    ``,job=N`` on the second name; the name is fixed once chosen, however often it resolves.
    """
    key = (str(sweep_dir), int(job_num))
    if key not in _job_names:
        base = short_name(named_pairs(overrides, read_varying(sweep_dir))) or f"job{job_num}"
        name, taken = base, 0
        while (Path(sweep_dir) / name).exists():  # never another job's folder
            taken += 1
            name = f"{base},job={job_num}" + (f".{taken}" if taken > 1 else "")
        _job_names[key] = name
    return _job_names[key]


_START_OF_NAME = re.compile(r"^\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d+_?")  # a run folder's start time
_CAPPED_END = re.compile(r"\+[0-9a-f]{8}$")  # what short_name ends a cut name with


def checkpoint_source(overrides: Iterable[str]) -> str | None:
    """The run a ``ckpt_path=`` checkpoint came from, by its folder's name less its start
    time (``hidden1024,lr=0.002``), else the file's own name; None without one."""
    value = command_line_value(overrides, "ckpt_path")
    if value is None:
        return None
    path = Path(value)
    if path.parent.name == "checkpoints":
        folder = path.parent.parent.name
        # its words, less the start time and the hash of a capped name: room for this run's
        return _CAPPED_END.sub("", _START_OF_NAME.sub("", folder)) or folder
    return path.stem or None


def run_suffix(overrides: Sequence[str]) -> str:
    """``_bottleneck=10,model=hidden1024`` after a single run's start time (or nothing); a
    run from a checkpoint (an evaluation, a fine-tune) first names where its weights came
    from (``from=hidden1024-z-10``), so TensorBoard and ae-compare tell it apart."""
    pairs = named_pairs(overrides)
    source = checkpoint_source(overrides)
    name = short_name([("from", source), *pairs] if source else pairs)
    return f"_{name}" if name else ""


def quote_path_overrides(argv: Sequence[str]) -> list[str]:
    """Quote ``resume=``/``ckpt_path=`` values for Hydra, so any folder pastes back as printed.

    Hydra's grammar reads ``=``, ``,`` and brackets in a value as syntax; a path is a string.
    """
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        needs_quotes = (
            sep and key.lstrip("+") in PATH_KEYS and value not in ("", "null")
            and value[0] not in "'\"" and re.search(r"[^A-Za-z0-9_./:+@%-]", value)
        )  # fmt: skip
        if needs_quotes:
            escaped = value.replace("'", "\\'")
            arg = f"{key}='{escaped}'"
        quoted.append(arg)
    return quoted


def _job_dirname_resolver(*, _root_: DictConfig) -> str:
    hydra = _root_.hydra
    return job_dirname(hydra.sweep.dir, hydra.job.num, list(hydra.overrides.task))


def _run_suffix_resolver(*, _root_: DictConfig) -> str:
    return run_suffix(list(_root_.hydra.overrides.task))


def _resume_or(resume: str | None, default: str, resumed: str | None = None) -> str:
    """``${ae_resume_or:${resume},A[,B]}``: A normally; when resuming, the folder (or B)."""
    if resume is None:
        return default
    try:  # again here: a config file's resume= never passed the command line's check
        check_run_to_resume(resume)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)  # before Hydra creates the folder or writes train.log into it
    return resumed if resumed is not None else str(resume)


# Every resolver the configs use, registered once, here: Hydra resolves the run folder's
# name before any heavy module is imported.
# `${ae_pid:}` in run folder names keeps runs that start in the same second apart.
OmegaConf.register_new_resolver("ae_pid", lambda: str(os.getpid()), use_cache=True, replace=True)
OmegaConf.register_new_resolver("ae_job_dirname", _job_dirname_resolver, replace=True)
OmegaConf.register_new_resolver("ae_run_suffix", _run_suffix_resolver, replace=True)
OmegaConf.register_new_resolver("ae_resume_or", _resume_or, replace=True)
