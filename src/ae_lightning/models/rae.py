"""The regularised autoencoder RAE-L2: a deterministic AE with a fitted density over codes."""

from __future__ import annotations

from typing import Any

import torch

from ae_lightning.errors import UserError
from ae_lightning.models.ae import PenalisedAutoencoder
from ae_lightning.objectives import squared_norm, summed_squared_error


class RegularisedAutoencoder(PenalisedAutoencoder):
    """RAE-L2 (Ghosh et al. 2020): summed squared error per image + ``code_weight`` *
    ||z||^2 / 2 + ``decoder_weight`` * ||theta_dec||^2, every decoder parameter (weights and
    biases) squared and summed. The code penalty keeps the codes near the origin, the
    decoder's keeps it smooth there; there is no prior, so new images are decoded from an
    ex-post density: ``fitted_sampler`` is a 10-component GMM fitted to the training codes
    (``samples.png`` says so). ``mse`` stays per pixel.
    """

    family = "rae"
    label = "RAE"
    fitted_sampler = "gmm"

    def __init__(
        self, code_weight: float = 0.01, decoder_weight: float = 0.001, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        for key, value in (("code_weight", code_weight), ("decoder_weight", decoder_weight)):
            if not value >= 0:
                raise UserError(f"model.{key}={value!r} is negative: use e.g. 0.01.")
        self.code_weight, self.decoder_weight = code_weight, decoder_weight

    def _objective(
        self, inputs: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction of ``inputs`` and the loss terms against the clean ``x``."""
        codes = self.encoder(inputs)
        decoded = self.decoder(codes)
        recon = summed_squared_error(decoded, x)
        code = 0.5 * codes.square().sum(dim=1).mean()
        decoder = squared_norm(self.decoder.parameters())
        loss = recon + self.code_weight * code + self.decoder_weight * decoder
        return decoded, {"loss": loss, "recon": recon, "code": code, "decoder_l2": decoder}

    def recipe_words(self) -> list[str]:
        return [f"code {self.code_weight} decoder {self.decoder_weight}"]
