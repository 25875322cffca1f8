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
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ae_lightning import tb
from ae_lightning.callbacks import EpochTimer
from ae_lightning.checkpointing import AtomicCheckpointIO, CheckpointOnSigterm
from ae_lightning.config import validate_config
from ae_lightning.data import DEFAULT_BATCH_SIZE, metric_suffix
from ae_lightning.errors import RunInterrupted, UserError
from ae_lightning.latent import encode_images, latent_quality
from ae_lightning.models import checkpoint_family
from ae_lightning.models.ae import Autoencoder
from ae_lightning.naming import read_varying  # (+ the run-folder name resolvers)
from ae_lightning.runfolder import load_autoencoder, load_checkpoint
from ae_lightning.runlock import RunFolderBusy, run_lock

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
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_JOB_TRAINERS: list[pl.Trainer] = []


def share_cores(processes: int) -> None:
    """Torch threads = this machine's cores / processes running at once (not cores each).

    Processes that each start a thread per core oversubscribe the cores and all run slower.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // max(1, processes)))


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
    reached = int(checkpoint.get("epoch", -1)) + 1  # the epoch it was trained in (1-based)
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs not in (None, -1) and max_epochs < reached:
        raise UserError(
            f"{path} has already trained into epoch {reached} but trainer.max_epochs="
            f"{max_epochs}: add trainer.max_epochs={reached} or more."
        )
    return str(path)


def resume_command(cfg: DictConfig) -> str:
    """The command line that continues this run in its own folder."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [o for o in overrides if not o.startswith(("resume=", "ckpt_path=", "+ckpt_path="))]
    script = Path(sys.argv[0]).name
    program = ["python", script] if script.endswith(".py") else [script]
    return shlex.join([*program, *kept, f"resume={Path(cfg.run_dir).resolve()}"])


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


def _sample_quality_classifier(cfg: DictConfig, datamodule: pl.LightningDataModule) -> Any:
    """The classifier ``test/fd_*`` are measured with, or None when they are off.

    Found in (or trained into) the data's cache before the run trains, so a damaged cache
    file is refused before any training. Rank zero only: it alone records the metrics.
    """
    wanted = cfg.get("latent_metrics", True) and OmegaConf.select(cfg, "eval.sample_quality")
    if not wanted or rank_zero_only.rank != 0:
        return None
    from ae_lightning.sample_quality import prepare_classifier  # torchmetrics' FID: on demand

    epochs = OmegaConf.select(cfg, "eval.classifier_epochs")
    return prepare_classifier(datamodule.cache_dir, datamodule.official_train_split(), epochs)


def _record(
    cfg: DictConfig,
    run_dir: Path,
    trainer: pl.Trainer,
    model: Autoencoder,
    datamodule: pl.LightningDataModule,
    metrics: dict[str, Any],
    classifier: Any = None,
) -> dict[str, Any]:
    """Add the latent- and sample-quality metrics, write metrics.json and the HParams record."""
    if trainer.is_global_zero and cfg.get("latent_metrics", True):
        model.eval()
        dataset = getattr(datamodule, "dataset", "mnist")
        quality = latent_quality(
            model.encode, model.decode, datamodule.split("train"), datamodule.split("test"),
            device=model.device, metric_names=[metric_suffix(dataset, c) for c in range(10)],
        )  # fmt: skip
        metrics.update(quality)
    if trainer.is_global_zero and classifier is not None:
        from ae_lightning.sample_quality import sample_quality

        def train_codes() -> torch.Tensor:  # what samples.png fits its Gaussian to
            return encode_images(model.encode, datamodule.split("train")[0][:10_000],
                                 device=model.device)  # fmt: skip

        test_set = datamodule.split("test")
        metrics.update(
            sample_quality(model, classifier, test_set, train_codes, cfg.seed, model.device)
        )
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
    shown = ("test/mse", "test/knn_acc", "test/probe_acc", "test/fd_samples", "test/fd_recon")
    log.info("Test metrics: %s", {k: round(metrics[k], 5) for k in shown if k in metrics})
    return metrics


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one autoencoder as ``cfg`` says; return the metrics in ``metrics.json``."""
    run_dir, datamodule = _prepare_run(cfg)
    model = build_model(cfg)
    ckpt_path = resume_checkpoint(cfg, model)  # refusals come before the Trainer's chatter
    classifier = _sample_quality_classifier(cfg, datamodule)
    on_sigterm = CheckpointOnSigterm(run_dir / "checkpoints")
    callbacks = [*_instantiate_group(cfg.get("callbacks")), on_sigterm]
    trainer = build_trainer(cfg, callbacks, _instantiate_group(cfg.get("logger")))

    start = time.perf_counter()
    try:
        with lightning_notices_filtered():
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        if on_sigterm.saved_step is None:
            raise
        command = resume_command(cfg)
        raise RunInterrupted(
            f"SIGTERM: stopped at step {on_sigterm.saved_step} (epoch "
            f"{trainer.current_epoch + 1}) and saved {on_sigterm.path}; resume with: {command}",
            command,
        ) from None
    train_time = time.perf_counter() - start  # (Ctrl-C: Lightning shuts down and exits in fit)

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
    if trainer.is_global_zero:  # the test result is safe on disk before anything else is tried
        write_json(run_dir / "metrics.json", metrics)
    return _record(cfg, run_dir, trainer, model, datamodule, metrics, classifier)


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
    run_dir, datamodule = _prepare_run(cfg)
    classifier = _sample_quality_classifier(cfg, datamodule)
    callbacks = [
        c for c in _instantiate_group(cfg.get("callbacks")) if not isinstance(c, ModelCheckpoint)
    ]
    trainer = build_trainer(cfg, callbacks, _instantiate_group(cfg.get("logger")))
    (test_metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    metrics: dict[str, Any] = {key: float(value) for key, value in test_metrics.items()}
    metrics.update(epochs=model.trained_epochs, test_checkpoint=str(path))
    return _record(cfg, run_dir, trainer, model, datamodule, metrics, classifier)


def ensure_writable_logs(argv: list[str] | None = None) -> None:
    """Exit with one sentence if the logs folder cannot be written, before Hydra tries to.

    Checks ``AE_LOGS_DIR`` (or ``logs/``) and any plain ``hydra.run.dir=``/``hydra.sweep.dir=``
    on the command line.
    """
    logs = Path(os.environ.get("AE_LOGS_DIR", "logs"))
    folders = [(logs, f"the logs folder {logs}", LOGS_FIX)]
    for arg in sys.argv[1:] if argv is None else argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            fix = f"point {key.lstrip('+')} at a writable folder"
            folders.append((Path(value), f"{key.lstrip('+')}={value}", fix))
    for folder, name, fix in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
        except OSError as err:
            reason = err.strerror or type(err).__name__
            print(f"error: {name} cannot be written ({reason}): {fix}.", file=sys.stderr)
            sys.exit(2)


LOGS_FIX = "make it writable or point AE_LOGS_DIR at a writable folder"


def _quiet_write_failures(args: threading.ExceptHookArgs) -> None:
    """A writer thread's disk error is re-raised in the main thread: no second traceback."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in WRITE_ERRORS:
        log.debug("A writer thread failed: %s", args.exc_value)
        return
    threading.__excepthook__(args)


WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EFBIG}


def _write_failure(err: BaseException, run_dir: Path) -> str:
    """One sentence for a failed write (full disk, read-only, I/O error), else ``""``.

    Removes the run's half-written ``*.tmp`` files; what was complete stays.
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
        f"writable, then continue with resume={run_dir}; {kept}."
    )


def _locked(run_dir: Path) -> contextlib.AbstractContextManager:
    """This process's hold on its run folder (rank zero only: DDP ranks share the folder)."""
    if rank_zero_only.rank != 0 or not run_dir.is_dir():
        return contextlib.nullcontext()
    return run_lock(run_dir)


HYDRA_STUB = {".hydra", ".hydra-resumed", "train.log", "eval.log"}


def _leave_refused(run_dir: Path, sentence: str) -> None:
    """A refused new run leaves no folder; one that got further keeps failed.json."""
    if not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} <= HYDRA_STUB:
        shutil.rmtree(run_dir, ignore_errors=True)  # only Hydra's config and log: no run
        return
    write_json(run_dir / "failed.json", {"status": "failed", "error": sentence})


def _stop_sweep(cfg: DictConfig, err: RunInterrupted) -> None:
    """Mark this job ``interrupted`` (with its resume command) and summarise the jobs so far."""
    write_json(
        Path(cfg.run_dir) / "interrupted.json",
        {"status": "interrupted", "error": str(err), "resume": err.resume_command},
    )
    from ae_lightning.sweep import SweepSummary  # the sweep layer sits above this one

    hydra = HydraConfig.get()
    settings = hydra.callbacks.get("sweep_summary") or {}
    summary = SweepSummary(
        enabled=bool(settings.get("enabled", True)),
        sampler=str(settings.get("sampler", "gaussian")),
        seed=int(settings.get("seed", 0)),
    )
    summary.summarise(Path(hydra.sweep.dir))


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
            if in_multirun():
                _stop_sweep(cfg, err)
            print(f"interrupted: {err}", file=sys.stderr, flush=True)
        sys.exit(143)  # 128 + SIGTERM, as a shell reports a process the signal ended
    except Exception as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        disk = _write_failure(err, Path(cfg.run_dir))
        if in_multirun():
            line = disk or f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.exception("Job failed; the sweep goes on: %s", line)
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
