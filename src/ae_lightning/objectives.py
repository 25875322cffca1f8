"""Training objectives as pure tensor functions: reconstruction, Gaussian KL, negative ELBO.

Per-image quantities are summed over pixels and latent dimensions and averaged over the
batch, so the VAE's numbers are nats per image, comparable with papers and PyTorch's
``examples/vae``. (The plain autoencoder's ``mse`` is per pixel, as before.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian")
CORRUPTIONS = ("none", "gaussian", "mask")


def reconstruction_nats(outputs: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log p(x | z) per image, averaged over the batch.

    ``bernoulli``: binary cross-entropy of the pixels in [0, 1]; ``outputs`` are the decoder's
    logits (before the sigmoid), which is exact and stable where probabilities saturate.
    ``gaussian``: the summed squared error, i.e. -log N(x; outputs, 1/2) up to the constant
    ``PIXELS/2 * log(pi)``, which moves no gradient and is left out; ``outputs`` are pixels.
    """
    if likelihood == "bernoulli":
        per_pixel = F.binary_cross_entropy_with_logits(outputs, x, reduction="none")
    elif likelihood == "gaussian":
        per_pixel = (outputs - x).square()
    else:
        raise ValueError(f"Unknown likelihood {likelihood!r}: choose one of {list(LIKELIHOODS)}.")
    return per_pixel.flatten(1).sum(dim=1).mean()


def gaussian_kl(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) in closed form, summed over z, batch-averaged."""
    return 0.5 * (mean.square() + log_var.exp() - 1.0 - log_var).sum(dim=1).mean()


def reparameterise(
    mean: torch.Tensor, log_var: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = mean + sigma * eps, eps ~ N(0, I): a sample whose gradient reaches mean and sigma."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * log_var) * eps


def kl_weight(beta: float, step: int, warmup_steps: int) -> float:
    """beta, ramped linearly from 0 over the first ``warmup_steps`` optimizer steps."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def corrupt(x: torch.Tensor, kind: str, level: float) -> torch.Tensor:
    """The denoising autoencoder's input: ``x`` plus N(0, level^2) noise, or pixels zeroed
    with probability ``level`` (``mask``). ``none`` returns ``x`` itself."""
    if kind == "none" or level == 0:
        return x
    if kind == "gaussian":
        return x + level * torch.randn_like(x)
    if kind == "mask":
        return x * (torch.rand_like(x) >= level)
    raise ValueError(f"Unknown corruption {kind!r}: choose one of {list(CORRUPTIONS)}.")
