"""MLflow as a logger: a local store that MLflow 3 accepts, and figures sent to it.

TensorBoard gets its images in ``callbacks.FigureCallback``; CSV stores no images; the PNG
files in ``figures/`` are written whatever the loggers.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger

log = logging.getLogger(__name__)
FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"


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


def send_to_image_loggers(trainer: pl.Trainer, name: str, rgb: np.ndarray, final: bool) -> bool:
    """Log ``rgb`` (H, W, 3 uint8) as ``figures/<name>`` to every MLflow logger.

    Periodic figures become MLflow images at the global step (its UI shows them as a step
    slider); the final one also becomes the artifact ``figures/<name>.png``. Returns whether
    any logger took the image.
    """
    sent = False
    for logger in trainer.loggers:
        if not isinstance(logger, MLFlowLogger):
            continue
        try:
            client, run_id = logger.experiment, logger.run_id
            client.log_image(run_id, rgb, key=f"figures/{name}", step=trainer.global_step)
            if final:
                client.log_image(run_id, rgb, artifact_file=f"figures/{name}.png")
            sent = True
        except Exception as err:  # a full disk or a lost server must not stop training
            log.warning("Could not log figure %s to MLflow: %s", name, err)
    return sent
