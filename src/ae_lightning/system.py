"""The training system: one LightningModule base that trains any model, knowing none.

``TrainingSystem`` owns how a model is trained (the step loop, optimizers, schedulers, the
step engine, logging); a subclass says what is trained and what it optimises. The model
families (``ae_lightning.models``) are such subclasses.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ae_lightning.checkpointing import guard_optimizer_load, sound_tensor
from ae_lightning.data import Batch, TrainBatch
from ae_lightning.engine import (
    EngineOptimizer,
    EngineOptions,
    GraphedSteps,
    StepMode,
    choose_step_mode,
    scheduler_blocker,
    steps_without_closure,
)
from ae_lightning.errors import UserError
from ae_lightning.nets import count_parameters

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
SCHEDULER_INTERVALS = ("epoch", "step")

log = logging.getLogger(__name__)


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam at lr 1e-3, the reference workflow's setting (the configs choose per model)."""
    return torch.optim.Adam(params, lr=1e-3)


def align_logger_step(trainer: pl.Trainer) -> None:
    """Number what Lightning logs by optimizer steps, however many one call took.

    Lightning numbers logged values (``val/mse``, the learning-rate monitor, ``epoch``) by
    its count of training batches that stepped, which goes up by one per call whatever the
    number of optimizer steps inside it; it is private (``_batches_that_stepped``) and has
    no public setter. After each call it is set to the optimizer steps taken less the one
    Lightning adds itself. This is the package's only private Lightning name (a test keeps
    it so; pyproject.toml pins the Lightning versions it was tested with).
    """
    trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step - 1


class TrainingSystem(pl.LightningModule):
    """Trains a subclass's objective through Lightning's manual optimisation.

    What a subclass gives (the objective; everything else here is shared):

    - ``training_loss(x) -> (loss, terms)``: the scalar to minimise on a minibatch ``x`` and
      named terms, logged as ``train/<name>``. Tensor maths only (no host reads, no Python
      values that change per step): with CUDA graphs on it is captured once and replayed.
    - ``evaluation_terms(x) -> terms``: per-batch means logged as ``val/<name>`` and
      ``test/<name>``; ``mse`` (per pixel) is the number every model reports.
    - ``graph_blocker``: why ``training_loss`` cannot be replayed from a CUDA graph (e.g. it
      reads the step count), or None.
    - ``family``: the class's name in checkpoints (``model_family``), unique per class.
    - ``image_shape``: ``(C, H, W)`` of the images ``x`` it takes.

    Training is one loop over the minibatches that arrive: one optimizer step per minibatch,
    K minibatches per Lightning step when the data module sends lists of K
    (``engine.steps_per_call``). Lightning's hooks and bookkeeping per call, as costly as a
    whole small-model step on a CPU (BENCHMARKS.md), are then paid once per K steps, while
    the maths, ``global_step`` and the loggers' x-axis stay those of one step per call. On
    CUDA each step can be replayed from a captured graph (``engine.cuda_graphs``, see
    ``ae_lightning.engine``); accumulation and clipping (``engine``) are applied here.

    ``optimizer`` is a partial (``_partial_: true`` in Hydra) completed with the parameters;
    ``scheduler``, if given, a partial completed with the optimizer (and ``total_steps`` if it
    takes them, for one-cycle), stepped every ``scheduler_interval`` (``epoch`` or ``step``);
    ``ReduceLROnPlateau`` is stepped with the epoch's ``scheduler_monitor`` value.
    Constructor arguments are saved as hyperparameters (all levels of a subclass's
    ``__init__``), so a checkpoint alone rebuilds the model: build from sizes, not modules.
    """

    family = ""  # saved in checkpoints: `runfolder.load_autoencoder` picks the class by it

    def __init__(
        self,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        engine: EngineOptions | Mapping[str, Any] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/mse",
    ) -> None:
        super().__init__()
        # Collects the subclasses' own arguments too (Lightning walks the __init__ frames).
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "engine"], logger=False)
        self.automatic_optimization = False  # the step loop below, for every K and DDP
        check_choice("model.scheduler_interval", scheduler_interval, SCHEDULER_INTERVALS)
        self.optimizer_factory = optimizer or default_optimizer
        self.scheduler_factory = scheduler or None  # an empty scheduler config means none
        self.scheduler_interval, self.scheduler_monitor = scheduler_interval, scheduler_monitor
        self.engine = engine if isinstance(engine, EngineOptions) else EngineOptions(**engine or {})
        self.step_mode: StepMode | None = None  # chosen with the optimizer
        self._graphed: GraphedSteps | None = None
        self._engine_optimizer: EngineOptimizer | None = None
        self._accumulated = 0  # minibatches whose gradients wait for the next step
        self._plain_backward = False  # loss.backward() suffices (see `_backward_needs_lightning`)
        self.trained_epochs = 0  # epochs behind the weights, restored from checkpoints
        # The train terms read at each logging step, until a callback takes them (the
        # epoch history): a call of K steps can hold several logging steps.
        self.train_terms_read: list[dict[str, float]] = []

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)

    @property
    def graph_blocker(self) -> str | None:
        """Why this model's loss cannot be replayed from a CUDA graph (None: it can).

        A captured graph replays the tensor maths of its capture step; a loss that reads a
        Python value that changes per step (the step count) would be frozen at that value.
        """
        return None

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar to minimise on ``x`` and named terms (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} gives no training_loss")

    def evaluation_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch means logged as ``val/<name>`` and ``test/<name>`` (at least ``mse``)."""
        raise NotImplementedError(f"{type(self).__name__} gives no evaluation_terms")

    # --- steps ----------------------------------------------------------------------------
    def validation_names(self) -> list[str]:
        """The metrics every epoch's validation logs (``val/<term>``): what a scheduler, early
        stopping or a checkpoint can monitor.

        The terms depend on the family and its settings (an IWAE's ``bound``, a VAE's ``loss``
        only when beta != 1), so they are read from a copy's evaluation of a blank batch: a
        monitor naming another key is refused before training, not after an epoch. The copy
        and the forked generators leave this model and the run's random streams untouched.
        """
        probe = copy.deepcopy(self).cpu().eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            terms = probe.evaluation_terms(torch.full((2, *self.image_shape), 0.5))
        return sorted(f"val/{name}" for name in terms)

    def training_step(self, batch: TrainBatch, batch_idx: int) -> None:
        """One optimizer step per minibatch that arrives (a list of K, or one alone)."""
        minibatches = batch if isinstance(batch, list) else [batch]
        optimizer = self.optimizers()
        trainer = self.trainer
        last_call = batch_idx + 1 >= trainer.num_training_batches
        for index, (x, _) in enumerate(minibatches):
            if 0 <= trainer.max_steps <= self.global_step:
                break
            end_of_epoch = last_call and index == len(minibatches) - 1
            terms = self._optimizer_step(optimizer, x, end_of_epoch)
            if terms is None:  # gradients accumulate towards the next step
                continue
            step = self.global_step - 1  # the step just taken, as one step per call numbers it
            self._step_schedulers("step")
            if self._loggers_write_at(step):
                self._log_train_terms(terms, step)
        if 0 <= trainer.max_steps <= self.global_step and not last_call:
            # Lightning validates a run that max_steps ends mid-epoch only when it is asked
            # to stop: else its last steps go unvalidated and the best checkpoint misses them.
            trainer.should_stop = True
        align_logger_step(trainer)

    def _optimizer_step(
        self, optimizer: torch.optim.Optimizer, x: torch.Tensor, end_of_epoch: bool
    ) -> dict[str, torch.Tensor] | None:
        """Forward, backward and update on ``x``; the loss terms, or None while accumulating."""
        if self._graphed is not None:
            _, terms = self._graphed.step(x)  # the update is applied already (or replayed)
            self._engine_optimizer.update_applied = True
            optimizer.step()  # Lightning counts the step and runs its hooks
            return terms
        loss, terms = self.training_loss(x)
        every = self.engine.accumulate_grad_batches
        loss = loss / every if every > 1 else loss
        if self._plain_backward:
            loss.backward()  # what manual_backward does here, less its hook dispatch
        else:
            self.manual_backward(loss)
        if every > 1:  # (an nn.Module attribute write is not free: only when accumulating)
            self._accumulated += 1
            if self._accumulated < every and not end_of_epoch:
                return None
            self._accumulated = 0
        optimizer.step()  # clipping, if asked for, runs in on_before_optimizer_step
        optimizer.zero_grad(set_to_none=True)
        return terms

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Here, not before optimizer.step(): with fp16, Lightning unscales the gradients first.
        if self.engine.clips:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.engine.gradient_clip_val,
                gradient_clip_algorithm=self.engine.gradient_clip_algorithm,
            )

    def _log_train_terms(self, terms: dict[str, torch.Tensor], step: int) -> None:
        """``train/<name>`` at exactly the steps and x values of one step per call."""
        values = {f"train/{name}": float(value.detach()) for name, value in terms.items()}  # sync
        self.train_terms_read.append(values)
        for logger in self.loggers:
            logger.log_metrics({**values, "epoch": self.current_epoch}, step=step)
        for name, value in values.items():  # for the progress display only
            self.log(name, value, on_step=True, on_epoch=False, logger=False)

    def _loggers_write_at(self, step: int) -> bool:
        """True on the steps where the loggers write (every ``log_every_n_steps``).

        ``self.log`` costs about as much as a whole step of the linear model on the CPU, and
        reading a loss is a host sync, so the terms are read only when a logger writes.
        """
        every = self.trainer.log_every_n_steps
        return every > 0 and (step + 1) % every == 0

    def _step_schedulers(self, interval: str) -> None:
        """Manual optimisation steps the schedulers itself, as Lightning's own loop would."""
        for config in self.trainer.lr_scheduler_configs:
            count = self.global_step if interval == "step" else self.current_epoch + 1
            if config.interval != interval or count % config.frequency:
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                # Lightning keeps no `monitor` under manual optimisation: the module's own.
                metric = self.trainer.callback_metrics.get(self.scheduler_monitor)
                if metric is not None:
                    config.scheduler.step(metric)
            else:
                config.scheduler.step()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._log_evaluation(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._log_evaluation(batch, "test")

    def _log_evaluation(self, batch: Batch, stage: str) -> None:
        x, _ = batch
        # Logged tensors stay on the device; Lightning averages them once per epoch.
        for name, value in self.evaluation_terms(x).items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=False,
                on_epoch=True,
                prog_bar=name == "mse",
                batch_size=x.shape[0],
                sync_dist=True,
            )

    # --- optimizers -----------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        optimizer = self._make_optimizer()
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, **self._schedule_length())
        # (No "monitor": Lightning ignores it under manual optimisation, and says so; the
        # plateau scheduler reads `scheduler_monitor` in `_step_schedulers`.)
        description = {"scheduler": scheduler, "interval": self.scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": description}

    def _schedule_length(self) -> dict[str, int]:
        """``total_steps`` for schedulers that need the run's length (one-cycle), if not set.

        Counted in optimizer steps: Lightning counts a list of K minibatches as one batch, so
        the loader's own minibatch count is used where it has one (a DataLoader sends one
        minibatch per call, so Lightning's count is right there).
        """
        target = getattr(self.scheduler_factory, "func", None)
        chosen = getattr(self.scheduler_factory, "keywords", None) or {}
        if target is None or "total_steps" not in inspect.signature(target).parameters:
            return {}
        if chosen.get("total_steps") or chosen.get("epochs"):
            return {}
        length = self._run_length()
        return {} if length is None else {"total_steps": length}

    def _run_length(self) -> int | None:
        """The optimizer steps this run takes in all, None if unbounded (loads the data).

        One step every ``accumulate_grad_batches`` minibatches and at each epoch's end: the
        module accumulates, so Lightning's own estimate counts minibatches, not steps.
        """
        trainer = self.trainer
        estimate = trainer.estimated_stepping_batches  # sets the training data up
        if trainer.max_epochs is None or trainer.max_epochs < 0:  # max_steps, or unbounded
            return None if math.isinf(estimate) else int(estimate)
        per_epoch = self.optimizer_steps_per_epoch()
        if per_epoch is None:
            return None
        total = per_epoch * trainer.max_epochs
        if trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
        return total

    def optimizer_steps_per_epoch(self) -> int | None:
        """Optimizer steps in one epoch (None: an epoch of unknown length), once the training
        data is set up: a call of K minibatches is K steps, though Lightning counts one batch,
        and accumulating takes a step every ``accumulate_grad_batches`` and at the end."""
        trainer = self.trainer
        loader, calls = trainer.train_dataloader, trainer.num_training_batches
        if math.isinf(calls):
            return None
        per_call = getattr(loader, "steps_per_call", 1)  # a DataLoader sends one minibatch
        minibatches = min(getattr(loader, "num_minibatches", calls * per_call), calls * per_call)
        return math.ceil(minibatches / self.engine.accumulate_grad_batches)

    def _refuse_a_short_one_cycle(self) -> None:
        """torch ends a one-cycle schedule with a ValueError at the first step past its
        ``total_steps``: a run longer than the schedule it set or restored is refused now."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
                continue
            length = self._run_length()
            if length is None or scheduler.total_steps >= length:
                continue
            if self.trainer.ckpt_path is not None:
                per_epoch = max(length // max(self.trainer.max_epochs or 1, 1), 1)
                raise UserError(
                    f"{self.trainer.ckpt_path} holds a one-cycle schedule of "
                    f"{scheduler.total_steps} steps, and torch cannot stretch one once begun: "
                    f"keep trainer.max_epochs={max(scheduler.total_steps // per_epoch, 1)} "
                    f"(this run would take {length} steps), or train the longer run from the "
                    "start."
                )
            raise UserError(
                f"model.scheduler.total_steps={scheduler.total_steps} is shorter than this run's "
                f"{length} optimizer steps, and torch stops a one-cycle at its end: raise it to "
                f"{length}, or leave it out to have the run's length filled in."
            )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer; capturable and wrapped when the steps run as a graph."""
        extra = self._fused_where_supported()
        optimizer = self.optimizer_factory(self.parameters(), **extra)
        guard_optimizer_load(optimizer)  # a resumed state fits it and keeps its kernel flags
        try:
            trainer = self.trainer
        except RuntimeError:  # called alone (a notebook, a test): one eager process
            trainer = None
        precision = str(trainer.precision) if trainer is not None else "32-true"
        world_size = trainer.world_size if trainer is not None else 1
        self.step_mode = choose_step_mode(
            self.engine, self.device.type, type(optimizer), precision, world_size,
            self.graph_blocker or scheduler_blocker(self.scheduler_factory),
        )  # fmt: skip
        forced = self.engine.cuda_graphs is True and not self.step_mode.graphed
        if trainer is None or trainer.is_global_zero:
            log.log(logging.WARNING if forced else logging.INFO, self.step_mode.describe())
        self._graphed = self._engine_optimizer = None
        if not self.step_mode.graphed:
            # Wrapped only where the wrapper can skip an unobserved hook dispatch: one 32-bit
            # process (fp16's scaler and DDP call the optimizer their own way).
            if (
                trainer is not None  # (alone, no hooks are dispatched: the plain optimizer)
                and world_size == 1
                and precision == "32-true"
                and steps_without_closure(type(optimizer))
            ):
                self._engine_optimizer = EngineOptimizer.around(optimizer)
                return self._engine_optimizer
            return optimizer
        capturable = self.device.type == "cuda"  # (elsewhere only in tests, see test_engine)
        optimizer = self.optimizer_factory(self.parameters(), **extra, capturable=capturable)
        guard_optimizer_load(optimizer)
        self._graphed = GraphedSteps(self.training_loss, optimizer, self.engine.warmup_steps)
        self._engine_optimizer = EngineOptimizer.around(optimizer)
        return self._engine_optimizer

    def _fused_where_supported(self) -> dict[str, bool]:
        """``fused=True`` for optimizers with a fused kernel (Adam, AdamW, SGD...) on CPU/CUDA.

        One kernel per step instead of several per tensor, a large share of a small model's
        step (BENCHMARKS.md). Skipped where the config already chose
        ``fused`` or ``foreach``.
        """
        target = getattr(self.optimizer_factory, "func", None)
        chosen = getattr(self.optimizer_factory, "keywords", None) or {}
        if (
            self.device.type not in ("cpu", "cuda")
            or target is None
            or {"fused", "foreach"} & set(chosen)
        ):
            return {}
        return {"fused": True} if "fused" in inspect.signature(target).parameters else {}

    # --- hooks ----------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._refuse_a_short_one_cycle()  # after a checkpoint's schedule is restored
        self._restore_rng()
        self._plain_backward = not self._backward_needs_lightning()
        if self._engine_optimizer is not None:
            self._engine_optimizer.closure_needed = self._optimizer_step_observed()

    def _optimizer_step_observed(self) -> bool:
        """Whether anything listens to ``on_before_optimizer_step``: a callback or module
        that overrides it, or this module's own while it clips gradients."""
        return self.engine.clips or _overridden(
            self.trainer, ("on_before_optimizer_step",), module_base=TrainingSystem
        )

    def _backward_needs_lightning(self) -> bool:
        """Whether ``manual_backward`` does more here than ``loss.backward()``.

        It scales fp16 losses, syncs DDP gradients and runs the ``on_before_backward`` /
        ``on_after_backward`` hooks; in one 32-bit process with no such hook it adds only the
        hook dispatch, about as costly as a ``linear`` step itself on a CPU.
        """
        trainer = self.trainer
        if trainer.world_size > 1 or str(trainer.precision) != "32-true":
            return True
        return _overridden(trainer, ("on_before_backward", "on_after_backward"))

    def on_train_epoch_start(self) -> None:
        if self._accumulated:  # an epoch of unknown length left gradients unstepped
            self.optimizers().zero_grad(set_to_none=True)
        self._accumulated = 0

    def on_train_epoch_end(self) -> None:
        self.trained_epochs = self.current_epoch + 1
        self._step_schedulers("epoch")
        self.train_terms_read.clear()  # taken by now, if anyone wanted them: stays bounded

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_family"] = self.family
        # What the next step draws (a VAE's noise, dynamic binarisation, corruption): a
        # resumed run draws the same, so it ends as the uninterrupted one.
        checkpoint[RNG_KEY] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_initialized():
            checkpoint[RNG_KEY]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints are written at the end of epoch `epoch` (0-based) validation.
        self.trained_epochs = checkpoint.get("epoch", -1) + 1
        self._restored_rng = rng_states(checkpoint.get(RNG_KEY))

    def _restore_rng(self) -> None:
        """The generators as the checkpoint left them, once the sanity check (which draws
        from them too) is over; a state of the wrong shape or kind is left out."""
        states, self._restored_rng = getattr(self, "_restored_rng", None), None
        if states is None:
            return
        torch.set_rng_state(states["cpu"])
        if "cuda" in states:
            torch.cuda.set_rng_state_all(states["cuda"])


RNG_KEY = "ae_rng_states"


def rng_states(saved: Any) -> dict[str, Any] | None:
    """A checkpoint's generator states if they fit this process (one torch wrote here: a
    CPU state of the same size, one CUDA state per visible device), else None."""
    if not isinstance(saved, dict):
        return None
    cpu, own = saved.get("cpu"), torch.get_rng_state()
    if not _state_like(cpu, own):
        return None
    states: dict[str, Any] = {"cpu": cpu}
    cuda = saved.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        own_cuda = torch.cuda.get_rng_state_all()
        fits = isinstance(cuda, list) and len(cuda) == len(own_cuda)
        if fits and all(map(_state_like, cuda, own_cuda)):
            states["cuda"] = cuda
    return states


def _state_like(state: Any, own: torch.Tensor) -> bool:
    return (
        isinstance(state, torch.Tensor)
        and state.dtype == own.dtype
        and state.shape == own.shape
        and state.device.type == "cpu"
        and sound_tensor(state)
    )


class GeometricStagesLR(torch.optim.lr_scheduler.LambdaLR):
    """Stage i of ``stages`` lasts ``growth**i`` parts of the run at lr * ``decay**i``.

    Burda et al. 2016's schedule is stages=8, growth=3, decay=10**(-1/7): 3^i passes over
    the data at 1e-3 * 10^(-i/7) for i = 0..7, 3280 passes in all. Stepped every optimizer
    step over ``total_steps`` (the run's length, filled in by ``TrainingSystem``), so a
    shorter run keeps the same stages in proportion. A resumed run keeps the stages it
    started with (``stage_ends`` travels in the state): trained past their end, it stays at
    the last stage's lr instead of jumping back to an earlier stage's higher one.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        stages: int = 8,
        growth: float = 3.0,
        decay: float = 10 ** (-1 / 7),
        last_epoch: int = -1,
    ) -> None:
        parts = [growth**i for i in range(stages)]
        ends, done = [], 0.0
        for part in parts:
            done += part
            ends.append(done / sum(parts) * total_steps)
        self.stage_ends = ends  # the step at which each stage ends; restored on a resume

        def factor(step: int) -> float:  # the restored ends, not those built above
            stage = next((i for i, end in enumerate(self.stage_ends) if step < end), stages - 1)
            return decay**stage

        super().__init__(optimizer, factor, last_epoch)


def _overridden(
    trainer: pl.Trainer, hooks: Sequence[str], module_base: type = pl.LightningModule
) -> bool:
    """Whether a callback of ``trainer`` or its module overrides one of ``hooks`` (beyond
    Lightning's no-ops, or beyond ``module_base``'s own for the module)."""
    listeners = [(type(callback), pl.Callback) for callback in trainer.callbacks]
    listeners.append((type(trainer.lightning_module), module_base))
    return any(
        getattr(kind, hook) is not getattr(base, hook) for kind, base in listeners for hook in hooks
    )


def check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not a choice: use one of {', '.join(choices)}.")
