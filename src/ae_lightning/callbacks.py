"""Read-only observers of training: progress display and figures (TensorBoard + PNG)."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from ae_lightning.atomic import write_atomic
from ae_lightning.cpu import THREADS_AUTO, ThreadSearch, available_cores
from ae_lightning.data import to_unit_float
from ae_lightning.errors import UserError
from ae_lightning.latent import (
    CodeSampler,
    check_sampler,
    crossfade,
    decode_codes,
    default_codes,
    encode_images,
    fit_projection,
    interpolate,
    manifold_grid,
    pick_pair,
)
from ae_lightning.loggers import send_to_image_loggers
from ae_lightning.nets import IMAGE_SHAPE
from ae_lightning.plots import (
    curves_figure,
    interpolation_figure,
    manifold_figure,
    reconstructions_figure,
    render_rgb,
    samples_figure,
    scatter_figure,
)
from ae_lightning.tb import padded_codes

if TYPE_CHECKING:  # matplotlib is imported by the first figure saved
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
# Per-epoch lines: the entry points' logging config shows them plainly and keeps them in
# train.log; without any logging configured (a notebook, a test) they are printed.
progress_log = logging.getLogger("ae_lightning.progress")


def progress_display(refresh_every_steps: int = 25, steps_per_call: int = 1) -> Callback:
    """A Rich progress bar on a terminal; one plain summary line per epoch otherwise.

    Logs and CI output stay readable (no carriage-return bars), and a terminal user
    still sees live progress. Refreshing about every ``refresh_every_steps`` optimizer
    steps keeps its cost small.
    """
    if sys.stdout.isatty():
        return StepProgressBar(refresh_every_steps)
    return EpochSummary()


class StepProgressBar(ProgressBar):
    """A Rich bar per epoch in the plain line's terms: optimizer steps, epochs from 1, train terms.

    Lightning's own bar counts its calls, each of ``engine.steps_per_call`` optimizer steps,
    and numbers epochs from 0 (``Epoch 0/0 ... 22/22`` for a one-epoch run of 430 steps);
    this one shows ``Epoch 1/1 ... 430/430`` with ``train/mse`` beside it, and ``val/mse``
    once the epoch's validation is done. Validation and
    test take a fraction of a second from memory and get no bar. Each epoch's finished bar
    stays on screen.
    """

    def __init__(self, refresh_every_steps: int = 25) -> None:
        super().__init__()
        self.refresh_every_steps = max(1, refresh_every_steps)
        self._enabled = True
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._first_step = 0
        self._shown_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        self._close()
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) else ""
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[terms]}"),
            auto_refresh=False,
        )
        self._progress.start()
        self._first_step = self._shown_step = trainer.global_step
        self._task = self._progress.add_task(
            f"Epoch {trainer.current_epoch + 1}{epochs}", total=self._steps_in_epoch(), terms=""
        )
        self._progress.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._progress is None and self._enabled:  # resumed mid-epoch: no epoch start
            self.on_train_epoch_start(trainer, pl_module)
            steps = self._steps_in_epoch()
            done = 0 if steps is None else trainer.global_step - trainer.current_epoch * steps
            self._first_step = trainer.global_step - max(0, done)
        if self._progress is None:
            return
        step = trainer.global_step
        if step - self._shown_step >= self.refresh_every_steps:
            self._show(trainer, step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._progress is not None:
            self._show(trainer, trainer.global_step)
            self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _steps_in_epoch(self) -> int | None:
        """Optimizer steps this epoch, as the module counts them (its calls of K minibatches,
        gradient accumulation), else Lightning's batch count; None: of unknown length."""
        count = getattr(self.trainer.lightning_module, "optimizer_steps_per_epoch", None)
        steps = count() if callable(count) else self.total_train_batches
        return None if steps is None or math.isinf(steps) else int(steps)

    def _show(self, trainer: pl.Trainer, step: int) -> None:
        terms = "  ".join(
            f"{name} {float(value):.5f}"
            for name, value in trainer.callback_metrics.items()
            if name.startswith(("train/", "val/"))
        )  # values already read at the logging steps and validation: no device sync here
        self._progress.update(self._task, completed=step - self._first_step, terms=terms)
        self._progress.refresh()
        self._shown_step = step

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress, self._task = None, None


class EpochSummary(Callback):
    """Prints ``epoch 3/25  train/mse 0.0213  val/mse 0.0205  4.9 s`` after each epoch.

    The time is the run's ``EpochTimer``'s (one clock for the line, TensorBoard and
    ``metrics.json``); without one the line has no time.
    """

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics  # one host sync per epoch, not per step
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        parts += [
            f"{name} {float(metrics[name]):.5f}"
            for name in ("train/mse", "val/mse")
            if name in metrics
        ]
        timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
        if timer is not None:
            parts.append(f"{timer.seconds(trainer.current_epoch, pl_module):.1f} s")
        if progress_log.handlers:
            progress_log.info("  ".join(parts))
        else:
            print("  ".join(parts), flush=True)


class EpochTimer(Callback):
    """Wall time of each training epoch (its validation and checkpointing included).

    Logged as ``time/epoch_s``; ``train()`` copies the list into ``metrics.json`` and the
    progress line reads it. On a GPU it waits for queued kernels once per epoch so the time
    is real.
    """

    def __init__(self) -> None:
        self.epoch_times: list[float] = []
        self._start = 0.0
        self._by_epoch: dict[int, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.epoch_times, self._by_epoch = [], {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    on_train_start = on_train_epoch_start  # a run resumed mid-epoch skips the epoch start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = self.seconds(trainer.current_epoch, pl_module)
        self.epoch_times.append(seconds)
        for logger in trainer.loggers:
            logger.log_metrics({"time/epoch_s": seconds}, step=trainer.global_step)

    def seconds(self, epoch: int, pl_module: pl.LightningModule) -> float:
        """Epoch ``epoch``'s time, measured once when first asked at its end."""
        if epoch not in self._by_epoch:
            self._sync(pl_module)
            self._by_epoch[epoch] = time.perf_counter() - self._start
        return self._by_epoch[epoch]

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


class EpochHistory(Callback):
    """Per-epoch train and val terms, learning rate and epoch time, for ``metrics.json``.

    The train terms are the mean of the values the module read at its logging steps during
    the epoch (it reads them only there, to keep host syncs off the other steps; a call of
    ``steps_per_call`` steps may hold several); val terms are the epoch's. The rows travel
    in checkpoints, so a resumed run keeps its history.
    ``figures/curves.png`` draws them when training ends.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._trained = False  # whether this process fitted: a test then keeps its rows
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a resumed run's rows arrive later, through load_state_dict
            self.rows, self._sums, self._counts = [], {}, {}
            self._trained = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trained = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        read = pl_module.train_terms_read  # floats the module already read: no device sync
        for values in read:
            for name, value in values.items():
                self._sums[name] = self._sums.get(name, 0.0) + value
                self._counts[name] = self._counts.get(name, 0) + 1
        read.clear()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row: dict[str, float] = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step}
        row.update({name: total / self._counts[name] for name, total in self._sums.items()})
        metrics = trainer.callback_metrics
        row.update({k: float(v) for k, v in metrics.items() if k.startswith("val/")})
        if trainer.optimizers:
            row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        timer = next((c for c in trainer.callbacks if isinstance(c, EpochTimer)), None)
        if timer is not None:
            row["epoch_s"] = round(timer.seconds(trainer.current_epoch, pl_module), 4)
        self.rows.append(row)
        self._sums, self._counts = {}, {}

    def state_dict(self) -> dict[str, list[dict[str, float]]]:
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, list[dict[str, float]]]) -> None:
        if self._trained:  # testing best.ckpt after training: an earlier
            return  # point of the rows this callback already holds, which run to the end
        rows = state_dict.get("rows") if isinstance(state_dict, dict) else None
        if isinstance(rows, list):  # plain numbers only: a received checkpoint is data
            self.rows = [
                {str(k): v for k, v in row.items() if type(v) in (int, float)}
                for row in rows
                if isinstance(row, dict)
            ]


class CurvesFigure(Callback):
    """``figures/curves.png`` when training ends: the run's ``EpochHistory``, drawn."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = next((c for c in trainer.callbacks if isinstance(c, EpochHistory)), None)
        if not trainer.is_global_zero or history is None:
            return
        fig = curves_figure(history.rows, f"training curves: {describe(pl_module)}")
        if fig is not None:
            save_png(render_rgb(fig), Path(trainer.default_root_dir) / "figures" / "curves.png")


class CpuThreads(Callback):
    """Torch's intra-op thread count while a CPU run fits and tests (``engine.threads``).

    A number forces that count. ``auto`` on a single-process CPU run times the training
    steps at the current count and its neighbours and keeps the fastest (``ThreadSearch``),
    so another busy process on the machine slows epochs little; the count it picks depends
    on the load, and with it the last bits of the results. The process's own count comes
    back when each stage ends.
    """

    def __init__(self, threads: int | str = THREADS_AUTO) -> None:
        self.threads = threads
        self.search: ThreadSearch | None = None
        self._restore: int | None = None
        self._settled = 0  # the count the last search chose (logged when it changes)
        self._batch_start = 0.0
        self._batch_step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore = torch.get_num_threads()
        if self.threads != THREADS_AUTO:
            torch.set_num_threads(int(self.threads))
            if stage == "fit":
                log.info("CPU threads: %s (engine.threads)", self.threads)
        elif stage == "fit":
            ceiling = min(self._restore, available_cores())
            alone_on_cpu = trainer.strategy.root_device.type == "cpu" and trainer.world_size == 1
            # DDP ranks share the cores already (cpu.share_cores); a GPU run barely uses them.
            # CPU reductions round differently with another count, so a run that asks for
            # determinism (trainer.deterministic=true) keeps the count it has.
            searches = alone_on_cpu and not torch.are_deterministic_algorithms_enabled()
            self.search = ThreadSearch(ceiling, ceiling) if searches and ceiling > 1 else None
            self._settled = ceiling
        elif self.search is not None:
            torch.set_num_threads(self.search.threads)  # the test after fit: the chosen count

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.search is not None:
            torch.set_num_threads(self.search.start())

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.search is not None:
            self._batch_start, self._batch_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self.search is None:
            return
        was_searching, before = self.search.searching, torch.get_num_threads()
        threads = self.search.record(
            time.perf_counter() - self._batch_start, trainer.global_step - self._batch_step
        )
        if threads != before:
            torch.set_num_threads(threads)
        if was_searching and not self.search.searching and threads != self._settled:
            log.info("CPU threads: %d of %d, the fastest now", threads, self.search.ceiling)
            self._settled = threads

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_threads()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_threads()

    def _restore_threads(self) -> None:
        if self._restore is not None:
            torch.set_num_threads(self._restore)
            self._restore = None


class TrainingDivergedError(UserError):
    """The loss became NaN/infinite, or the model does no better than a constant image."""


class DivergenceCheck(Callback):
    """Stops a diverged run after validation, before its epoch is checkpointed.

    Diverged: ``val/mse`` is not finite, or it made no progress since the previous epoch
    while far worse than always predicting the mean validation image (a saturated network;
    slow learners still improve, so they are not flagged). One host sync per epoch.
    """

    def __init__(self, monitor: str = "val/mse", factor: float = 1.5) -> None:
        self.monitor, self.factor = monitor, factor
        self._constant_mse: float | None = None
        self._previous: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._constant_mse, self._previous = None, None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        mse = float(trainer.callback_metrics.get(self.monitor, float("nan")))
        epoch = trainer.current_epoch + 1
        constant = self._constant(trainer)
        if not math.isfinite(mse):
            problem = f"{self.monitor} became {mse} at epoch {epoch}"
        elif self._previous is not None and mse > self.factor * constant and mse >= self._previous:
            problem = (
                f"{self.monitor} is stuck at {mse:.4f} at epoch {epoch}, far worse than always "
                f"predicting the mean image ({constant:.4f}): the network saturated"
            )
        else:
            self._previous = mse * (1 - 1e-4)
            return
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        raise TrainingDivergedError(
            f"Training diverged: {problem} with learning rate {lr:g}; lower it, e.g. "
            f"model.optimizer.lr={min(lr / 10, 1e-3):g}. What was logged so far stays in the "
            "run folder."
        )

    def _constant(self, trainer: pl.Trainer) -> float:
        """Val MSE of always predicting the mean val image (the val set is fixed: once)."""
        if self._constant_mse is None:
            split = getattr(trainer.datamodule, "split", None)
            if split is None:
                return math.inf
            images = to_unit_float(split("val")[0])
            self._constant_mse = float(images.var(dim=0, unbiased=False).mean())
        return self._constant_mse


# --- figures ----------------------------------------------------------------------------


def describe(pl_module: pl.LightningModule) -> str:
    """``MLP 784-1024-2`` (``VAE 784-1024-2``) style name of the model, for figure titles."""
    hidden = list(pl_module.hparams.get("hidden") or [])
    kind = getattr(pl_module, "label", "MLP")
    pixels = math.prod(getattr(pl_module, "image_shape", IMAGE_SHAPE))
    return f"{kind} " + "-".join(str(s) for s in [pixels, *hidden, pl_module.hparams["bottleneck"]])


def tensorboard_of(trainer: pl.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


_warned_no_tensorboard: set[int] = set()
# TensorBoard's Time Series sorts its card groups by tag and opens on the first: the figures'
# group sorts after `train/`, `val/` and the comparison's `versus/`, so the curves come first.
TENSORBOARD_FIGURE_GROUP = "views"


@contextmanager
def observing(pl_module: pl.LightningModule) -> Iterator[None]:
    """Eval mode without gradients for a read-only look; the module's mode is restored."""
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        pl_module.train(was_training)


class FigureCallback(Callback):
    """Draws one figure every ``every_n_epochs`` epochs and once more after the final test.

    Periodic figures go to TensorBoard (and, if ``save_epoch_pngs``, to
    ``figures/epochs/``); the final one, drawn from the checkpoint the test used, goes to
    TensorBoard and to ``figures/<name>.png``. A failed write warns and training goes on.
    """

    name = "figure"

    def __init__(self, every_n_epochs: int = 5, save_epoch_pngs: bool = False) -> None:
        self.every_n_epochs = every_n_epochs
        self.save_epoch_pngs = save_epoch_pngs

    def make_figure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, title: str
    ) -> Figure | None:
        raise NotImplementedError

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0 and not last:
            title = f"{describe(pl_module)} · epoch {epoch}"
            # Lightning logs the epoch's val/mse at its last batch's step: the figure beside it.
            self._emit(trainer, pl_module, title, final=False, step=trainer.global_step - 1)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        score = getattr(checkpoint, "best_model_score", None)
        where = f"best checkpoint, val/mse {float(score):.4f}" if score is not None else "final"
        epochs = getattr(pl_module, "trained_epochs", trainer.current_epoch)
        title = f"{describe(pl_module)} · {epochs} epochs ({where})"
        self._emit(trainer, pl_module, title, final=True, step=trainer.global_step)

    @rank_zero_only
    def _emit(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        title: str,
        final: bool,
        step: int,
    ) -> None:
        with observing(pl_module):
            fig = self.make_figure(trainer, pl_module, title)
        if fig is None:
            return
        rgb = render_rgb(fig)
        tensorboard = tensorboard_of(trainer)
        if tensorboard is not None:
            try:
                tensorboard.experiment.add_image(
                    f"{TENSORBOARD_FIGURE_GROUP}/{self.name}", rgb, step, dataformats="HWC"
                )
            except OSError as err:
                log.warning("Could not log figure %s to TensorBoard: %s", self.name, err)
        sent = send_to_image_loggers(trainer, self.name, rgb, final)  # MLflow
        if tensorboard is None and not sent and id(trainer) not in _warned_no_tensorboard:
            _warned_no_tensorboard.add(id(trainer))
            log.warning("No TensorBoard logger (nor MLflow): figures are saved as PNG only.")
        folder = Path(trainer.default_root_dir) / "figures"
        if final:
            save_png(rgb, folder / f"{self.name}.png")
        elif self.save_epoch_pngs:
            save_png(
                rgb, folder / "epochs" / f"{self.name}_epoch{trainer.current_epoch + 1:03d}.png"
            )


def save_png(rgb: np.ndarray, path: Path) -> None:
    """Write atomically (``write_atomic``); on failure warn and carry on."""
    import matplotlib.image

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: matplotlib.image.imsave(f, rgb, format="png"))
    except OSError as err:
        log.warning("Could not write figure %s: %s", path, err)


class CodesCache(Callback):
    """Codes of a split, computed once per (step, stage) and shared by all figures of a run.

    One instance per run (``callbacks.codes_cache``), emptied in ``setup``; figures ask
    through ``CodesCache.get``, which computes without caching when the run has none.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._store: dict[tuple, torch.Tensor] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._key, self._store = None, {}

    @classmethod
    def get(
        cls, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str, limit: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache = next((c for c in trainer.callbacks if isinstance(c, cls)), None) or cls()
        return cache.codes(trainer, pl_module, split, limit)

    def codes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str, limit: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (trainer.global_step, trainer.state.stage)
        if key != self._key:
            self._key, self._store = key, {}
        images, labels = trainer.datamodule.split(split)
        images, labels = images[:limit], labels[:limit]
        if (split, limit) not in self._store:
            self._store[(split, limit)] = encode_images(
                pl_module.encode, images, device=pl_module.device
            )
        return self._store[(split, limit)], labels


class ScatterFigure(FigureCallback):
    """The test set's codes coloured by label; PCA (or the first two axes) above 2-D."""

    name = "scatter"

    def __init__(self, projection: str = "pca", max_points: int = 10_000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.projection, self.max_points = projection, max_points

    def make_figure(self, trainer, pl_module, title):
        codes, labels = CodesCache.get(trainer, pl_module, "test", self.max_points)
        projection = fit_projection(codes, self.projection)
        if codes.shape[1] > 2:
            how = "PCA" if projection.method == "pca" else "first two coordinates"
            what = f"{codes.shape[1]}-D test codes, {how}"
        else:
            what = "2-D test codes"
        data = trainer.datamodule
        labelled = getattr(data, "has_labels", True)
        if not labelled:
            what += ", not coloured (the data has no labels)"
        return scatter_figure(
            projection(codes), labels if labelled else None, f"{what}\n{title}",
            projection.axis_labels, class_names=getattr(data, "class_names", None),
            label_word=getattr(data, "label_word", "class"),
        )  # fmt: skip


class ReconstructionsFigure(FigureCallback):
    """The first ``n`` test images and their reconstructions (the same images in every run)."""

    name = "reconstructions"

    def __init__(self, n: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n

    def make_figure(self, trainer, pl_module, title):
        images, _ = trainer.datamodule.probe_images(self.n)
        reconstructions = pl_module(images.to(pl_module.device)).cpu()
        mse = float(((reconstructions - images) ** 2).mean())
        return reconstructions_figure(
            images, reconstructions, f"First {self.n} test images, MSE {mse:.4f}\n{title}"
        )


class InterpolationFigure(FigureCallback):
    """Decode the straight line between two test images' codes; the pixel cross-fade below."""

    name = "interpolation"

    def __init__(
        self, steps: int = 11, pair: Sequence[int] | None = None, seed: int = 0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.steps, self.pair, self.seed = steps, pair, seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        split = getattr(trainer.datamodule, "split", None)
        if self.pair is None or split is None:
            return
        count = len(split("test")[0])  # the config checked MNIST's; other data is read now
        if not all(0 <= int(i) < count for i in self.pair):
            raise UserError(
                f"callbacks.{self.name}.pair={list(self.pair)} is not two test-image indices "
                f"from 0 to {count - 1} (this data's test set): use e.g. "
                f"callbacks.{self.name}.pair=[0,1], or null for a random pair."
            )

    def make_figure(self, trainer, pl_module, title):
        images, labels = trainer.datamodule.split("test")
        first, second = self.pair if self.pair is not None else pick_pair(labels, self.seed)
        ends = to_unit_float(images[[first, second]]).to(pl_module.device)
        z = pl_module.encode(ends)
        latent = pl_module.decode(interpolate(z[0], z[1], self.steps)).cpu()
        pixels = crossfade(ends[0].cpu(), ends[1].cpu(), self.steps)
        names = getattr(trainer.datamodule, "class_names", None)
        if names == ():  # label-free data
            digits = f"test #{first} → #{second}"
        else:
            names = names or [str(d) for d in range(10)]
            digits = (
                f"test #{first} (a {names[int(labels[first])]}) → "
                f"#{second} (a {names[int(labels[second])]})"
            )
        return interpolation_figure(
            [latent, pixels],
            ["through the\nbottleneck", "pixel\ncross-fade"],
            f"Interpolation {digits}\n{title}",
        )


class SamplesFigure(FigureCallback):
    """``n`` images decoded from random codes drawn by ``sampler`` (see ``latent.SAMPLERS``).

    ``auto`` asks the model: its own prior (``prior_sample``; a VAE's N(0, I)), or for a
    model with none its ``fitted_sampler`` fitted to the training codes (a Gaussian; an RAE's
    10-component GMM).
    """

    name = "samples"

    def __init__(
        self, n: int = 64, sampler: str = "auto", fit_on: int = 10_000, seed: int = 0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if sampler != "auto":
            check_sampler(sampler)  # fail at start-up, not at the first figure
        self.n, self.sampler, self.fit_on, self.seed = n, sampler, fit_on, seed

    def make_figure(self, trainer, pl_module, title):
        def train_codes() -> torch.Tensor:
            return CodesCache.get(trainer, pl_module, "train", self.fit_on)[0]

        if self.sampler == "auto":  # the sampler test/fd_samples judges too
            drawn, what = default_codes(pl_module, self.n, self.seed, train_codes)
        else:
            sampler = CodeSampler(self.sampler, train_codes(), seed=self.seed)
            drawn, what = sampler.sample(self.n), sampler.description
        images = decode_codes(pl_module.decode, drawn, pl_module.device)
        return samples_figure(images, f"Decoded samples: {what}\n{title}")


class ManifoldFigure(FigureCallback):
    """For 2-D codes: decode an ``n x n`` grid over the 1st-99th percentile of the codes."""

    name = "manifold"

    def __init__(
        self, n: int = 20, percentiles: Sequence[float] = (1.0, 99.0), fit_on: int = 10_000,
        **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.n, self.percentiles, self.fit_on = n, tuple(percentiles), fit_on

    def make_figure(self, trainer, pl_module, title):
        if pl_module.hparams["bottleneck"] != 2:
            return None
        codes, _ = CodesCache.get(trainer, pl_module, "train", self.fit_on)
        grid, xs, ys = manifold_grid(codes, self.n, self.percentiles)
        images = decode_codes(pl_module.decode, grid, pl_module.device)
        low, high = self.percentiles
        return manifold_figure(
            images, xs, ys, f"Decoded {self.n}x{self.n} grid over the {low:g}-{high:g}th "
            f"percentiles of the training codes\n{title}",
        )  # fmt: skip


class EmbeddingProjector(Callback):
    """After the final test: test codes with digit labels and thumbnails for the Projector tab.

    Codes narrower than 3 columns get zero columns (named in the tensor's tag), since the
    Projector's PCA draws nothing for them otherwise; distances are unchanged.
    """

    def __init__(self, n: int = 2000) -> None:
        self.n = n

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tensorboard = tensorboard_of(trainer)
        if tensorboard is None:
            return
        with observing(pl_module):
            codes, labels = CodesCache.get(trainer, pl_module, "test", self.n)
        images, _ = trainer.datamodule.probe_images(self.n)
        padded, added = padded_codes(codes)
        tag = f"test_codes_{codes.shape[1]}d" + (f"_plus_{added}_zero_columns" if added else "")
        try:
            tensorboard.experiment.add_embedding(
                padded, metadata=[str(int(d)) for d in labels], label_img=images,
                global_step=trainer.global_step, tag=tag,
            )  # fmt: skip
        except OSError as err:
            log.warning("Could not write the embedding projector data: %s", err)
