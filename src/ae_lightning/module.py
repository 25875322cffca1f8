"""The LightningModules: an MLP autoencoder y = g(f(x)) trained on squared L2 loss, and a
variational autoencoder trained on the negative ELBO.

Each model says what it optimises in two methods, ``training_loss`` and ``evaluation_terms``;
the step loop, logging and scheduling are shared.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ae_lightning.data import Batch, TrainBatch, steps_per_call_for
from ae_lightning.errors import UserError
from ae_lightning.nets import OUTPUTS, build_encoder_decoder, count_parameters
from ae_lightning.objectives import (
    CORRUPTIONS,
    LIKELIHOODS,
    corrupt,
    gaussian_kl,
    kl_weight,
    reconstruction_nats,
    reparameterise,
)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
SCHEDULER_INTERVALS = ("epoch", "step")


class TrainingDivergedError(UserError):
    """The loss became NaN/infinite, or the model does no better than a constant image."""


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam at lr 1e-3, the reference workflow's setting (the configs choose per model)."""
    return torch.optim.Adam(params, lr=1e-3)


class Autoencoder(pl.LightningModule):
    """Holds the plain encoder f and decoder g; logs per-pixel MSE as ``<stage>/mse``.

    Built from sizes (not modules) so a checkpoint alone rebuilds the architecture.
    ``optimizer`` is a partial (``_partial_: true`` in Hydra) completed with the parameters;
    ``scheduler``, if given, a partial completed with the optimizer (and ``total_steps`` if it
    takes them, for one-cycle), stepped every ``scheduler_interval`` (``epoch`` or ``step``);
    ``ReduceLROnPlateau`` is stepped with the epoch's ``scheduler_monitor`` value.

    ``dropout`` drops hidden units in training; ``output`` is the decoder's last layer:
    ``sigmoid`` (pixels in (0, 1), like the targets) or ``linear`` (unbounded; the loss is MSE
    either way). ``corruption`` (``gaussian`` noise of std ``corruption_level``, or ``mask``:
    pixels zeroed with probability ``corruption_level``) makes a denoising autoencoder: the
    input is corrupted in training only, the target and every evaluation stay clean.

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

    family = "ae"  # recorded in checkpoints so `load_autoencoder` rebuilds the right class
    variational = False

    def __init__(
        self,
        bottleneck: int = 2,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        decoder_hidden: Sequence[int] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        steps_per_call: int = 1,
        dropout: float = 0.0,
        output: str = "sigmoid",
        corruption: str = "none",
        corruption_level: float = 0.0,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/mse",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)
        _check_choice("model.output", output, OUTPUTS)
        _check_choice("model.corruption", corruption, CORRUPTIONS)
        _check_choice("model.scheduler_interval", scheduler_interval, SCHEDULER_INTERVALS)
        if not 0 <= dropout < 1:
            raise UserError(f"model.dropout={dropout!r} is not in [0, 1): use e.g. 0.1.")
        if corruption_level < 0 or (corruption == "mask" and corruption_level >= 1):
            raise UserError(
                f"model.corruption_level={corruption_level!r} does not suit "
                f"model.corruption={corruption}: use a noise std >= 0 or a mask probability "
                "in [0, 1), e.g. 0.2."
            )
        self.encoder, self.decoder = build_encoder_decoder(
            bottleneck, hidden, activation, decoder_hidden, dropout, output, self.variational
        )
        self.optimizer_factory = optimizer or default_optimizer
        self.scheduler_factory = scheduler or None  # an empty scheduler config means none
        self.scheduler_interval, self.scheduler_monitor = scheduler_interval, scheduler_monitor
        self.corruption, self.corruption_level = corruption, corruption_level
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

    @property
    def default_sampler(self) -> str:
        """What ``samples.png`` decodes by default: a Gaussian fitted to the codes (an AE has
        no prior of its own)."""
        return "gaussian"

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The minibatch's loss to backpropagate, and its named terms (logged ``train/<name>``)."""
        loss = F.mse_loss(self(corrupt(x, self.corruption, self.corruption_level)), x)
        return loss, {"mse": loss}

    def evaluation_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch means logged as ``val/<name>``, ``test/<name>`` (clean inputs always)."""
        return {"mse": F.mse_loss(self(x), x)}  # mean squared error per pixel

    def setup(self, stage: str) -> None:
        if not self.automatic_optimization:
            # Lightning compares log_every_n_steps with its batch count, which counts calls
            # here, not steps; train terms are logged per step by `_log_train_terms` instead.
            warnings.filterwarnings(
                "ignore", message=r"The number of training batches \(\d+\) is smaller than"
            )

    def training_step(self, batch: TrainBatch, batch_idx: int) -> torch.Tensor | None:
        if self.automatic_optimization:
            x, _ = batch
            loss, terms = self.training_loss(x)
            if self._loggers_write_at(self.global_step):
                for name, value in terms.items():
                    # Logged tensors stay on the device; no per-step host sync.
                    self.log(f"train/{name}", value, on_step=True, on_epoch=False,
                             batch_size=x.shape[0])  # fmt: skip
            return loss
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
            loss, terms = self.training_loss(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # What LightningOptimizer.step wraps around a step: global_step counts it.
            lightning_optimizer._on_before_step()
            optimizer.step()
            lightning_optimizer._on_after_step()
            self._step_schedulers("step")
            taken += 1
            step = self.global_step - 1  # the step just taken, as K=1 logging numbers it
            if self._loggers_write_at(step):
                self._log_train_terms(terms, step)
        # Lightning counts this call as one batch; the loggers' x-axis should count steps.
        trainer.fit_loop.epoch_loop._batches_that_stepped += max(taken - 1, 0)
        return loss

    def _log_train_terms(self, terms: dict[str, torch.Tensor], step: int) -> None:
        """train/<term> at exactly the steps and x values where K=1 would log it."""
        # One host sync per term per log_every_n_steps steps.
        values = {f"train/{name}": float(value.detach()) for name, value in terms.items()}
        for logger in self.loggers:
            logger.log_metrics({**values, "epoch": self.current_epoch}, step=step)
        for name, value in values.items():
            self.log(name, value, on_step=True, on_epoch=False, logger=False)

    def _step_schedulers(self, interval: str) -> None:
        """The module's K-step loop steps schedulers as Lightning's own loop would."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                # (Lightning drops `monitor` from the description under manual optimisation.)
                value = self.trainer.callback_metrics.get(config.monitor or self.scheduler_monitor)
                if value is not None:  # no validation this epoch: nothing to compare
                    config.scheduler.step(value)
            else:
                config.scheduler.step()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, _ = batch
        if stage == "val" and self._constant_mse is None:
            self._constant_parts.append(x.var(dim=0, unbiased=False).mean())
        for name, value in self.evaluation_terms(x).items():
            # Logged tensors stay on the device; Lightning reduces them without a per-step sync.
            self.log(
                f"{stage}/{name}", value, on_step=False, on_epoch=True,
                prog_bar=name == "mse", batch_size=x.shape[0], sync_dist=True,
            )  # fmt: skip

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
            self._step_schedulers("epoch")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["model_family"] = self.family

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
        scheduler = self.scheduler_factory(optimizer, **self._schedule_length())
        description = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            description["monitor"] = self.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": description}

    def _schedule_length(self) -> dict[str, int]:
        """``total_steps`` for schedulers that need the run's length (one-cycle), if not set.

        Counted in optimizer steps: Lightning counts a list of K minibatches as one batch, so
        the loader's own minibatch count is used where it has one (K times Lightning's count,
        an upper bound, otherwise).
        """
        target = getattr(self.scheduler_factory, "func", None)
        chosen = getattr(self.scheduler_factory, "keywords", None) or {}
        if target is None or "total_steps" not in inspect.signature(target).parameters:
            return {}
        if chosen.get("total_steps") or chosen.get("epochs"):
            return {}
        trainer = self.trainer
        calls = int(trainer.estimated_stepping_batches)  # also loads the training data
        per_epoch = getattr(trainer.train_dataloader, "num_minibatches", None)
        if per_epoch is None or trainer.max_epochs is None or trainer.max_epochs < 0:
            return {"total_steps": calls * steps_per_call_for(self.steps_per_call, trainer)}
        total = per_epoch * trainer.max_epochs
        if trainer.max_steps > 0:
            total = min(total, trainer.max_steps)
        return {"total_steps": total}


class VariationalAutoencoder(Autoencoder):
    """A VAE: q(z|x) = N(mean, diag(exp(log_var))) from the encoder, a N(0, I) prior.

    Trained on reconstruction + ``beta`` * KL (in nats per image, the negative ELBO when
    beta is 1) with one reparameterised sample per image; ``kl_warmup_steps`` ramps beta up
    linearly from 0 (against early posterior collapse). ``likelihood``: ``bernoulli``
    (binary cross-entropy, the usual MNIST choice; needs ``output=sigmoid``) or ``gaussian``
    (summed squared error). ``encode`` returns the mean code, so figures, probes and
    ``test/mse`` (the mean code's reconstruction) compare with any autoencoder.
    """

    family = "vae"
    variational = True

    def __init__(
        self,
        bottleneck: int = 2,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        decoder_hidden: Sequence[int] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        steps_per_call: int = 1,
        dropout: float = 0.0,
        output: str = "sigmoid",
        corruption: str = "none",
        corruption_level: float = 0.0,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/mse",
        beta: float = 1.0,
        likelihood: str = "bernoulli",
        kl_warmup_steps: int = 0,
    ) -> None:
        super().__init__(
            bottleneck, hidden, activation, decoder_hidden, optimizer, scheduler,
            steps_per_call, dropout, output, corruption, corruption_level,
            scheduler_interval, scheduler_monitor,
        )  # fmt: skip
        _check_choice("model.likelihood", likelihood, LIKELIHOODS)
        if likelihood == "bernoulli" and output != "sigmoid":
            raise UserError(
                f"model.likelihood=bernoulli needs pixels in (0, 1) but model.output={output}: "
                "use model.output=sigmoid, or model.likelihood=gaussian."
            )
        if beta < 0:
            raise UserError(f"model.beta={beta!r} is negative: use e.g. model.beta=1.")
        self.beta, self.likelihood, self.kl_warmup_steps = beta, likelihood, kl_warmup_steps

    @property
    def default_sampler(self) -> str:
        return "normal"  # the prior the KL term pulls the codes towards

    def _reconstruction(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Bernoulli reads logits (exact where the sigmoid saturates); Gaussian reads pixels.
        outputs = self.decoder.logits(z) if self.likelihood == "bernoulli" else self.decoder(z)
        return reconstruction_nats(outputs, x, self.likelihood)

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = corrupt(x, self.corruption, self.corruption_level)
        mean, log_var = self.encoder.distribution(inputs)
        reconstruction = self._reconstruction(reparameterise(mean, log_var), x)
        kl = gaussian_kl(mean, log_var)
        loss = reconstruction + kl_weight(self.beta, self.global_step, self.kl_warmup_steps) * kl
        return loss, {"loss": loss, "recon": reconstruction, "kl": kl}

    def evaluation_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``nelbo`` is the one-sample estimate (as in PyTorch's examples/vae); ``mse`` is the
        mean code's reconstruction error per pixel, the number every model reports."""
        mean, log_var = self.encoder.distribution(x)
        reconstruction = self._reconstruction(reparameterise(mean, log_var), x)
        kl = gaussian_kl(mean, log_var)
        return {
            "mse": F.mse_loss(self.decoder(mean), x),
            "recon": reconstruction,
            "kl": kl,
            "loss": reconstruction + self.beta * kl,
            "nelbo": reconstruction + kl,
        }


FAMILIES: dict[str, type[Autoencoder]] = {"ae": Autoencoder, "vae": VariationalAutoencoder}


def load_autoencoder(path: str | Path, map_location: str | torch.device = "cpu") -> Autoencoder:
    """Any model family's checkpoint, read as data (``weights_only=True``: no code runs)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    model_class = FAMILIES.get(checkpoint.get("model_family", "ae"))
    if model_class is None:
        raise UserError(
            f"{path} holds an unknown model family {checkpoint.get('model_family')!r}: "
            f"this version knows {sorted(FAMILIES)}."
        )
    return model_class.load_from_checkpoint(path, map_location=map_location, weights_only=True)


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not a choice: use one of {', '.join(choices)}.")
