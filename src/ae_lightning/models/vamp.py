"""The VAE with a VampPrior: the prior is a mixture of the encoder's own posteriors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ae_lightning.errors import UserError
from ae_lightning.models.vae import VariationalAutoencoder
from ae_lightning.objectives import diagonal_gaussian, mixture_log_density

DEFAULT_PSEUDO_INPUTS = 500  # the paper's K for MNIST


class VampPriorAutoencoder(VariationalAutoencoder):
    """A VAE whose prior is the VampPrior (Tomczak & Welling 2018, eq. 9):
    p(z) = 1/K sum_k q(z | u_k) over K learned ``pseudo_inputs`` u_k.

    The pseudo-inputs are images, kept in [0, 1] by a hard tanh as in the paper's code (and
    initialised near 0.05 like it). There is no closed-form KL against a mixture, so the KL
    is the one-sample estimate log q(z|x) - log p(z) at the sampled code. ``samples.png``
    draws a pseudo-input's posterior at random, then a code from it.
    """

    family = "vamp"
    label = "VAMP"  # pythae's name; short, as figure titles need

    def __init__(self, pseudo_inputs: int = DEFAULT_PSEUDO_INPUTS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(pseudo_inputs, int) or pseudo_inputs < 1:
            raise UserError(
                f"model.pseudo_inputs={pseudo_inputs!r} is not a positive whole number: use "
                f"e.g. model.pseudo_inputs={DEFAULT_PSEUDO_INPUTS}."
            )
        pixels = math.prod(self.image_shape)  # the data's, as the encoder's input
        self.pseudo_pixels = nn.Parameter(0.05 + 0.01 * torch.randn(pseudo_inputs, pixels))

    @classmethod
    def extra_parameters(cls, bottleneck: int, knobs: Mapping[str, Any], pixels: int) -> int:
        """The K pseudo-input images."""
        return int(knobs.get("pseudo_inputs", DEFAULT_PSEUDO_INPUTS)) * pixels

    @property
    def prior_description(self) -> str:  # type: ignore[override]
        return f"mixture at {len(self.pseudo_pixels)} pseudo-inputs"

    def pseudo_inputs_images(self) -> torch.Tensor:
        """The pseudo-inputs u_k as ``(K, C*H*W)`` pixels in [0, 1]."""
        return nn.functional.hardtanh(self.pseudo_pixels, 0.0, 1.0)

    def _components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The means and log-variances ``(K, z)`` of q(z | u_k)."""
        return self.encoder.distribution(self.pseudo_inputs_images())

    def prior_log_density(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_density(z, *self._components())

    def _kl(self, mean: torch.Tensor, log_var: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) - log p(z) at the sampled code ``z``, batch-averaged."""
        log_q = diagonal_gaussian(mean, log_var).log_prob(z)
        return (log_q - self.prior_log_density(z)).mean()

    @torch.no_grad()
    def prior_sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``(n, z)`` codes: a pseudo-input drawn uniformly, then a code from its posterior."""
        means, log_vars = (value.float().cpu() for value in self._components())
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randint(len(means), (n,), generator=generator)
        noise = torch.randn(n, means.shape[1], generator=generator)
        return means[chosen] + torch.exp(0.5 * log_vars[chosen]) * noise

    def recipe_words(self) -> list[str]:
        return [*super().recipe_words(), f"vamp K={len(self.pseudo_pixels)}"]
