"""The LightningModule: an MLP autoencoder y = g(f(x)) trained on squared L2 loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ae_lightning.nets import build_encoder_decoder, count_parameters

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam at lr 1e-3 with weight decay 1e-5: the reference workflow's settings."""
    return torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5)


class Autoencoder(pl.LightningModule):
    """Holds the plain encoder f and decoder g; logs per-pixel MSE as ``<stage>/mse``.

    Built from sizes (not modules) so a checkpoint alone rebuilds the architecture.
    ``optimizer`` is a partial (``_partial_: true`` in Hydra) completed with the parameters.
    """

    def __init__(
        self,
        bottleneck: int = 2,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        decoder_hidden: Sequence[int] | None = None,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"], logger=False)
        self.encoder, self.decoder = build_encoder_decoder(
            bottleneck, hidden, activation, decoder_hidden
        )
        self.optimizer_factory = optimizer or default_optimizer

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

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, _ = batch
        loss = F.mse_loss(self(x), x)  # mean squared error per pixel
        training = stage == "train"
        # Logged tensors stay on the device; Lightning reduces them without a per-step sync.
        self.log(
            f"{stage}/mse",
            loss,
            on_step=training,
            on_epoch=not training,
            prog_bar=True,
            batch_size=x.shape[0],
            sync_dist=not training,
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())
