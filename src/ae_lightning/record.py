"""What a run records: ``metrics.json``, ``run_info.json``, the HParams row and Text tab, and
the words that describe a run (family, dataset, recipe) in summaries and comparisons.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from ae_lightning import markdown, provenance, tb
from ae_lightning.atomic import write_atomic
from ae_lightning.data import DATASETS, DEFAULT_BATCH_SIZE, to_unit_float
from ae_lightning.errors import UserError
from ae_lightning.latent import (
    encode_images,
    evaluation_subset,
    importance_sampled_nll,
    latent_quality,
)
from ae_lightning.models.ae import Autoencoder
from ae_lightning.naming import read_varying
from ae_lightning.runfolder import read_json

log = logging.getLogger(__name__)


def record_run(
    cfg: DictConfig,
    run_dir: Path,
    trainer: pl.Trainer,
    model: Autoencoder,
    datamodule: pl.LightningDataModule,
    metrics: dict[str, Any],
    classifier: Any = None,
    trained: DictConfig | None = None,
) -> dict[str, Any]:
    """Add the latent- and sample-quality metrics, write metrics.json and the HParams record.

    ``trained``: the settings that trained the model where they are not ``cfg``'s (an
    evaluation's are its own defaults): its recipe, lr, batch size, epochs and seed.
    """
    if trainer.is_global_zero and cfg.get("latent_metrics", True):
        if datamodule.has_labels:
            model.eval()
            quality = latent_quality(
                model.encode, model.decode, datamodule.split("train"), datamodule.split("test"),
                device=model.device, metric_names=datamodule.metric_names,
            )  # fmt: skip
            metrics.update(quality)
        else:
            log.info("The data has no labels: kNN, probe and per-class MSE are skipped.")
    if trainer.is_global_zero and classifier is not None:
        from ae_lightning.sample_quality import sample_quality

        def train_codes() -> torch.Tensor:  # what samples.png fits its Gaussian to
            return encode_images(model.encode, datamodule.split("train")[0][:10_000],
                                 device=model.device)  # fmt: skip

        test_set, (grey, _) = datamodule.split("test"), datamodule.grey_split("test")
        metrics.update(
            sample_quality(
                model, classifier, test_set, train_codes, cfg.seed, model.device, reference=grey
            )
        )
    if trainer.is_global_zero:
        nll = test_nll(cfg, model, datamodule)
        if nll is not None:
            metrics["test/nll"] = nll
    metrics.update(num_parameters=model.num_parameters, bottleneck=model.bottleneck)
    metrics.update(describe_run(cfg, model, trained))
    if trainer.is_global_zero:  # under DDP every rank returns the same metrics
        write_json(run_dir / "metrics.json", metrics)
    # Once, at the final step: the test metrics Lightning logged are there already.
    final = tb.final_scalars(metrics, logged=trainer.logged_metrics)
    knobs = flat_hyperparameters(cfg, model, sweep_varying(), trained)
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
    shown = ("test/mse", "test/nll", "test/knn_acc", "test/probe_acc", "test/fd_samples")
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
        earlier = info.get("resumed", [])
        if not isinstance(info["started"], str) or not (
            isinstance(earlier, list) and all(isinstance(r, dict) for r in earlier)
        ):
            bad = "started" if not isinstance(info["started"], str) else "resumed"
            raise UserError(
                f"{path} has {bad}={repr(info[bad])[:80]}, not what train.py writes (a time, a "
                "list of earlier starts): restore the run_info.json the run wrote, or delete "
                "it to start the run's record afresh."
            )
        resumes = [*earlier, {k: fresh[k] for k in ("argv", "host", "started")}]
        fresh = {**info, "resumed": resumes, "ended": None}
    write_json(path, fresh)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically: a reader never sees half a file, a crash never leaves one."""
    write_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def describe_run(
    cfg: DictConfig, model: Autoencoder, trained: DictConfig | None = None
) -> dict[str, str]:
    """Model family, dataset and training recipe in words, for summaries and comparisons.

    ``recipe`` is e.g. ``adamw lr=0.001 wd=0.01, cosine, elu, batch 64, mask 0.2, dropout
    0.1``: what differs from the defaults (ReLU units, batch 128) is named. It is read from
    ``trained`` where given (the run that trained an evaluated checkpoint; empty: unknown),
    the dataset from ``cfg``, the data the metrics beside it were measured on.
    """
    recipe = cfg if trained is None else trained
    optimizer = (recipe.get("model") or {}).get("optimizer") or {}
    if optimizer:
        parts = [
            str(optimizer.get("_target_", "adam")).rsplit(".", 1)[-1].lower()
            + f" lr={optimizer.get('lr', 'default')}"
            + (f" wd={optimizer.weight_decay}" if optimizer.get("weight_decay") else "")
        ]
    else:  # a checkpoint without its run folder: its optimiser was never recorded in it
        parts = ["training settings unknown (no run folder beside the checkpoint)"]
    scheduler = (recipe.get("model") or {}).get("scheduler") or {}
    if scheduler.get("_target_"):
        parts.append(SCHEDULER_NAMES.get(scheduler._target_.rsplit(".", 1)[-1], "scheduler"))
    hparams = model.hparams
    if hparams.get("hidden") and hparams.get("activation", "relu") != "relu":
        parts.append(str(hparams["activation"]))
    batch_size = (recipe.get("data") or {}).get("batch_size")
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


def flat_hyperparameters(
    cfg: DictConfig,
    model: Autoencoder,
    varying: list[str] | None = None,
    trained: DictConfig | None = None,
) -> dict[str, Any]:
    """The knobs worth comparing across runs, flattened for TensorBoard's HParams tab.

    The architecture is read off the model, so an evaluated checkpoint reports its own, and
    its training settings off ``trained`` (``describe_run``): NaN where they are unknown.
    A varied override that is no knob of its own (``data.val_size``) becomes one.
    """
    hidden = list(model.hparams.get("hidden") or [])
    recipe = cfg if trained is None else trained
    optimizer = (recipe.get("model") or {}).get("optimizer") or {}
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    # The config group's name (`hidden1024`), unless an evaluated checkpoint differs from it.
    same = list(cfg.model.get("hidden") or []) == hidden and cfg.bottleneck == model.bottleneck
    knobs = {
        "model": str(choices.get("model") or type(model).__name__) if same else "checkpoint",
        "architecture": "-".join(
            str(size) for size in [math.prod(model.image_shape), *hidden, model.bottleneck]
        ),
        **describe_run(cfg, model, trained),
        "bottleneck": int(model.bottleneck),
        "hidden": str(hidden),
        "activation": str(model.hparams.get("activation")),
        "lr": _number(optimizer.get("lr")),
        "weight_decay": _number(optimizer.get("weight_decay") or 0.0) if optimizer else math.nan,
        "batch_size": _number((recipe.get("data") or {}).get("batch_size")),
        "max_epochs": _number((recipe.get("trainer") or {}).get("max_epochs")),
        "seed": _number(recipe.get("seed")),
    }
    for key in tb.varied_knobs(varying or []):
        if key not in knobs:
            knobs[key] = str(OmegaConf.select(cfg, key, default=""))
    return knobs


def _number(value: Any) -> float | int:
    """A knob's number for the HParams tab: NaN where it is unknown (``training_settings``
    keeps only numbers, so anything else means absent)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return value


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


def sweep_varying() -> list[str] | None:
    """In a sweep job: the keys the sweep varies (see ``naming.record_sweep``)."""
    return read_varying(HydraConfig.get().sweep.dir) if in_multirun() else None


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def test_nll(
    cfg: DictConfig, model: Autoencoder, datamodule: pl.LightningDataModule
) -> float | None:
    """``test/nll`` (nats per image) on ``eval.nll_images`` test images (the same random
    subset for every run, ``latent.evaluation_subset``), seeded; None when switched off or
    for a family without a likelihood."""
    settings = cfg.get("eval") or {}
    samples = settings.get("nll_samples", 0)
    if not samples:
        return None
    test_images = datamodule.split("test")[0]
    images = test_images[evaluation_subset(len(test_images), settings.get("nll_images"))]
    model.eval()
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        nll = importance_sampled_nll(
            model.log_weights, to_unit_float(images), samples, device=model.device
        )
    if nll is not None:
        log.info("test/nll %.2f nats (%d samples x %d images)", nll, samples, len(images))
    return nll


def sample_quality_classifier(cfg: DictConfig, datamodule: pl.LightningDataModule) -> Any:
    """The classifier ``test/fd_*`` are measured with, or None when they are off.

    Found in (or trained into) the data's cache before the run trains, so a damaged cache
    file is refused before any training. Rank zero only: it alone records the metrics.
    """
    wanted = cfg.get("latent_metrics", True) and OmegaConf.select(cfg, "eval.sample_quality")
    if not wanted or rank_zero_only.rank != 0:
        return None
    if getattr(datamodule, "dataset", None) not in DATASETS:  # data=npz, image_folder
        log.info(
            "Sample-quality metrics (test/fd_*) need one of the 28x28 ten-class datasets "
            "(%s); skipped for this data.",
            ", ".join(DATASETS),
        )
        return None
    from ae_lightning.sample_quality import prepare_classifier, user_cache_dir  # on demand

    epochs = OmegaConf.select(cfg, "eval.classifier_epochs")
    folders = [datamodule.cache_dir, user_cache_dir() / datamodule.cache_dir.parent.name]
    return prepare_classifier(folders, datamodule.official_train_split(), epochs)
