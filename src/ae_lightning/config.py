"""Checks of the composed config, in one place, before anything is built or trained.

Each failure is one sentence that names the bad value and how to fix it.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ae_lightning.engine import CUDA_GRAPH_CHOICES
from ae_lightning.errors import UserError
from ae_lightning.nets import ACTIVATIONS

MNIST_TRAIN_IMAGES = 60_000
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seeds are unsigned 32-bit


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(value: Any, key: str, hint: str) -> None:
    if not _is_int(value) or value < 1:
        raise UserError(f"{key}={value!r} is not a positive whole number: {hint}.")


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def validate_config(cfg: DictConfig) -> None:
    """Raise ``UserError`` for the first bad value in ``cfg``; return quietly otherwise."""
    _positive_int(
        _select(cfg, "bottleneck"), "bottleneck", "use e.g. bottleneck=2 or bottleneck=10"
    )

    seed = _select(cfg, "seed")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise UserError(
            f"seed={seed!r} is not a whole number from 0 to {MAX_SEED}: use e.g. seed=0."
        )

    model = cfg.model
    activation = model.get("activation", "relu")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise UserError(
            f"model.activation={activation!r} is not an activation: use e.g. "
            f"model.activation=relu (one of {', '.join(sorted(ACTIVATIONS))})."
        )
    for key in ("hidden", "decoder_hidden"):
        sizes = model.get(key)
        if sizes is None:
            continue
        if isinstance(sizes, str) or not OmegaConf.is_list(sizes) and not isinstance(sizes, list):
            raise UserError(
                f"model.{key}={sizes!r} is not a list of layer sizes: use e.g. model.{key}=[1024]."
            )
        for size in sizes:
            if not _is_int(size) or size < 1:
                raise UserError(
                    f"model.{key}={list(sizes)} has the size {size!r}: every layer size must be "
                    f"a positive whole number; use e.g. model.{key}=[1024]."
                )

    optimizer = model.get("optimizer") or {}
    for key in ("lr", "weight_decay"):
        value = optimizer.get(key)
        if value is None and key == "weight_decay":
            continue
        if (
            not _is_number(value)
            or not math.isfinite(value)
            or value < 0
            or (key == "lr" and value == 0)
        ):
            kind = "positive" if key == "lr" else "non-negative"
            raise UserError(
                f"model.optimizer.{key}={value!r} is not a {kind} number: "
                f"use e.g. model.optimizer.{key}={'1e-3' if key == 'lr' else '1e-5'}."
            )

    data = cfg.data
    val_size = data.get("val_size")
    if not _is_int(val_size) or not 0 < val_size < MNIST_TRAIN_IMAGES:
        raise UserError(
            f"data.val_size={val_size!r} must be a whole number between 1 and "
            f"{MNIST_TRAIN_IMAGES - 1} so both validation and training get images: "
            "use e.g. data.val_size=5000."
        )
    train_size = MNIST_TRAIN_IMAGES - val_size
    for key in ("batch_size", "eval_batch_size"):
        value = data.get(key)
        _positive_int(value, f"data.{key}", f"use e.g. data.{key}=128")
        if key == "batch_size" and value > train_size:
            raise UserError(
                f"data.batch_size={value} is larger than the {train_size} training images: "
                "use e.g. data.batch_size=128."
            )
    if data.get("loader") not in ("memory", "dataloader"):
        raise UserError(
            f"data.loader={data.get('loader')!r} is not a loader: use data.loader=memory "
            "(tensors on the device) or data.loader=dataloader (a torch DataLoader)."
        )

    _check_engine(cfg)
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs != -1:
        _positive_int(max_epochs, "trainer.max_epochs", "use e.g. trainer.max_epochs=25")
    if cfg.get("test_ckpt") not in ("best", "last"):
        raise UserError(f"test_ckpt={cfg.get('test_ckpt')!r} is not a choice: use best or last.")
    sample_quality = _select(cfg, "eval.sample_quality")
    if sample_quality not in (None, True, False):
        raise UserError(
            f"eval.sample_quality={sample_quality!r} is not true or false: use "
            "eval.sample_quality=false to skip the sample-quality metrics."
        )
    if sample_quality:
        _positive_int(
            _select(cfg, "eval.classifier_epochs"), "eval.classifier_epochs",
            "use e.g. eval.classifier_epochs=2",
        )  # fmt: skip


def _check_engine(cfg: DictConfig) -> None:
    """``engine.*`` and the Trainer's per-step options that the module's step loop applies."""
    _positive_int(
        _select(cfg, "engine.steps_per_call"), "engine.steps_per_call",
        "use e.g. engine.steps_per_call=20, or 1 for one optimizer step per Lightning step",
    )  # fmt: skip
    graphs = _select(cfg, "engine.cuda_graphs")
    if graphs not in CUDA_GRAPH_CHOICES:
        raise UserError(f"engine.cuda_graphs={graphs!r} is not a choice: use auto, true or false.")
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    _positive_int(
        accumulate, "trainer.accumulate_grad_batches", "use e.g. trainer.accumulate_grad_batches=2"
    )
    clip = cfg.trainer.get("gradient_clip_val")
    if clip is not None and (not _is_number(clip) or not math.isfinite(clip) or clip < 0):
        raise UserError(
            f"trainer.gradient_clip_val={clip!r} is not a non-negative number: use e.g. "
            "trainer.gradient_clip_val=1.0, or null for no clipping."
        )
