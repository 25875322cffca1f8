"""The sparse autoencoder: reconstruction plus a sparsity penalty (L1 on the code, or Ng's KL)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ae_lightning.errors import UserError
from ae_lightning.models.ae import PenalisedAutoencoder
from ae_lightning.nets import Encoder
from ae_lightning.objectives import kl_sparsity, l1_sparsity, summed_squared_error
from ae_lightning.system import check_choice

SPARSITIES = ("l1", "kl")


class SparseEncoder(Encoder):
    """The plain encoder (same parameters) that also hands out its last hidden layer's
    pre-activations, the units Ng's sparsity target is set on."""

    def units_and_code(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(units (B, hidden[-1]), code (B, z))``; with no hidden layer the code is the
        hidden layer, as in Ng's one-layer autoencoder."""
        layers = list(self.to_latent)
        linear = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
        units_at = linear[-2] if len(linear) > 1 else linear[-1]
        h = x.flatten(1)
        for index, layer in enumerate(layers):
            h = layer(h)
            if index == units_at:
                units = h
        return units, h


class SparseAutoencoder(PenalisedAutoencoder):
    """Summed squared error per image + ``sparsity_weight`` * a sparsity penalty.

    ``sparsity=l1``: sum_j |z_j|, the L1 norm of the code. (The decoder can undo any shrinking
    of the code by growing its weights, so pair it with weight decay to mean much.)
    ``sparsity=kl``: Ng's sum_j KL(rho || rho_j) over the last hidden layer's units, rho =
    ``sparsity_target`` and rho_j the unit's mean firing over the minibatch, read as
    sigmoid(pre-activation): for sigmoid units that is their activation (Ng's setting); for
    ReLU (and any other) units it is a smooth firing rate (above 1/2 exactly when the unit
    is on), so a small target drives most pre-activations below zero and the layer sparse.
    The terms are per image (batch-averaged), as in Ng's notes, but his squared error
    carries a factor 1/2: his beta is ``sparsity_weight / 2`` here (his exercise's beta=3 is
    ``sparsity_weight=6``). ``mse`` stays per pixel, the number every model reports.
    """

    family = "sparse"
    label = "Sparse AE"
    encoder_class = SparseEncoder

    def __init__(
        self,
        sparsity: str = "kl",
        sparsity_weight: float = 0.1,
        sparsity_target: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("model.sparsity", sparsity, SPARSITIES)
        if not sparsity_weight >= 0:
            raise UserError(f"model.sparsity_weight={sparsity_weight!r} is negative: use e.g. 0.1.")
        if not 0 < sparsity_target < 1:
            raise UserError(
                f"model.sparsity_target={sparsity_target!r} is not a firing rate in (0, 1): "
                "use e.g. model.sparsity_target=0.05."
            )
        self.sparsity, self.sparsity_weight = sparsity, sparsity_weight
        self.sparsity_target = sparsity_target

    def _objective(
        self, inputs: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction of ``inputs`` and the loss terms against the clean ``x``."""
        units, codes = self.encoder.units_and_code(inputs)
        decoded = self.decoder(codes)
        if self.sparsity == "l1":
            penalty = l1_sparsity(codes)
        else:
            penalty = kl_sparsity(torch.sigmoid(units), self.sparsity_target)
        recon = summed_squared_error(decoded, x)
        loss = recon + self.sparsity_weight * penalty
        return decoded, {"loss": loss, "recon": recon, "sparsity": penalty}

    def recipe_words(self) -> list[str]:
        if self.sparsity == "l1":
            return [f"l1 {self.sparsity_weight}"]
        return [f"kl rho {self.sparsity_target} weight {self.sparsity_weight}"]
