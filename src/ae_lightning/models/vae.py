"""The variational autoencoder, trained on the negative ELBO."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ae_lightning.errors import UserError
from ae_lightning.latent import CodeSampler
from ae_lightning.models.ae import Autoencoder
from ae_lightning.nets import VariationalEncoder
from ae_lightning.objectives import (
    LIKELIHOODS,
    corrupt,
    diagonal_gaussian,
    gaussian_kl,
    kl_weight,
    log_likelihood,
    reconstruction_nats,
    reparameterise,
    standard_normal_log_density,
)
from ae_lightning.system import check_choice


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
    label = "VAE"
    encoder_class = VariationalEncoder
    code_outputs = 2  # a mean and a log-variance
    prior_description = "standard normal N(0, I)"

    def __init__(
        self,
        beta: float = 1.0,
        likelihood: str = "bernoulli",
        kl_warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("model.likelihood", likelihood, LIKELIHOODS)
        output = self.decoder.output
        if likelihood == "bernoulli" and output != "sigmoid":
            raise UserError(
                f"model.likelihood=bernoulli needs pixels in (0, 1) but model.output={output}: "
                "use model.output=sigmoid, or model.likelihood=gaussian."
            )
        if not isinstance(beta, int | float) or isinstance(beta, bool) or not beta >= 0:
            raise UserError(f"model.beta={beta!r} is not a number >= 0: use e.g. model.beta=1.")
        if (
            not isinstance(kl_warmup_steps, int)
            or isinstance(kl_warmup_steps, bool)
            or (kl_warmup_steps < 0)
        ):
            raise UserError(
                f"model.kl_warmup_steps={kl_warmup_steps!r} is not a whole number >= 0: use "
                "e.g. model.kl_warmup_steps=5000 (or 0, no warm-up)."
            )
        self.beta, self.likelihood, self.kl_warmup_steps = beta, likelihood, kl_warmup_steps

    @property
    def graph_blocker(self) -> str | None:
        if self.kl_warmup_steps > 0:
            return "the KL warm-up (model.kl_warmup_steps) reads the step count each step"
        return None

    def _reconstruction(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return reconstruction_nats(self._likelihood_outputs(z), x, self.likelihood)

    def _likelihood_outputs(self, z: torch.Tensor) -> torch.Tensor:
        # Bernoulli reads logits (exact where the sigmoid saturates); Gaussian reads pixels.
        return self.decoder.logits(z) if self.likelihood == "bernoulli" else self.decoder(z)

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._negative_elbo(corrupt(x, self.corruption, self.corruption_level), x)

    def _negative_elbo(
        self, inputs: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction of ``x`` from one code sampled at ``inputs``, plus beta * KL."""
        mean, log_var = self.encoder.distribution(inputs)
        z = reparameterise(mean, log_var)
        reconstruction = self._reconstruction(z, x)
        kl = self._kl(mean, log_var, z)
        loss = reconstruction + kl_weight(self.beta, self.global_step, self.kl_warmup_steps) * kl
        return loss, {"loss": loss, "recon": reconstruction, "kl": kl}

    def _kl(self, mean: torch.Tensor, log_var: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || p(z)), batch-averaged: in closed form against N(0, I) (``z`` unused)."""
        return gaussian_kl(mean, log_var)

    def prior_log_density(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) over the last dimension: the standard normal's."""
        return standard_normal_log_density(z)

    def evaluation_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``nelbo`` is the one-sample estimate (as in PyTorch's examples/vae); ``mse`` is the
        mean code's reconstruction error per pixel, the number every model reports.

        ``loss`` (the beta-weighted objective) only where beta is not 1: there it would be
        ``nelbo`` twice over.
        """
        mean, log_var = self.encoder.distribution(x)
        z = reparameterise(mean, log_var)
        reconstruction = self._reconstruction(z, x)
        kl = self._kl(mean, log_var, z)
        terms = {
            "mse": F.mse_loss(self.decoder(mean), x),
            "recon": reconstruction,
            "kl": kl,
            "nelbo": reconstruction + kl,
        }
        if self.beta != 1:
            terms["loss"] = reconstruction + self.beta * kl
        return terms

    def log_weights(self, x: torch.Tensor, samples: int) -> torch.Tensor:
        return self._log_weights(x, x, samples)

    def _log_weights(self, inputs: torch.Tensor, x: torch.Tensor, samples: int) -> torch.Tensor:
        """``(B, k)`` log p(x|z_i) + log p(z_i) - log q(z_i|inputs), z_i ~ q(z|inputs).

        The B * k codes go through the decoder as one batch.
        """
        mean, log_var = self.encoder.distribution(inputs)
        posterior = diagonal_gaussian(mean, log_var)
        z = posterior.rsample((samples,))  # (k, B, z)
        log_q = posterior.log_prob(z).T  # (B, k)
        z = z.transpose(0, 1)  # (B, k, z)
        outputs = self._likelihood_outputs(z.flatten(0, 1)).unflatten(0, z.shape[:2])
        log_px = log_likelihood(outputs, x.unsqueeze(1), self.likelihood)  # (B, k)
        return log_px + self.prior_log_density(z) - log_q

    def prior_sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``(n, z)`` draws from N(0, I), the prior the KL term pulls the codes towards."""
        return CodeSampler("normal", torch.zeros(1, self.bottleneck), seed=seed).sample(n)

    def recipe_words(self) -> list[str]:
        return [f"beta {self.beta} {self.likelihood}"]
