"""TensorBoard, MLflow and Weights & Biases as loggers, and the figures sent to them.

TensorBoard gets its tags in the order its Time Series opens them (``tb.tensorboard_tag``).
MLflow gets a local store that MLflow 3 accepts; W&B runs offline unless an account is set
up. TensorBoard gets its images in ``callbacks.FigureCallback``; CSV stores no images; the
PNG files in ``figures/`` are written whatever the loggers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

from ae_lightning.tb import tensorboard_tag

log = logging.getLogger(__name__)
FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
WANDB_HOST = "api.wandb.ai"


class CurvesFirstTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger, its tags renamed so TensorBoard opens on the curves.

    Time Series expands the first two tag groups by name; Lightning's ``epoch`` counter,
    LearningRateMonitor's ``lr-Adam`` and the final ``test/*`` points would take those
    places from ``train/`` and ``val/``. Other loggers keep the names as logged.
    """

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        tagged = {tensorboard_tag(name): value for name, value in metrics.items()}
        tagged.pop(None, None)
        super().log_metrics(tagged, step)


class LocalMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger, allowed to use a plain folder as its store.

    MLflow 3 refuses a folder store unless ``MLFLOW_ALLOW_FILE_STORE=true``; its database
    store needs the full mlflow package. Opting in here, only when this logger is chosen
    and only for a folder, keeps ``logger=mlflow`` working with the light mlflow-skinny.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        uri = kwargs.get("tracking_uri")
        if uri is None or str(uri).startswith("file:"):
            os.environ.setdefault(FILE_STORE_OPT_IN, "true")
        super().__init__(*args, **kwargs)


def wandb_account_configured() -> bool:
    """Whether W&B can reach an account: an API key, a chosen mode, or a login in ~/.netrc.

    ``wandb login`` writes its key to ``~/.netrc``; without any of these an online run would
    stop to ask for a key, so the logger goes offline instead.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return netrc.is_file() and WANDB_HOST in netrc.read_text(errors="replace")
    except OSError:
        return False


class OfflineFirstWandbLogger(WandbLogger):
    """Lightning's W&B logger, offline unless an account is configured (``offline: auto``).

    An offline run lands in ``<save_dir>/wandb/offline-run-*`` and uploads later with
    ``wandb sync``. Lightning finalizes a logger after fit and again after test, so the W&B
    run stays open until the next job's logger is built (or the process exits): the jobs of
    a sweep in one process get one W&B run each instead of sharing the first.
    """

    def __init__(self, *args: Any, offline: bool | str = "auto", **kwargs: Any) -> None:
        import wandb

        if wandb.run is not None:  # the previous job's run, in a sweep of one process
            wandb.run.finish()
        if offline == "auto":
            offline = not wandb_account_configured()
        super().__init__(*args, offline=bool(offline), **kwargs)


def send_to_image_loggers(trainer: pl.Trainer, name: str, rgb: np.ndarray, final: bool) -> bool:
    """Log ``rgb`` (H, W, 3 uint8) as ``figures/<name>`` to every MLflow and W&B logger.

    Periodic figures become images at the global step (both UIs show them as a step slider);
    for MLflow the final one also becomes the artifact ``figures/<name>.png``. Returns whether
    any logger took the image.
    """
    sent = False
    for logger in trainer.loggers:
        try:
            if isinstance(logger, MLFlowLogger):
                client, run_id = logger.experiment, logger.run_id
                client.log_image(run_id, rgb, key=f"figures/{name}", step=trainer.global_step)
                if final:
                    client.log_image(run_id, rgb, artifact_file=f"figures/{name}.png")
            elif isinstance(logger, WandbLogger):
                logger.log_image(f"figures/{name}", [rgb], step=trainer.global_step)
            else:
                continue
            sent = True
        except Exception as err:  # a full disk or a lost server must not stop training
            log.warning("Could not log figure %s to %s: %s", name, type(logger).__name__, err)
    return sent
