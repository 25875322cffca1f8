"""The contractive autoencoder: reconstruction plus the encoder Jacobian's Frobenius norm."""

from __future__ import annotations

from typing import Any

import torch

from ae_lightning.errors import UserError
from ae_lightning.models.ae import PenalisedAutoencoder
from ae_lightning.objectives import encoder_jacobian, summed_squared_error


class ContractiveAutoencoder(PenalisedAutoencoder):
    """Summed squared error per image + ``contractive_weight`` * ||dz/dx||_F^2 (Rifai et al.
    2011), the exact squared Frobenius norm of the encoder's Jacobian at each training image.

    The Jacobian comes from ``torch.func.jacrev`` (z backward passes of the encoder, batched
    by ``vmap``) and is itself differentiated, so a step costs about z + 2 encoder passes
    more than a plain AE's. It is tensor maths only (no host reads, fixed shapes), so the
    steps can be captured as a CUDA graph like any other. ``mse`` stays per pixel.
    """

    family = "contractive"
    label = "CAE"

    def __init__(self, contractive_weight: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not contractive_weight >= 0:
            raise UserError(
                f"model.contractive_weight={contractive_weight!r} is negative: use e.g. 0.1."
            )
        self.contractive_weight = contractive_weight

    def _objective(
        self, inputs: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction of ``inputs`` and the loss terms against the clean ``x``."""
        codes, jacobian = encoder_jacobian(self.encoder, inputs)
        decoded = self.decoder(codes)
        recon = summed_squared_error(decoded, x)
        loss = recon + self.contractive_weight * jacobian
        return decoded, {"loss": loss, "recon": recon, "jacobian": jacobian}

    def recipe_words(self) -> list[str]:
        return [f"contractive {self.contractive_weight}"]
