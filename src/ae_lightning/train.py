"""The run recipe: ``train(cfg)`` and ``evaluate(cfg)``, and the builders they use.

``train`` builds everything from the config, fits, tests with the best checkpoint and
records the run (``record``); ``evaluate`` tests a saved checkpoint again. Plain functions
(no ``@hydra.main``), so tests and sweeps call them with any composed config; the process
around them (exit codes, sentences, locks) is ``policy.run_cli``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ae_lightning.callbacks import CpuThreads, EpochHistory, EpochTimer
from ae_lightning.checkpointing import AtomicCheckpointIO, CheckpointOnSigterm
from ae_lightning.config import check_model_size_for, is_mnist, validate_config
from ae_lightning.cpu import flush_denormals, share_cores
from ae_lightning.errors import RunInterrupted, UserError
from ae_lightning.interrupts import INTERRUPTED, SigtermGuard, Terminated
from ae_lightning.record import (
    record_run,
    record_run_info,
    sample_quality_classifier,
    write_json,
)
from ae_lightning.resume import (
    rerun_command,
    resume_checkpoint,
    resume_command,
)
from ae_lightning.runfolder import load_autoencoder, training_settings

log = logging.getLogger(__name__)


NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


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
        finally:
            release(progress.trainer)


def _train(cfg: DictConfig, guard: SigtermGuard, progress: _Progress) -> dict[str, Any]:
    run_dir, datamodule = _prepare_run(cfg)
    model = build_model(cfg, datamodule.image_shape)
    ckpt_path = resume_checkpoint(cfg, model)  # refusals come before the Trainer's chatter
    classifier = sample_quality_classifier(cfg, datamodule)
    check_monitors(cfg, model)
    log.info("Run folder: %s", run_dir.resolve())  # every refusal before it: a folder kept
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
        metrics[f"best_{checkpoint.monitor}"] = float(checkpoint.best_model_score)
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
        seen = [row["val/mse"] for row in history.rows if "val/mse" in row]
        if "best_val/mse" not in metrics and seen:  # the checkpoint watched another metric
            metrics["best_val/mse"] = min(seen)  # what sweeps and comparisons rank by
    progress.phase = "record"
    if trainer.is_global_zero:  # the test result is safe on disk before anything else is tried
        write_json(run_dir / "metrics.json", metrics)
    return record_run(cfg, run_dir, trainer, model, datamodule, metrics, classifier)


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
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(
            f"ckpt_path={cfg.ckpt_path} {what}: point it at a .ckpt file in a run's "
            "checkpoints/ folder, e.g. <run>/checkpoints/best.ckpt."
        )
    model = load_autoencoder(path)  # before the run folder: a refused file leaves none
    trained = OmegaConf.create(training_settings(path))  # its recipe is its run's, not ours
    classifier = None
    trainer = None
    with SigtermGuard() as guard:
        try:
            run_dir, datamodule = _prepare_run(cfg)
            if tuple(model.image_shape) != tuple(datamodule.image_shape):
                raise UserError(
                    f"{path} was trained on images of shape {tuple(model.image_shape)}, but "
                    f"the data given has {tuple(datamodule.image_shape)}: evaluate it with the "
                    "data= settings it was trained with."
                )
            classifier = sample_quality_classifier(cfg, datamodule)
            log.info("Run folder: %s", run_dir.resolve())
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
            return record_run(
                cfg, run_dir, trainer, model, datamodule, metrics, classifier, trained
            )
        except (SIGTERMException, Terminated):
            command = rerun_command()  # nothing to keep: the checkpoint is unchanged
            raise RunInterrupted(
                f"SIGTERM during the evaluation of {path}: run it again with: {command}", command
            ) from None
        finally:
            release(trainer)


def check_monitors(cfg: DictConfig, model: pl.LightningModule) -> None:
    """Refuse, before training, a monitor that names a metric this model's validation never
    logs.

    Lightning finds out only after the first epoch (early stopping's and the checkpoint's
    tracebacks), and a plateau scheduler without its metric never steps, silently. The
    ``train/`` terms are logged only at the loggers' steps, so they are not offered.
    """
    watched = [
        (f"callbacks.{name}.monitor", node.get("monitor"))
        for name, node in (cfg.get("callbacks") or {}).items()
        if isinstance(node, DictConfig) and node.get("monitor")
    ]
    target = getattr(getattr(model, "scheduler_factory", None), "func", None)
    if isinstance(target, type) and issubclass(target, ReduceLROnPlateau):
        watched.append(("model.scheduler_monitor", model.scheduler_monitor))
    if not watched:
        return
    names = model.validation_names()
    for key, value in watched:
        if value not in names:
            raise UserError(
                f"{key}={value} is not a metric the {model.family} family logs each epoch with "
                f"these settings, so it would never be seen: use one of {', '.join(names)}."
            )


@dataclass
class _Progress:
    """How far a run got, for the sentence SIGTERM prints (``_interrupted``)."""

    phase: str = "start"  # start, fit, test, record
    on_sigterm: CheckpointOnSigterm | None = None
    trainer: pl.Trainer | None = None


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


def release(trainer: pl.Trainer | None) -> None:
    """Close a job's event writers and free its trainer, model and data (sweeps reuse us)."""
    if trainer is not None:
        for logger in trainer.loggers:
            with contextlib.suppress(Exception):
                logger.finalize("success" if trainer.state.status == "finished" else "failed")
    gc.collect()  # trainer <-> module <-> callbacks cycles hold the job's tensors


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
    datamodule = instantiate_checked(cfg.data, steps_per_call=cfg.engine.steps_per_call)
    datamodule.prepare_data()  # fails fast, before any model is built, if MNIST is missing
    if not is_mnist(cfg):  # MNIST's size was checked with the config
        check_model_size_for(cfg, math.prod(datamodule.image_shape))
    return run_dir, datamodule


def build_model(cfg: DictConfig, image_shape: Sequence[int] | None = None) -> pl.LightningModule:
    """The model config, with the engine options of this run and the data's image shape."""
    shape = {} if image_shape is None else {"image_shape": [int(d) for d in image_shape]}
    return instantiate_checked(cfg.model, _convert_="all", engine=engine_options(cfg), **shape)


def instantiate_checked(node: DictConfig, **kwargs: Any) -> Any:
    """``instantiate``, with a constructor's ``UserError`` (``model.groups=3`` ...) passed on
    as itself: Hydra wraps it in an ``InstantiationException`` that no longer reads as one
    sentence."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if not isinstance(err.__cause__, UserError):
            raise
        refused = err.__cause__
    refused.__context__ = None  # raised alone: no cycle back through Hydra's wrapper
    raise refused


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
    if trainer.world_size > 1 and trainer.strategy.root_device.type == "cpu":
        share_cores(trainer.num_devices)  # DDP ranks on one machine's CPU
    if trainer.world_size == 1:
        # Lightning sets this so that device checks cannot poison a later fork; with it set,
        # every Adam step asks NVML for the device count, a cost per step. One process
        # forks nothing, so plain CUDA checks are safe and cheaper.
        os.environ.pop(NVML_CHECK, None)
    if trainer.strategy.root_device.type == "cpu":
        flush_denormals(cfg.engine.flush_denormals)  # set per run: the switch works in-process
    return trainer


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate each ``_target_`` entry of a name -> config mapping (None entries skipped)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


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
