"""Console entry points (``ae-train``, ``ae-eval``) and what every run's console shares.

Kept apart from the library: the warning and log filters below are installed here, by the
entry points, never on ``import ae_lightning``.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from ae_lightning.atomic import check_run_to_resume, write_atomic
from ae_lightning.errors import UserError
from ae_lightning.extras import check_command_line
from ae_lightning.interrupts import INTERRUPTED
from ae_lightning.naming import command_line_value

# Third-party noise on every run that tells the user nothing about their run.
NOISY_WARNINGS = (
    # torch 2.14 deprecates a pytree class that Lightning 2.6 still checks against.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
# Lightning's adverts for its cloud products ("💡 Tip: ... litlogger / litmodels").
METRICS_READ_LIMIT = 1 << 20  # a finished run's metrics.json is a few kB
NOISY_LOG_LINES = ("💡 Tip", "litlogger", "litmodels")
LIGHTNING_PACKAGES = ("pytorch_lightning", "lightning_fabric")
LIGHTNING_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in NOISY_LOG_LINES)


def quiet_console() -> None:
    """Hide the tips and deprecation warnings of third-party libraries on a normal run."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    _lightning_lines_on_stderr()


def _lightning_lines_on_stderr() -> None:
    """Lightning's own lines (devices, checkpoint restores) plainly on the console.

    Lightning sets this up itself when it is imported before anything configures logging;
    the entry points now import it only once Hydra has configured logging, so they set it
    up first, the same way. Inside a run, Hydra's job-logging config (conf/hydra/
    job_logging) replaces these handlers so Lightning's lines reach train.log as well.
    """
    if logging.getLogger().hasHandlers():
        return
    for name in LIGHTNING_PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
        logger.propagate = False


def check_extras() -> None:
    """Exit 2 with one sentence if the command line asks for a feature of a missing extra."""
    try:
        check_command_line(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def ensure_writable_logs(argv: list[str] | None = None) -> None:
    """Exit with one sentence if the logs folder cannot be written, before Hydra tries to.

    Checks ``AE_LOGS_DIR`` (or ``logs/``) and any plain ``hydra.run.dir=``/``hydra.sweep.dir=``
    on the command line, read as Hydra reads it (quotes removed). Creates nothing: the
    nearest existing folder above is tried with a temporary file.
    """
    logs = Path(os.environ.get("AE_LOGS_DIR", "logs"))
    folders = [(logs, f"the logs folder {logs}", LOGS_FIX)]
    for arg in sys.argv[1:] if argv is None else argv:
        key, _, raw = arg.partition("=")
        key = key.lstrip("+")
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or not raw or "${" in raw:
            continue
        try:
            value = OverridesParser.create().parse_override(arg).value()
        except HydraException:  # its grammar: e.g. a letter beyond ASCII, unquoted
            _exit_bad_input(
                f"{key}={raw} has characters Hydra cannot read unquoted: quote the folder, "
                f"e.g. '{key}=\"{raw}\"'."
            )
        folders.append((Path(str(value)), f"{key}={value}", f"point {key} at a writable folder"))
    for folder, name, fix in folders:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            with tempfile.NamedTemporaryFile(dir=existing):
                pass
        except OSError as err:
            reason = err.strerror or type(err).__name__
            _exit_bad_input(f"{name} cannot be written ({reason}): {fix}.")


def _exit_bad_input(sentence: str) -> None:
    print(f"error: {sentence}", file=sys.stderr)
    sys.exit(2)


SWEEP_GROUPS = ("experiment", "hparams_search")  # config groups whose options may be sweeps


def refuse_sweep_without_multirun(argv: list[str] | None = None) -> None:
    """Exit 2 if a sweep's config (``experiment=reference``, ``hparams_search=optuna``: they
    set ``hydra.sweeper``) is named without ``-m``: Hydra would run one default job instead,
    silently, under a folder name that does not even say which experiment."""
    from importlib.resources import files

    import yaml

    args = sys.argv[1:] if argv is None else argv
    runs_nothing = ("-c", "--cfg", "-i", "--info", "-sc", "--shell-completion", "-p", "--package")
    if any(arg in ("-m", "--multirun", *runs_nothing) for arg in args):
        return  # a sweep, or Hydra only printing (--cfg job shows the sweep's config)
    for arg in args:
        group, _, name = arg.lstrip("+").partition("=")
        name = name.strip().strip("'\"")
        if group not in SWEEP_GROUPS or not name.isidentifier():
            continue
        option = files("ae_lightning.conf") / group / f"{name}.yaml"
        try:
            config = yaml.safe_load(option.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # not one of ours: Hydra names the bad choice in its own words
        if isinstance(config, dict) and (config.get("hydra") or {}).get("sweeper"):
            _exit_bad_input(
                f"{arg} is a sweep (it sets hydra.sweeper): run it with -m, as in "
                f"python train.py -m {arg}."
            )


def refuse_eval_resume(argv: list[str] | None = None) -> None:
    """``eval.py ... resume=<run>``: exit 2, or the test would write its metrics.json, config
    and log into that training run's folder, over the training's own."""
    run = command_line_value(sys.argv[1:] if argv is None else argv, "resume")
    if run is not None:
        _exit_bad_input(
            f"resume={run} continues a training run, which eval.py does not: it tests a "
            f"checkpoint in a new folder; use ckpt_path={Path(run) / 'checkpoints' / 'best.ckpt'}."
        )


def refuse_a_used_run_folder(argv: list[str] | None = None) -> None:
    """``hydra.run.dir=`` a folder that already holds a run: exit 2 before Hydra writes its
    config and log there and the run replaces the other's checkpoints and metrics."""
    args = sys.argv[1:] if argv is None else argv
    folder = command_line_value(args, "hydra.run.dir")
    if folder is None or "${" in folder or command_line_value(args, "resume") is not None:
        return  # resume= continues a run in place: its own checks apply
    used = [name for name in ("metrics.json", "checkpoints") if (Path(folder) / name).exists()]
    if used:
        _exit_bad_input(
            f"hydra.run.dir={folder} already holds a run ({' and '.join(used)}): choose a new "
            f"folder, or continue that run with resume={folder}."
        )


def refuse_bad_resume(argv: list[str] | None = None) -> None:
    """Exit 2 with one sentence if ``resume=`` is not a run folder to continue (missing, a
    checkpoint file, a folder with no ``checkpoints/last.ckpt``) or holds a link out.

    Hydra creates the folder and writes ``.hydra-resumed/`` and ``train.log`` into it before
    any task code runs, so this reads ``resume=`` off the command line itself.
    """
    run = command_line_value(sys.argv[1:] if argv is None else argv, "resume")
    if run is None:
        return
    try:
        if "${" in run:  # Hydra would resolve it to a folder this walk never saw
            raise UserError(
                f"resume={run} is an interpolation, and the folder it names cannot be "
                "checked before Hydra writes into it: write the folder itself "
                "(resume=/path/to/run)."
            )
        check_run_to_resume(run)
    except UserError as err:
        _exit_bad_input(str(err))


def refuse_finished_resume(argv: list[str] | None = None) -> None:
    """``resume=`` a finished run: say so and exit 0 before Hydra writes into its folder.

    Finished: ``metrics.json`` is there, no ``interrupted.json`` (SIGTERM after the test
    leaves one, and that resume completes the run), and the command line does not raise
    ``trainer.max_epochs`` above the epochs trained (that trains on, in the same folder).
    Nothing in the folder changes.
    """
    args = sys.argv[1:] if argv is None else argv
    resume = command_line_value(args, "resume")
    if resume is None:
        return
    run = Path(resume)
    if not (run / "metrics.json").is_file() or (run / INTERRUPTED).exists():
        return
    try:
        with open(run / "metrics.json", "rb") as f:  # a received folder's: bounded
            trained = int(json.loads(f.read(METRICS_READ_LIMIT))["epochs"])
        more = int(command_line_value(args, "trainer.max_epochs") or 0)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return  # an odd metrics.json or value: the checks after Hydra say what is wrong
    if more == -1 or more > trained:
        return
    print(
        f"{run} has finished (its metrics.json is complete after {trained} "
        f"epoch{'' if trained == 1 else 's'}): nothing "
        f"to resume; to train it further, add trainer.max_epochs={trained + 1} or more.",
        flush=True,
    )
    sys.exit(0)


def freeze_start_up_objects() -> None:
    """Hide what start-up allocated (modules, the config) from Python's garbage collector.

    Those objects live until the process exits, yet every full collection walks all of them
    again: the one after each job (``release``) and the last one as the interpreter exits,
    which on a short run cost more than its training. Frozen, a collection walks only what
    the run itself allocated; objects freed by reference counting are freed as before. Once
    per process: a sweep's later jobs allocate nothing that lives as long.
    """
    if gc.get_freeze_count() == 0:
        gc.freeze()


LOGS_FIX = "make it writable or point AE_LOGS_DIR at a writable folder"


def record_config(cfg: DictConfig) -> None:
    """Save the resolved config beside Hydra's own copy; print it as a tree if asked.

    Hydra's ``config.yaml`` keeps ``${oc.env:...}`` and ``${hydra:...}`` unresolved, so it
    does not say which data folder or run folder a run really used.
    """
    from pytorch_lightning.utilities import rank_zero_only  # the run has imported Lightning

    if rank_zero_only.rank != 0:  # DDP starts this script once per device
        return
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.output_subdir is not None:
            folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
            folder.mkdir(parents=True, exist_ok=True)
            text = OmegaConf.to_yaml(cfg, resolve=True)
            write_atomic(folder / "config_resolved.yaml", text.encode())
    if cfg.get("print_config"):
        print_config_tree(cfg)


def print_config_tree(cfg: DictConfig) -> None:
    """The resolved config as a Rich tree: one branch per top-level group."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    plain = {}
    for key, value in cfg.items():
        if OmegaConf.is_config(value):
            text = OmegaConf.to_yaml(value, resolve=True).rstrip() or "{}"
            tree.add(str(key)).add(Syntax(text, "yaml", background_color="default", word_wrap=True))
        else:
            plain[key] = value
    if plain:
        text = OmegaConf.to_yaml(OmegaConf.create(plain), resolve=True).rstrip()
        tree.add("top level").add(Syntax(text, "yaml", background_color="default", word_wrap=True))
    rich_print(tree)
