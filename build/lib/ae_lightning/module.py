"""The LightningModule: an MLP autoencoder y = g(f(x)) trained on squared L2 loss."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ae_lightning.data import Batch, TrainBatch, steps_per_call_for
from ae_lightning.errors import UserError
from ae_lightning.nets import build_encoder_decoder, count_parameters

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class TrainingDivergedError(UserError):
    """The loss became NaN/infinite, or the model does no better than a constant image."""


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam at lr 1e-3, the reference workflow's setting (the configs choose per model)."""
    return torch.optim.Adam(params, lr=1e-3)


class Autoencoder(pl.LightningModule):
    """Holds the plain encoder f and decoder g; logs per-pixel MSE as ``<stage>/mse``.

    Built from sizes (not modules) so a checkpoint alone rebuilds the architecture.
    ``optimizer`` is a partial (``_partial_: true`` in Hydra) completed with the parameters;
    ``scheduler``, if given, a partial completed with the optimizer and stepped every epoch.

    ``steps_per_call=K > 1`` takes K optimizer steps per Lightning step, over a list of K
    minibatches from the data module (``data.steps_per_call``, the same config key). Each
    Lightning step costs ~0.3 ms of hooks and bookkeeping, as much as a whole step of the
    linear model on a CPU; paid once per K steps, it all but vanishes (BENCHMARKS.md).
    The maths is unchanged: the same minibatches, losses and Adam updates as K=1, and
    ``global_step`` and the loggers' x-axis still count optimizer steps. What differs: the
    per-step hooks (``on_before_backward``, ``on_after_backward``, ``on_before_optimizer_step``,
    ``on_before_zero_grad``) and per-batch callbacks run once per K steps, and Trainer options
    counted in batches (``val_check_interval``, ``limit_train_batches``) count lists. K=1 is
    plain Lightning automatic optimisation, for gradient clipping, accumulation or fp16.
    """

    def __init__(
        self,
        bottleneck: int = 2,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        decoder_hidden: Sequence[int] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        steps_per_call: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        self.encoder, self.decoder = build_encoder_decoder(
            bottleneck, hidden, activation, decoder_hidden
        )
        self.optimizer_factory = optimizer or default_optimizer
        self.scheduler_factory = scheduler
        self.steps_per_call = steps_per_call
        # Val MSE of always predicting the mean image, for the divergence check. The val set
        # is fixed, so it is measured in the first validation only (x.var is ~2 ms a batch).
        self._constant_mse: float | None = None
        self._constant_parts: list[torch.Tensor] = []
        self._stuck_since: float | None = None  # last epoch's val/mse, less a hair
        self.trained_epochs = 0  # epochs behind the weights, restored from checkpoints

    @property
    def automatic_optimization(self) -> bool:
        """Lightning's own loop for K=1 (and under DDP); the module's K-step loop otherwise."""
        return steps_per_call_for(self.steps_per_call, self._trainer) == 1

    @property
    def bottleneck(self) -> int:
        return self.encoder.bottleneck

    @property
    def num_parameters(self) -> int:
        return count_parameters(self)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """f: ``(B, 1, 28, 28)`` pixels in [0, 1] -> ``(B, z)`` codes."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """g: ``(B, z)`` codes -> ``(B, 1, 28, 28)`` pixels in (0, 1)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def setup(self, stage: str) -> None:
        if not self.automatic_optimization:
            # Lightning compares log_every_n_steps with its batch count, which counts calls
            # here, not steps; train/mse is logged per step by `_log_train_loss` instead.
            warnings.filterwarnings(
                "ignore", message=r"The number of training batches \(\d+\) is smaller than"
            )

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor | None:
        if self.automatic_optimization:
            return self._shared_step(batch, "train")
        return self._train_steps(batch if isinstance(batch, list) else [batch])

    def _train_steps(self, minibatches: list[Batch]) -> torch.Tensor | None:
        """One optimizer step per minibatch, inside one Lightning step (``steps_per_call``)."""
        lightning_optimizer = self.optimizers()
        optimizer = lightning_optimizer.optimizer
        trainer = self.trainer
        taken, loss = 0, None
        for x, _ in minibatches:
            if 0 <= trainer.max_steps <= self.global_step:
                break
            loss = F.mse_loss(self(x), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # What LightningOptimizer.step wraps around a step: global_step counts it.
            lightning_optimizer._on_before_step()
            optimizer.step()
            lightning_optimizer._on_after_step()
            taken += 1
            step = self.global_step - 1  # the step just taken, as K=1 logging numbers it
            if self._loggers_write_at(step):
                self._log_train_loss(loss, step)
        # Lightning counts this call as one batch; the loggers' x-axis should count steps.
        trainer.fit_loop.epoch_loop._batches_that_stepped += max(taken - 1, 0)
        return loss

    def _log_train_loss(self, loss: torch.Tensor, step: int) -> None:
        """train/mse at exactly the steps and x values where K=1 would log it."""
        value = float(loss.detach())  # one host sync per log_every_n_steps steps
        for logger in self.loggers:
            logger.log_metrics({"train/mse": value, "epoch": self.current_epoch}, step=step)
        self.log("train/mse", value, on_step=True, on_epoch=False, logger=False)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, _ = batch
        loss = F.mse_loss(self(x), x)  # mean squared error per pixel
        training = stage == "train"
        if stage == "val" and self._constant_mse is None:
            self._constant_parts.append(x.var(dim=0, unbiased=False).mean())
        if training and not self._loggers_write_at(self.global_step):
            return loss
        # Logged tensors stay on the device; Lightning reduces them without a per-step sync.
        self.log(
            f"{stage}/mse",
            loss,
            on_step=training,
            on_epoch=not training,
            # Progress-bar metrics are turned into Python floats at every step (a host-device
            # sync on a GPU), so only the once-per-epoch val/test values go there.
            prog_bar=not training,
            batch_size=x.shape[0],
            sync_dist=not training,
        )
        return loss

    def _fused_where_supported(self) -> dict[str, bool]:
        """``fused=True`` for optimizers with a fused kernel (Adam, AdamW, SGD...) on CPU/CUDA.

        One kernel per step instead of several per tensor: on 2 CPU cores it cuts a
        hidden1024 epoch from ~5.5 s to ~4 s. Skipped where the config already chose
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

    def _loggers_write_at(self, step: int) -> bool:
        """True on the steps where the loggers write (every ``log_every_n_steps``).

        ``self.log`` costs ~0.7 ms on the CPU, as much as a whole step of the linear model,
        so the training loss is handed over only when a logger will read it.
        """
        every = self.trainer.log_every_n_steps
        return every > 0 and (step + 1) % every == 0

    def on_train_epoch_end(self) -> None:
        self.trained_epochs = self.current_epoch + 1
        if not self.automatic_optimization:  # Lightning steps schedulers only in its own loop
            for config in self.trainer.lr_scheduler_configs:
                config.scheduler.step()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints are written at the end of epoch `epoch` (0-based) validation.
        self.trained_epochs = checkpoint.get("epoch", -1) + 1

    def on_validation_epoch_start(self) -> None:
        self._constant_parts = []

    def on_validation_epoch_end(self) -> None:
        """Stop a diverged run before its epoch is checkpointed (one host sync per epoch)."""
        if self.trainer.sanity_checking:
            return
        if self._constant_mse is None:
            if not self._constant_parts:
                return
            self._constant_mse = float(torch.stack(self._constant_parts).mean())
        mse = float(self.trainer.callback_metrics.get("val/mse", float("nan")))
        constant = self._constant_mse
        epoch = self.current_epoch + 1
        if not math.isfinite(mse):
            problem = f"val/mse became {mse} at epoch {epoch}"
        elif self._stuck_since is not None and mse > 1.5 * constant and mse >= self._stuck_since:
            # No progress since the previous epoch while far worse than a constant image:
            # a saturated network. Slow learners are still improving, so they are not flagged.
            problem = (
                f"val/mse is stuck at {mse:.4f} at epoch {epoch}, far worse than always "
                f"predicting the mean image ({constant:.4f}): the network saturated"
            )
        else:
            self._stuck_since = mse * (1 - 1e-4)
            return
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        raise TrainingDivergedError(
            f"Training diverged: {problem} with learning rate {lr:g}; lower it, e.g. "
            f"model.optimizer.lr={min(lr / 10, 1e-3):g}. What was logged so far stays in the "
            "run folder."
        )

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        optimizer = self.optimizer_factory(self.parameters(), **self._fused_where_supported())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
