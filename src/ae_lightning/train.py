"""``train(cfg)``: build everything from config, fit, test with the best checkpoint, save.

A plain function (no ``@hydra.main``) so tests and sweeps can call it with any composed config.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from ae_lightning import tb
from ae_lightning.callbacks import EpochTimer
from ae_lightning.checkpointing import AtomicCheckpointIO
from ae_lightning.config import validate_config
from ae_lightning.errors import UserError
from ae_lightning.latent import latent_quality
from ae_lightning.module import Autoencoder
from ae_lightning.naming import read_varying  # (+ the run-folder name resolvers)

log = logging.getLogger(__name__)
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def _resume_or(resume: str | None, default: str, resumed: str | None = None) -> str:
    """``${ae_resume_or:${resume},A[,B]}``: A normally; when resuming, the folder (or B)."""
    if resume is None:
        return default
    return resumed if resumed is not None else str(resume)


OmegaConf.register_new_resolver("ae_resume_or", _resume_or, replace=True)


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
    # In a sweep the row is named by the varied values alone (`hidden1024,10`): the column
    # is narrow and its header row already names the knobs.
    trial = re.sub(r"[^,=]+=", "", Path(cfg.run_dir).name) if in_multirun() else ""
    tb.write_session(log_dir, knobs, step, trial)
    if not in_multirun():  # a sweep writes one experiment and layout for all its jobs
        tb.write_experiment(log_dir, list(knobs))
        tb.write_curves_layout(log_dir)
    try:
        config = OmegaConf.to_yaml(cfg, resolve=True)
    except OmegaConfBaseException:  # an interpolation only Hydra's app could resolve
        config = OmegaConf.to_yaml(cfg)
    logger.experiment.add_text("run/metrics", tb.metrics_table(metrics), step)  # sorts first
    logger.experiment.add_text("run/resolved_config", f"```yaml\n{config}```", step)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically: a reader never sees half a file, a crash never leaves one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Any]) -> pl.Trainer:
    """The Trainer from ``cfg.trainer``, showing a progress bar only if one was configured."""
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=has_bar,
        plugins=[AtomicCheckpointIO()],
    )
    if trainer.world_size == 1:
        # Lightning sets this so that device checks cannot poison a later fork; with it set,
        # every Adam step asks NVML for the device count (~0.2 ms a step). One process
        # forks nothing, so plain CUDA checks are safe and cheaper.
        os.environ.pop(NVML_CHECK, None)
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
    saved = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    for key in ("bottleneck", "hidden", "decoder_hidden", "activation"):
        if key in saved and saved[key] != model.hparams.get(key):
            raise UserError(
                f"{path} was trained with {key}={saved[key]!r} but this config has "
                f"{key}={model.hparams.get(key)!r}: repeat the run's original overrides "
                f"(see its .hydra/overrides.yaml)."
            )
    return str(path)


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
    datamodule = instantiate(cfg.data)
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
        quality = latent_quality(
            model.encode, model.decode, datamodule.split("train"), datamodule.split("test"),
            device=model.device,
        )  # fmt: skip
        metrics.update(quality)
    metrics.update(num_parameters=model.num_parameters, bottleneck=model.bottleneck)
    if trainer.is_global_zero:  # under DDP every rank returns the same metrics
        write_json(run_dir / "metrics.json", metrics)
    # Once, at the final step: the test metrics Lightning logged are there already.
    final = tb.final_scalars(metrics, logged=trainer.logged_metrics)
    knobs = flat_hyperparameters(cfg, model, sweep_varying())
    for logger in trainer.loggers:
        logger.log_metrics(final, step=trainer.global_step)
        if isinstance(logger, TensorBoardLogger):
            if trainer.is_global_zero:
                _record_tensorboard(cfg, logger, metrics, knobs, trainer.global_step)
        else:
            logger.log_hyperparams(knobs)
        logger.save()
    shown = ("test/mse", "test/knn_acc", "test/probe_acc")
    log.info("Test metrics: %s", {k: round(metrics[k], 5) for k in shown if k in metrics})
    return metrics


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one autoencoder as ``cfg`` says; return the metrics in ``metrics.json``."""
    run_dir, datamodule = _prepare_run(cfg)
    model = instantiate(cfg.model, _convert_="all")
    callbacks = _instantiate_group(cfg.get("callbacks"))
    trainer = build_trainer(cfg, callbacks, _instantiate_group(cfg.get("logger")))

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, model))
    train_time = time.perf_counter() - start  # (Ctrl-C: Lightning shuts down and exits in fit)

    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    test_ckpt = None  # without a checkpoint callback: test the weights in memory
    if checkpoint is not None:
        wanted = (
            checkpoint.best_model_path if cfg.test_ckpt == "best" else checkpoint.last_model_path
        )
        test_ckpt = wanted or None
    (test_metrics,) = trainer.test(model, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)

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
    return _record(cfg, run_dir, trainer, model, datamodule, metrics)


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
    run_dir, datamodule = _prepare_run(cfg)
    try:
        model = Autoencoder.load_from_checkpoint(path, map_location="cpu")
    except Exception as err:
        raise UserError(
            f"{path} is not an ae-lightning checkpoint ({type(err).__name__}): point "
            "ckpt_path at a checkpoint written by train.py."
        ) from None
    callbacks = [
        c for c in _instantiate_group(cfg.get("callbacks")) if not isinstance(c, ModelCheckpoint)
    ]
    trainer = build_trainer(cfg, callbacks, _instantiate_group(cfg.get("logger")))
    (test_metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    metrics: dict[str, Any] = {key: float(value) for key, value in test_metrics.items()}
    metrics.update(epochs=model.trained_epochs, test_checkpoint=str(path))
    return _record(cfg, run_dir, trainer, model, datamodule, metrics)


def ensure_writable_logs() -> None:
    """Exit with one sentence if the logs folder cannot be written, before Hydra tries to."""
    logs = Path(os.environ.get("AE_LOGS_DIR", "logs"))
    try:
        logs.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=logs):
            pass
    except OSError as err:
        print(
            f"error: the logs folder {logs} cannot be written ({err.strerror}): make it "
            "writable or point AE_LOGS_DIR at a writable folder.",
            file=sys.stderr,
        )
        sys.exit(2)


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_cli(cfg: DictConfig, task: Callable[[DictConfig], dict[str, Any]] = train) -> float:
    """Entry-point body: train and print the result.

    Bad input exits 2 with one sentence. In a sweep, a failing job writes ``failed.json``
    (its error line) into its folder and the sweep goes on with the next job.
    """
    try:
        metrics = task(cfg)
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if in_multirun():
            line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.exception("Job failed; the sweep goes on: %s", line)
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(cfg.run_dir) / "failed.json", {"status": "failed", "error": line})
            return float("nan")
        if not isinstance(err, UserError):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
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
