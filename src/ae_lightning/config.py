"""Checks of the composed config, in one place, before anything is built or trained.

Each failure is one sentence that names the bad value and how to fix it.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ae_lightning.cpu import THREADS_AUTO
from ae_lightning.engine import CUDA_GRAPH_CHOICES
from ae_lightning.errors import UserError
from ae_lightning.limits import check_model_size
from ae_lightning.nets import ACTIVATIONS, PIXELS

MNIST_TRAIN_IMAGES = 60_000
MNIST_TEST_IMAGES = 10_000  # MNIST, Fashion-MNIST and KMNIST alike
MNIST_TARGET = "ae_lightning.data.MNISTDataModule"  # other data's counts are known once read
# The step loop, data and engine compute in float32 (or autocast from it); 64-bit would meet
# float32 batches in the first matrix product.
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true", "bf16-true")
PROJECTIONS = ("pca", "first_two")
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

    if is_mnist(cfg):
        check_model_size_for(cfg, PIXELS)  # other data: once its images are read

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
    # Other data: the data module checks both against the images it reads.
    train_images = MNIST_TRAIN_IMAGES if is_mnist(cfg) else math.inf
    if not is_mnist(cfg):
        _positive_int(val_size, "data.val_size", "use e.g. data.val_size=1000")
    elif not _is_int(val_size) or not 0 < val_size < MNIST_TRAIN_IMAGES:
        raise UserError(
            f"data.val_size={val_size!r} must be a whole number between 1 and "
            f"{MNIST_TRAIN_IMAGES - 1} so both validation and training get images: "
            "use e.g. data.val_size=5000."
        )
    train_size = train_images - val_size
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
    precision = cfg.trainer.get("precision")
    if str(precision) not in PRECISIONS:
        raise UserError(
            f"trainer.precision={precision!r} is not a precision this package trains in: use "
            f"trainer.precision=32-true (or one of {', '.join(PRECISIONS)})."
        )
    _check_eval(cfg)
    if cfg.get("test_ckpt") not in ("best", "last"):
        raise UserError(f"test_ckpt={cfg.get('test_ckpt')!r} is not a choice: use best or last.")
    _check_scheduler(cfg)
    _check_figures(cfg)


def _target_name(node: Any) -> str:
    """``torch.optim.lr_scheduler.StepLR`` -> ``StepLR`` ("" without a ``_target_``)."""
    target = node.get("_target_") if OmegaConf.is_dict(node) or isinstance(node, dict) else None
    return str(target).rsplit(".", 1)[-1] if target else ""


def is_mnist(cfg: DictConfig) -> bool:
    """MNIST, Fashion-MNIST or KMNIST: 60k training images of 28x28, known before reading."""
    return str(cfg.data.get("_target_", MNIST_TARGET)) == MNIST_TARGET


def check_model_size_for(cfg: DictConfig, pixels: int) -> None:
    """Refuse, by arithmetic, a model too large to build (``limits.check_model_size``) for
    images of ``pixels`` values."""
    model = cfg.model
    decoder = model.get("decoder_hidden")
    family = _family_class(model)
    check_model_size(
        int(model.get("bottleneck", cfg.bottleneck)), [int(s) for s in model.get("hidden") or []],
        None if decoder is None else [int(s) for s in decoder], pixels,
        where=f"bottleneck={cfg.bottleneck} with model.hidden={list(model.get('hidden') or [])}",
        code_outputs=int(getattr(family, "code_outputs", 1)),
        extra_parameters=_extra_parameters(family, model, pixels),
    )  # fmt: skip


def _family_class(model: DictConfig) -> type | None:
    """The family class the config names (the user's own command line and conf/, trusted)."""
    module, _, name = str(model.get("_target_")).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # a bad `_target_`: building the model refuses it in its own sentence
        return None


def _extra_parameters(family: type | None, model: DictConfig, pixels: int) -> int:
    """The family's parameters beyond its MLPs (pseudo-inputs, codebooks) for these knobs."""
    count = getattr(family, "extra_parameters", None)
    try:
        return int(count(int(model.get("bottleneck", 2)), dict(model), pixels)) if count else 0
    except (TypeError, ValueError):  # a knob of the wrong type: the family's own check says so
        return 0


def _check_scheduler(cfg: DictConfig) -> None:
    scheduler = cfg.model.get("scheduler") or {}
    if _target_name(scheduler) == "StepLR":
        _positive_int(
            scheduler.get("step_size"), "model.scheduler.step_size",
            "the lr changes every step_size epochs; use e.g. model.scheduler.step_size=10",
        )  # fmt: skip


def _check_figures(cfg: DictConfig) -> None:
    """The figure settings, which are otherwise used only after the whole training."""
    every = _select(cfg, "figures.every_n_epochs")
    if every is not None and (not _is_int(every) or every < 0):
        raise UserError(
            f"figures.every_n_epochs={every!r} is not a whole number of at least 0: use e.g. "
            "figures.every_n_epochs=5, or 0 for the final figures only."
        )
    for name, node in (cfg.get("callbacks") or {}).items():
        kind = _target_name(node) if node is not None else ""
        if kind == "ScatterFigure" and node.get("projection", "pca") not in PROJECTIONS:
            raise UserError(
                f"callbacks.{name}.projection={node.get('projection')!r} is not a projection: "
                f"use callbacks.{name}.projection=pca or first_two."
            )
        if kind == "InterpolationFigure":
            pair = node.get("pair")
            if pair is None:
                continue
            # other data: InterpolationFigure checks the bound once the test set is read
            test_images = MNIST_TEST_IMAGES if is_mnist(cfg) else math.inf
            ok = (
                (OmegaConf.is_list(pair) or isinstance(pair, list)) and len(pair) == 2
                and all(_is_int(i) and 0 <= i < test_images for i in pair)
                and pair[0] != pair[1]
            )  # fmt: skip
            if not ok:
                shown = list(pair) if OmegaConf.is_list(pair) else pair
                raise UserError(
                    f"callbacks.{name}.pair={shown!r} is not two different test-image indices "
                    f"from 0 to {MNIST_TEST_IMAGES - 1}: use e.g. callbacks.{name}.pair=[0,1], "
                    "or null for a random pair."
                )


def _check_eval(cfg: DictConfig) -> None:
    """``eval.*``: the test NLL's sample and image counts."""
    samples = _select(cfg, "eval.nll_samples")
    if samples is not None and (not _is_int(samples) or samples < 0):
        raise UserError(
            f"eval.nll_samples={samples!r} is not a whole number >= 0: use e.g. "
            "eval.nll_samples=100 (5000 for the papers' numbers, 0 for no test/nll)."
        )
    images = _select(cfg, "eval.nll_images")
    if images is not None:
        _positive_int(images, "eval.nll_images", "use e.g. eval.nll_images=1000, or null for all")
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
    flush = _select(cfg, "engine.flush_denormals")
    if not isinstance(flush, bool):
        raise UserError(
            f"engine.flush_denormals={flush!r} is not true or false: use "
            "engine.flush_denormals=true (faster CPU epochs) or false (keep denormal floats)."
        )
    threads = _select(cfg, "engine.threads")
    if threads != THREADS_AUTO and (not _is_int(threads) or threads < 1):
        raise UserError(
            f"engine.threads={threads!r} is not a thread count: use engine.threads=auto, or a "
            "whole number from 1 up, e.g. engine.threads=1."
        )
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
