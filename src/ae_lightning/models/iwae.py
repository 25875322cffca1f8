"""The importance-weighted autoencoder: the VAE's nets on the k-sample bound."""

from __future__ import annotations

from typing import Any

import torch

from ae_lightning.errors import UserError
from ae_lightning.models.vae import VariationalAutoencoder
from ae_lightning.objectives import corrupt, importance_weighted_bound


class ImportanceWeightedAutoencoder(VariationalAutoencoder):
    """An IWAE (Burda et al. 2016): the VAE's encoder, decoder and N(0, I) prior, trained on
    the importance-weighted bound L_k with ``samples`` = k codes per image.

    L_k = E[log 1/k sum_i p(x, z_i) / q(z_i|x)] is a tighter lower bound on log p(x) than
    the ELBO for k > 1. With k = 1 it is the ELBO, and the loss is the VAE's exactly (its
    closed-form KL: the same expectation as the one-sample weight, with less noise). The
    loss is -L_k; ``bound`` (L_k, nats per image) is logged beside it. There is no beta or
    KL warm-up: both would change the bound into something else.
    """

    family = "iwae"
    prior_description = "standard normal N(0, I)"

    def __init__(self, samples: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(samples, int) or samples < 1:
            raise UserError(
                f"model.samples={samples!r} is not a whole number of samples >= 1: use e.g. "
                "model.samples=5."
            )
        if self.beta != 1 or self.kl_warmup_steps:
            raise UserError(
                f"model=iwae bounds log p(x) and takes no model.beta={self.beta!r} or "
                f"model.kl_warmup_steps={self.kl_warmup_steps!r}: use model=vae for a beta-VAE "
                "or a KL warm-up."
            )
        self.samples = samples

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"IWAE k={self.samples}"

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = corrupt(x, self.corruption, self.corruption_level)
        if self.samples == 1:
            loss, terms = self._negative_elbo(inputs, x)
            return loss, {**terms, "bound": -loss}
        bound = importance_weighted_bound(self._log_weights(inputs, x, self.samples)).mean()
        return -bound, {"loss": -bound, "bound": bound}

    def evaluation_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The VAE's terms (one-sample ``nelbo``, the mean code's ``mse``) and L_k."""
        terms = super().evaluation_terms(x)
        if self.samples > 1:
            bound = importance_weighted_bound(self.log_weights(x, self.samples)).mean()
            terms.update(loss=-bound, bound=bound)
        else:
            terms["bound"] = -terms["nelbo"]
        return terms

    def recipe_words(self) -> list[str]:
        return [f"k={self.samples} {self.likelihood}"]
