"""``train(cfg)``: build everything from config, fit, test with the best checkpoint, save.

A plain function (no ``@hydra.main``) so tests and sweeps can call it with any composed config.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import re
import shlex
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ae_lightning import markdown, provenance, tb
from ae_lightning.atomic import write_atomic
from ae_lightning.callbacks import CpuThreads, EpochHistory, EpochTimer
from ae_lightning.checkpointing import AtomicCheckpointIO, CheckpointOnSigterm
from ae_lightning.config import validate_config
from ae_lightning.cpu import available_cores, flush_denormals
from ae_lightning.data import DEFAULT_BATCH_SIZE, metric_suffix
from ae_lightning.errors import RunInterrupted, UserError
from ae_lightning.interrupts import INTERRUPTED, SigtermGuard, Terminated
from ae_lightning.latent import latent_quality
from ae_lightning.models import checkpoint_family
from ae_lightning.models.ae import Autoencoder
from ae_lightning.naming import read_varying  # (+ the run-folder name resolvers)
from ae_lightning.runfolder import load_autoencoder, load_checkpoint, read_json
from ae_lightning.runlock import LOCK_NAME, RunFolderBusy, run_lock

log = logging.getLogger(__name__)
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate each ``_target_`` entry of a name -> config mapping (None entries skipped)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def flat_hyperparameters(
    cfg: DictConfig, model: Autoencoder, varying: list[str] | None = None
) -> dict[str, Any]:
    """The knobs worth comparing across runs, flattened for TensorBoard's HParams tab.

    The architecture is read off the model, so an evaluated checkpoint reports its own.
    A varied override that is no knob of its own (``data.val_size``) becomes one.
    """
    hidden = list(model.hparams.get("hidden") or [])
    optimizer = cfg.model.get("optimizer") or {}
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    # The config group's name (`hidden1024`), unless an evaluated checkpoint differs from it.
    same = list(cfg.model.get("hidden") or []) == hidden and cfg.bottleneck == model.bottleneck
    knobs = {
        "model": str(choices.get("model") or type(model).__name__) if same else "checkpoint",
        "architecture": "-".join(str(size) for size in [784, *hidden, model.bottleneck]),
        **describe_run(cfg, model),
        "bottleneck": int(model.bottleneck),
        "hidden": str(hidden),
        "activation": str(model.hparams.get("activation")),
        "lr": float(optimizer.get("lr", float("nan"))),
        "weight_decay": float(optimizer.get("weight_decay") or 0.0),
        "batch_size": int(cfg.data.batch_size),
        "max_epochs": int(cfg.trainer.max_epochs),
        "seed": int(cfg.seed),
    }
    for key in tb.varied_knobs(varying or []):
        if key not in knobs:
            knobs[key] = str(OmegaConf.select(cfg, key, default=""))
    return knobs


def sweep_varying() -> list[str] | None:
    """In a sweep job: the keys the sweep varies (see ``naming.record_sweep``)."""
    return read_varying(HydraConfig.get().sweep.dir) if in_multirun() else None


def _record_tensorboard(
    cfg: DictConfig,
    logger: TensorBoardLogger,
    metrics: dict[str, Any],
    knobs: dict[str, Any],
    step: int,
) -> None:
    """HParams row, Text tab (config and metrics) and, outside a sweep, the experiment."""
    log_dir = logger.log_dir
    # In a sweep the row is named as TensorBoard names the run: by the job's folder.
    trial = Path(cfg.run_dir).name if in_multirun() else ""
    tb.write_session(log_dir, knobs, step, trial)
    if not in_multirun():  # a sweep writes one experiment and layout for all its jobs
        tb.write_experiment(log_dir, {name: [value] for name, value in knobs.items()})
        tb.write_curves_layout(log_dir)
    try:
        config = OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException:  # an interpolation only Hydra's app could resolve
        config = OmegaConf.to_yaml(cfg)
    logger.experiment.add_text("run/metrics", tb.metrics_table(metrics), step)  # sorts first
    logger.experiment.add_text("run/resolved_config", markdown.code_block(config, "yaml"), step)


def describe_run(cfg: DictConfig, model: Autoencoder) -> dict[str, str]:
    """Model family, dataset and training recipe in words, for summaries and comparisons.

    ``recipe`` is e.g. ``adamw lr=0.001 wd=0.01, cosine, elu, batch 64, mask 0.2, dropout
    0.1``: what differs from the defaults (ReLU units, batch 128) is named.
    """
    optimizer = cfg.model.get("optimizer") or {}
    parts = [
        str(optimizer.get("_target_", "adam")).rsplit(".", 1)[-1].lower()
        + f" lr={optimizer.get('lr', 'default')}"
        + (f" wd={optimizer.weight_decay}" if optimizer.get("weight_decay") else "")
    ]
    scheduler = cfg.model.get("scheduler") or {}
    if scheduler.get("_target_"):
        parts.append(SCHEDULER_NAMES.get(scheduler._target_.rsplit(".", 1)[-1], "scheduler"))
    hparams = model.hparams
    if hparams.get("hidden") and hparams.get("activation", "relu") != "relu":
        parts.append(str(hparams["activation"]))
    batch_size = cfg.data.get("batch_size")
    if batch_size and batch_size != DEFAULT_BATCH_SIZE:
        parts.append(f"batch {batch_size}")
    if hparams.get("corruption", "none") != "none":
        parts.append(f"{hparams['corruption']} {hparams.get('corruption_level')}")
    if hparams.get("dropout"):
        parts.append(f"dropout {hparams['dropout']}")
    parts += model.recipe_words()  # the family's own knobs
    return {
        "family": model.family,
        "dataset": str(cfg.data.get("dataset", "mnist")),
        "recipe": ", ".join(parts),
    }


SCHEDULER_NAMES = {
    "CosineAnnealingLR": "cosine",
    "OneCycleLR": "onecycle",
    "ReduceLROnPlateau": "plateau",
    "StepLR": "step",
}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically: a reader never sees half a file, a crash never leaves one."""
    write_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


_JOB_TRAINERS: list[pl.Trainer] = []


def share_cores(processes: int) -> None:
    """Torch threads = this machine's cores / processes running at once (not cores each).

    Processes that each start a thread per core oversubscribe the cores and all run slower.
    """
    torch.set_num_threads(max(1, available_cores() // max(1, processes)))


def _release_job() -> None:
    """Close this job's event writers and free its trainer, model and data (sweeps reuse us)."""
    for trainer in _JOB_TRAINERS:
        for logger in trainer.loggers:
            with contextlib.suppress(Exception):
                logger.finalize("success" if trainer.state.status == "finished" else "failed")
    _JOB_TRAINERS.clear()  # the codes cache is a callback of the trainer: freed with it
    gc.collect()  # trainer <-> module <-> callbacks cycles hold the job's tensors


def engine_options(cfg: DictConfig) -> dict[str, Any]:
    """``engine.*`` and the Trainer's per-step options, for the module's step loop.

    Under manual optimisation Lightning refuses ``gradient_clip_val`` and
    ``accumulate_grad_batches``; the module applies them instead, so the keys keep working
    where users set them (``trainer.*``). A plain dict: Hydra merges it into the model config.
    """
    trainer = cfg.trainer
    return {
        "cuda_graphs": cfg.engine.cuda_graphs,
        "gradient_clip_val": trainer.get("gradient_clip_val"),
        "gradient_clip_algorithm": trainer.get("gradient_clip_algorithm") or "norm",
        "accumulate_grad_batches": trainer.get("accumulate_grad_batches", 1),
    }


def build_model(cfg: DictConfig) -> pl.LightningModule:
    """The model config, with the engine options of this run."""
    return instantiate(cfg.model, _convert_="all", engine=engine_options(cfg))


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Any]) -> pl.Trainer:
    """The Trainer from ``cfg.trainer``, showing a progress bar only if one was configured.

    Clipping and accumulation go to the module (``engine_options``), not to the Trainer.
    """
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    if not loggers:  # (`logger=none`): the learning-rate monitor has nowhere to write
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=has_bar,
        plugins=[AtomicCheckpointIO()],
        gradient_clip_val=None,
        accumulate_grad_batches=1,
    )
    _JOB_TRAINERS.append(trainer)  # run_cli closes its writers when the job ends
    if trainer.world_size > 1 and trainer.strategy.root_device.type == "cpu":
        share_cores(trainer.num_devices)  # DDP ranks on one machine's CPU
    if trainer.world_size == 1:
        # Lightning sets this so that device checks cannot poison a later fork; with it set,
        # every Adam step asks NVML for the device count (~0.2 ms a step). One process
        # forks nothing, so plain CUDA checks are safe and cheaper.
        os.environ.pop(NVML_CHECK, None)
    if trainer.strategy.root_device.type == "cpu":
        flush_denormals(cfg.engine.flush_denormals)  # set per run: the switch works in-process
    return trainer


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


def _program() -> list[str]:
    script = Path(sys.argv[0]).name
    return ["python", script] if script.endswith(".py") else [script]


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


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
        if best and not (folder / Path(str(best)).name).is_file():
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


def _prepare_run(cfg: DictConfig) -> tuple[Path, pl.LightningDataModule]:
    """Checks, the run folder, seeds and the data: everything that can fail before training."""
    validate_config(cfg)
    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"The run folder {run_dir} cannot be created ({err.strerror}): point the logs "
            "elsewhere with AE_LOGS_DIR=/writable/folder or hydra.run.dir=/writable/folder."
        ) from None
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # K has one key, engine.steps_per_call; the data module sends lists of K minibatches.
    datamodule = instantiate(cfg.data, steps_per_call=cfg.engine.steps_per_call)
    datamodule.prepare_data()  # fails fast, before any model is built, if MNIST is missing
    log.info("Run folder: %s", run_dir.resolve())
    return run_dir, datamodule


def _record(
    cfg: DictConfig,
    run_dir: Path,
    trainer: pl.Trainer,
    model: Autoencoder,
    datamodule: pl.LightningDataModule,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Add the latent-quality metrics, write metrics.json and the HParams record."""
    if trainer.is_global_zero and cfg.get("latent_metrics", True):
        model.eval()
        dataset = getattr(datamodule, "dataset", "mnist")
        quality = latent_quality(
            model.encode, model.decode, datamodule.split("train"), datamodule.split("test"),
            device=model.device, metric_names=[metric_suffix(dataset, c) for c in range(10)],
        )  # fmt: skip
        metrics.update(quality)
    metrics.update(num_parameters=model.num_parameters, bottleneck=model.bottleneck)
    metrics.update(describe_run(cfg, model))
    if trainer.is_global_zero:  # under DDP every rank returns the same metrics
        write_json(run_dir / "metrics.json", metrics)
    # Once, at the final step: the test metrics Lightning logged are there already.
    final = tb.final_scalars(metrics, logged=trainer.logged_metrics)
    knobs = flat_hyperparameters(cfg, model, sweep_varying())
    for logger in trainer.loggers:
        logger.log_metrics(final, step=trainer.global_step)
        if isinstance(logger, TensorBoardLogger):  # written empty at the start; save() keeps
            Path(logger.log_dir, "hparams.yaml").unlink(missing_ok=True)  # an existing file
        # hparams.yaml (and CSV/MLflow params); no metrics, so no second HParams record.
        logger.log_hyperparams(knobs)
        if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
            _record_tensorboard(cfg, logger, metrics, knobs, trainer.global_step)
        logger.save()
    if trainer.is_global_zero:
        record_run_info(run_dir, trainer, ended=True)
    shown = ("test/mse", "test/knn_acc", "test/probe_acc")
    log.info("Test metrics: %s", {k: round(metrics[k], 5) for k in shown if k in metrics})
    return metrics


def record_run_info(run_dir: Path, trainer: pl.Trainer, ended: bool = False) -> None:
    """``run_info.json``: the run's provenance when it starts, its end time when it ends.

    A resumed run keeps the first start and lists each later one under ``resumed``.
    """
    if not trainer.is_global_zero:
        return
    path = run_dir / "run_info.json"
    info = read_json(path)
    if ended:
        if info:
            write_json(path, {**info, "ended": provenance.now()})
        return
    device = trainer.strategy.root_device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else provenance.cpu_name()
    fresh = provenance.run_info(str(device), name)
    if info.get("started"):  # resume=: this folder's run started before
        resumes = [*info.get("resumed", []), {k: fresh[k] for k in ("argv", "host", "started")}]
        fresh = {**info, "resumed": resumes, "ended": None}
    write_json(path, fresh)


@contextmanager
def lightning_notices_filtered() -> Iterator[None]:
    """Hide Lightning's notices that do not apply to this package's step loop.

    Lightning compares ``log_every_n_steps`` with its batch count, which counts calls of
    ``engine.steps_per_call`` steps; the module logs per optimizer step itself.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The number of training batches \(\d+\) is smaller than"
        )
        yield


@dataclass
class _Progress:
    """How far a run got, for the sentence SIGTERM prints (``_interrupted``)."""

    phase: str = "start"  # start, fit, test, record
    on_sigterm: CheckpointOnSigterm | None = None
    trainer: pl.Trainer | None = None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one autoencoder as ``cfg`` says; return the metrics in ``metrics.json``.

    SIGTERM anywhere (data loading, training, the test, the figures, the records) raises
    ``RunInterrupted``: what is complete and the command that continues the run.
    """
    progress = _Progress()
    with SigtermGuard() as guard:
        try:
            metrics = _train(cfg, guard, progress)
            Path(cfg.run_dir, INTERRUPTED).unlink(missing_ok=True)  # a resumed run is finished
            return metrics
        except (SIGTERMException, Terminated):
            raise _interrupted(cfg, progress) from None


def _train(cfg: DictConfig, guard: SigtermGuard, progress: _Progress) -> dict[str, Any]:
    run_dir, datamodule = _prepare_run(cfg)
    model = build_model(cfg)
    ckpt_path = resume_checkpoint(cfg, model)  # refusals come before the Trainer's chatter
    check_resumed_test_checkpoint(cfg)
    on_sigterm = progress.on_sigterm = CheckpointOnSigterm(run_dir / "checkpoints")
    threads = CpuThreads(cfg.engine.threads)
    callbacks = [*_instantiate_group(cfg.get("callbacks")), on_sigterm, threads]
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = progress.trainer = build_trainer(cfg, callbacks, loggers)
    record_run_info(run_dir, trainer)

    progress.phase = "fit"
    start = time.perf_counter()
    with lightning_notices_filtered():
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    train_time = time.perf_counter() - start  # (Ctrl-C: Lightning shuts down and exits in fit)

    progress.phase = "test"
    if guard.received:  # after the loop's last look at the signal: training is complete
        raise Terminated
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    test_ckpt = None  # without a checkpoint callback: test the weights in memory
    if checkpoint is not None:
        wanted = (
            checkpoint.best_model_path if cfg.test_ckpt == "best" else checkpoint.last_model_path
        )
        test_ckpt = wanted or None
    (test_metrics,) = trainer.test(
        model, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False, weights_only=True
    )
    if guard.received:  # during the final figures, which come after the test loop's checks
        raise Terminated

    metrics: dict[str, Any] = {key: float(value) for key, value in test_metrics.items()}
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics["best_val/mse"] = float(checkpoint.best_model_score)
    metrics.update(
        epochs=trainer.current_epoch,
        global_step=trainer.global_step,
        train_time_s=round(train_time, 3),
        test_checkpoint=str(test_ckpt or "in-memory"),
    )
    timer = next((c for c in callbacks if isinstance(c, EpochTimer)), None)
    if timer is not None:
        metrics["epoch_times_s"] = [round(t, 4) for t in timer.epoch_times]
    history = next((c for c in callbacks if isinstance(c, EpochHistory)), None)
    if history is not None:
        metrics["history"] = history.rows
    progress.phase = "record"
    if trainer.is_global_zero:  # the test result is safe on disk before anything else is tried
        write_json(run_dir / "metrics.json", metrics)
    return _record(cfg, run_dir, trainer, model, datamodule, metrics)


def _interrupted(cfg: DictConfig, progress: _Progress) -> RunInterrupted:
    """The one line SIGTERM prints: what is complete, and the command that continues."""
    last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
    saved = progress.on_sigterm.saved_step if progress.on_sigterm is not None else None
    if progress.phase == "fit" and saved is not None and progress.trainer is not None:
        command = resume_command(cfg)
        return RunInterrupted(
            f"SIGTERM: stopped at step {saved} (epoch {progress.trainer.current_epoch + 1}) "
            f"and saved {last}; resume with: {command}",
            command,
        )
    if progress.phase in ("start", "fit"):  # before the first step: nothing new to keep
        if cfg.get("resume"):
            command = resume_command(cfg)
            return RunInterrupted(
                f"SIGTERM before training resumed; {last} is as it was: resume with: {command}",
                command,
            )
        command = rerun_command()
        return RunInterrupted(
            f"SIGTERM before training started; nothing was trained: run again: {command}",
            command,
        )
    stopped = (
        "the test (or its figures) was interrupted"
        if progress.phase == "test"
        else "the test finished but the latent metrics and records were interrupted"
    )
    if not last.is_file():  # callbacks=none: no checkpoint to test again
        command = rerun_command()
        return RunInterrupted(
            f"SIGTERM after training, which kept no checkpoint (no checkpoint callback); "
            f"{stopped}: start again with: {command}",
            command,
        )
    command = resume_command(cfg)
    return RunInterrupted(
        f"SIGTERM after training: training finished and {last} holds it; {stopped}: "
        f"complete the run (test and records only) with: {command}",
        command,
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test metrics and final figures of a saved checkpoint, into a new run folder.

    The architecture comes from the checkpoint itself; the data, figure and logger settings
    from ``cfg``. Nothing is trained.
    """
    if not cfg.get("ckpt_path"):
        raise UserError(
            "eval needs a checkpoint: add ckpt_path=logs/runs/<run>/checkpoints/best.ckpt."
        )
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} does not exist: point it at a .ckpt file in a run's "
            "checkpoints/ folder."
        )
    model = load_autoencoder(path)  # before the run folder: a refused file leaves none
    with SigtermGuard() as guard:
        try:
            run_dir, datamodule = _prepare_run(cfg)
            callbacks = [
                c
                for c in _instantiate_group(cfg.get("callbacks"))
                if not isinstance(c, ModelCheckpoint)
            ]
            callbacks.append(CpuThreads(cfg.engine.threads))
            trainer = build_trainer(cfg, callbacks, _instantiate_group(cfg.get("logger")))
            record_run_info(run_dir, trainer)
            (test_metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
            if guard.received:  # during the final figures
                raise Terminated
            metrics: dict[str, Any] = {key: float(value) for key, value in test_metrics.items()}
            metrics.update(epochs=model.trained_epochs, test_checkpoint=str(path))
            return _record(cfg, run_dir, trainer, model, datamodule, metrics)
        except (SIGTERMException, Terminated):
            command = rerun_command()  # nothing to keep: the checkpoint is unchanged
            raise RunInterrupted(
                f"SIGTERM during the evaluation of {path}: run it again with: {command}", command
            ) from None


def _quiet_write_failures(args: threading.ExceptHookArgs) -> None:
    """A writer thread's disk error is re-raised in the main thread: no second traceback."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRORS:
        log.debug("A writer thread failed: %s", args.exc_value)
        return
    threading.__excepthook__(args)


WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EFBIG}


def _write_failure(err: BaseException, run_dir: Path, command: str) -> str:
    """One sentence for a failed write (full disk, read-only, I/O error), else ``""``.

    Removes the run's half-written ``*.tmp`` files; what was complete stays. ``command``
    (shell-quoted) continues the run; it ends the sentence, so it pastes as one.
    """
    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in WRITE_ERRORS):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return ""
    for tmp in run_dir.rglob("*.tmp") if run_dir.is_dir() else []:
        tmp.unlink(missing_ok=True)
    where = str(cause.filename).removesuffix(".tmp") if cause.filename else f"into {run_dir}"
    kept = (
        "metrics.json and the last complete checkpoint are kept"
        if (run_dir / "metrics.json").is_file()
        else "the last complete checkpoint is kept"
    )
    return (
        f"Writing {where} failed ({cause.strerror}): free space on that disk or make it "
        f"writable; {kept}; then continue with: {command}"
    )


def _locked(run_dir: Path) -> contextlib.AbstractContextManager:
    """This process's hold on its run folder (rank zero only: DDP ranks share the folder)."""
    if rank_zero_only.rank != 0 or not run_dir.is_dir():
        return contextlib.nullcontext()
    return run_lock(run_dir)


HYDRA_STUB = {".hydra", ".hydra-resumed", "train.log", "eval.log", LOCK_NAME}


def _leave_refused(run_dir: Path, sentence: str) -> None:
    """A refused new run leaves no folder; one that got further keeps failed.json."""
    if not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} <= HYDRA_STUB:
        shutil.rmtree(run_dir, ignore_errors=True)  # only Hydra's config and log: no run
        return
    write_json(run_dir / "failed.json", {"status": "failed", "error": sentence})


def _mark_interrupted(cfg: DictConfig, err: RunInterrupted) -> None:
    """``interrupted.json`` (the line and its command), so a resume is not taken as finished.

    A new run stopped before it kept a checkpoint has nothing to resume: its folder goes if
    only Hydra's files are in it, as a refused run's does. A sweep's job is always marked,
    for the summary.
    """
    run_dir = Path(cfg.run_dir)
    kept = (run_dir / "checkpoints" / "last.ckpt").is_file()
    if not kept and not cfg.get("resume") and not in_multirun():
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_STUB:
            shutil.rmtree(run_dir, ignore_errors=True)
        return
    if run_dir.is_dir():
        write_json(
            run_dir / INTERRUPTED,
            {"status": "interrupted", "error": str(err), "resume": err.resume_command},
        )


def _stop_sweep() -> None:
    """Summarise the sweep's jobs so far (the interrupted one is marked already)."""
    from ae_lightning.sweep import SweepSummary  # the sweep layer sits above this one

    hydra = HydraConfig.get()
    settings = hydra.callbacks.get("sweep_summary") or {}
    summary = SweepSummary(
        enabled=bool(settings.get("enabled", True)),
        sampler=str(settings.get("sampler", "gaussian")),
        seed=int(settings.get("seed", 0)),
    )
    summary.summarise(Path(hydra.sweep.dir))


def _instantiate_sentence(err: InstantiationException) -> str:
    """Hydra's refusal to build a config node, as one sentence naming the node and the fix."""
    lines = str(err).splitlines() or [type(err).__name__]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    reason = re.sub(r",? set env var HYDRA_FULL_ERROR=1.*$", "", lines[0]).rstrip(" .")
    node = key or "the config node"
    return (
        f"{node} cannot be built ({reason}): fix {node}._target_ or the values given to it "
        "on the command line."
    )


def _parallel_jobs() -> int:
    """Jobs this sweep runs at once (``hydra/launcher=local_parallel``'s n_jobs), else 1."""
    if not in_multirun():
        return 1
    n_jobs = HydraConfig.get().launcher.get("n_jobs")
    return n_jobs if isinstance(n_jobs, int) and n_jobs > 0 else 1


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_cli(cfg: DictConfig, task: Callable[[DictConfig], dict[str, Any]] = train) -> float:
    """Entry-point body: train and print the result.

    Bad input exits 2 with one sentence. In a sweep, a failing job writes ``failed.json``
    (its error line) into its folder and the sweep goes on with the next job.
    """
    threading.excepthook = _quiet_write_failures  # TensorBoard's writer thread re-raises
    parallel_jobs = _parallel_jobs()
    if parallel_jobs > 1:
        share_cores(parallel_jobs)
    try:
        with _locked(Path(cfg.run_dir)):
            metrics = task(cfg)
    except RunInterrupted as err:
        if rank_zero_only.rank == 0:
            _mark_interrupted(cfg, err)
            if in_multirun():
                _stop_sweep()
            print(f"interrupted: {err}", file=sys.stderr, flush=True)
        sys.exit(143)  # 128 + SIGTERM, as a shell reports a process the signal ended
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if isinstance(err, InstantiationException):  # a `_target_` from the command line
            err = UserError(_instantiate_sentence(err))
        disk = _write_failure(err, Path(cfg.run_dir), resume_command(cfg))
        if in_multirun():
            line = disk or f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.exception("Job failed; the sweep goes on: %s", line)
            if isinstance(err, RunFolderBusy):  # the folder is another process's: no write
                return float("nan")
            with contextlib.suppress(OSError):  # the disk may be the very problem
                Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
                write_json(Path(cfg.run_dir) / "failed.json", {"status": "failed", "error": line})
            return float("nan")
        if disk:
            print(f"error: {disk}", file=sys.stderr, flush=True)
            sys.exit(1)
        if not isinstance(err, UserError):
            raise
        if not isinstance(err, RunFolderBusy) and not cfg.get("resume"):
            _leave_refused(Path(cfg.run_dir), str(err))
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        _release_job()
    if rank_zero_only.rank == 0:
        print(
            "test/mse {:.5f}  ({} epochs, {:.1f} s)  -> {}".format(
                metrics["test/mse"],
                metrics["epochs"],
                metrics.get("train_time_s", 0.0),
                cfg.run_dir,
            ),
            flush=True,
        )
    return metrics.get("best_val/mse", metrics["test/mse"])
