"""The Wasserstein autoencoder with the MMD penalty (WAE-MMD) against a N(0, I) prior."""

from __future__ import annotations

from typing import Any

import torch

from ae_lightning.errors import UserError
from ae_lightning.latent import CodeSampler
from ae_lightning.models.ae import PenalisedAutoencoder
from ae_lightning.objectives import imq_mmd, summed_squared_error


class WassersteinAutoencoder(PenalisedAutoencoder):
    """A deterministic encoder trained on summed squared error per image + ``mmd_weight`` *
    MMD^2(codes, N(0, I) draws) (Tolstikhin et al. 2018, WAE-MMD with the inverse
    multiquadratic kernel at the paper's scales): the codes of a minibatch are matched, as a
    set, to as many prior draws, so decoding N(0, I) makes images. ``mse`` stays per pixel.
    """

    family = "wae"
    label = "WAE-MMD"
    prior_description = "standard normal N(0, I)"

    def __init__(self, mmd_weight: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not mmd_weight >= 0:
            raise UserError(f"model.mmd_weight={mmd_weight!r} is negative: use e.g. 10.")
        self.mmd_weight = mmd_weight

    def _objective(
        self, inputs: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction of ``inputs`` and the loss terms against the clean ``x``."""
        codes = self.encoder(inputs)
        decoded = self.decoder(codes)
        recon = summed_squared_error(decoded, x)
        # Fresh prior draws every minibatch; a last minibatch of one image has no pairs.
        mmd = imq_mmd(codes, torch.randn_like(codes)) if len(codes) > 1 else codes.new_zeros(())
        loss = recon + self.mmd_weight * mmd
        return decoded, {"loss": loss, "recon": recon, "mmd": mmd}

    def prior_sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``(n, z)`` draws from N(0, I), the prior the MMD term matches the codes to."""
        return CodeSampler("normal", torch.zeros(1, self.bottleneck), seed=seed).sample(n)

    def recipe_words(self) -> list[str]:
        return [f"mmd {self.mmd_weight}"]
