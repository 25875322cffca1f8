"""The vector-quantised autoencoder: codes snapped to learned codebooks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ae_lightning.errors import UserError
from ae_lightning.models.ae import Autoencoder
from ae_lightning.objectives import (
    corrupt,
    straight_through,
    summed_squared_error,
    vector_quantise,
    vq_losses,
)

DEFAULT_GROUPS, DEFAULT_CODEBOOK_SIZE = 1, 512


class VectorQuantisedAutoencoder(Autoencoder):
    """A VQ-VAE for MLPs (van den Oord et al. 2017): the encoder's ``bottleneck``-wide code is
    split into ``groups`` groups, each snapped to the nearest of ``codebook_size`` entries of
    its own codebook; the decoder sees the quantised code.

    Loss (eq. 3): the summed squared reconstruction error per image, plus the codebook term
    ||sg[z] - e||^2, plus ``commitment`` * ||z - sg[e]||^2; the gradient crosses the
    quantiser straight through. ``encode`` returns the quantised code (what the decoder
    reconstructs from). The entries start on random codes of the first training batch.
    The prior for ``samples.png`` is an independent categorical over each
    group's codebook indices, fitted by counting the indices of the training codes of the
    last epoch trained (kept in the checkpoint).
    """

    family = "vqvae"
    label = "VQ-VAE"
    # Short enough for the samples figure's title line (the docstring says the rest).
    prior_description = "fitted index categoricals"

    def __init__(
        self,
        groups: int = DEFAULT_GROUPS,
        codebook_size: int = DEFAULT_CODEBOOK_SIZE,
        commitment: float = 0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        width = self.bottleneck
        if not isinstance(groups, int) or groups < 1 or width % groups:
            raise UserError(
                f"model.groups={groups!r} does not divide bottleneck={width} into equal "
                "groups: use a divisor of the bottleneck, e.g. model.groups=1."
            )
        if not isinstance(codebook_size, int) or codebook_size < 2:
            raise UserError(
                f"model.codebook_size={codebook_size!r} is too small: use a whole number of "
                "entries >= 2, e.g. model.codebook_size=512."
            )
        if commitment < 0:
            raise UserError(f"model.commitment={commitment!r} is negative: use e.g. 0.25.")
        self.groups, self.codebook_size, self.commitment = groups, codebook_size, commitment
        # Uniform in +-1/C, as in the paper's reference implementations, until the first
        # training batch seeds them (`_seed_codebooks`).
        bound = 1.0 / codebook_size
        self.codebooks = nn.Parameter(
            torch.empty(groups, codebook_size, width // groups).uniform_(-bound, bound)
        )
        # How often each entry was chosen in the current (or last) training epoch.
        self.register_buffer("code_counts", torch.zeros(groups, codebook_size))
        self.register_buffer("codebooks_seeded", torch.tensor(False))

    @classmethod
    def extra_parameters(cls, bottleneck: int, knobs: Mapping[str, Any], pixels: int) -> int:
        """The codebooks: ``codebook_size`` entries of ``bottleneck / groups`` per group."""
        return int(knobs.get("codebook_size", DEFAULT_CODEBOOK_SIZE)) * bottleneck

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The quantised code ``(B, z)``: each group's nearest codebook entry."""
        return vector_quantise(self.encoder(x), self.codebooks)[0]

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.encoder(corrupt(x, self.corruption, self.corruption_level))
        self._seed_codebooks(z)
        quantised, indices, _ = vector_quantise(z, self.codebooks)
        # Tensor ops only (no host read), so a captured CUDA graph replays the count too.
        self.code_counts.scatter_add_(1, indices.T, torch.ones_like(indices.T, dtype=z.dtype))
        loss, terms = self._objective(z, quantised, x)
        return loss, terms

    @torch.no_grad()
    def _seed_codebooks(self, z: torch.Tensor) -> None:
        """On the first training step, move the entries onto random codes of the batch.

        Entries far from every code are never chosen and never learn (codebook collapse);
        starting them on the data, slightly jittered so duplicates part, keeps them in use.
        Branch-free (a ``where`` on a flag), so a captured CUDA graph replays it as a no-op.
        """
        groups, size, width = self.codebooks.shape
        parts = z.detach().view(z.shape[0], groups, width)
        rows = torch.randint(z.shape[0], (size, groups), device=z.device)
        picked = parts[rows, torch.arange(groups, device=z.device)].transpose(0, 1)  # (G, C, d)
        jitter = 0.01 * parts.std() * torch.randn_like(picked)
        self.codebooks.copy_(torch.where(self.codebooks_seeded, self.codebooks, picked + jitter))
        self.codebooks_seeded.fill_(True)

    def _objective(
        self, z: torch.Tensor, quantised: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.decoder(straight_through(z, quantised))
        reconstruction = summed_squared_error(outputs, x)
        codebook, commitment = vq_losses(z, quantised)
        loss = reconstruction + codebook + self.commitment * commitment
        return loss, {
            "loss": loss,
            "recon": reconstruction,
            "codebook": codebook,
            "commitment": commitment,
            "mse": F.mse_loss(outputs, x),
        }

    def evaluation_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x)
        quantised, _, _ = vector_quantise(z, self.codebooks)
        return self._objective(z, quantised, x)[1]

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.code_counts.zero_()  # the prior is fitted on each epoch's codes afresh

    @torch.no_grad()
    def prior_sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """``(n, z)`` codes: each group's entry drawn by its index frequencies (uniform if
        nothing was counted yet, as before training)."""
        counts = self.code_counts.float().cpu()
        counts = torch.where(counts.sum(1, keepdim=True) > 0, counts, torch.ones_like(counts))
        generator = torch.Generator().manual_seed(seed)
        indices = torch.multinomial(counts, n, replacement=True, generator=generator)  # (G, n)
        codebooks = self.codebooks.detach().float().cpu()
        drawn = torch.stack([codebooks[g, indices[g]] for g in range(self.groups)], dim=1)
        return drawn.flatten(1)  # (n, G, d) -> (n, z)

    def recipe_words(self) -> list[str]:
        return [f"vq {self.groups}x{self.codebook_size} commitment {self.commitment}"]
