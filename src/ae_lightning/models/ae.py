"""The plain MLP autoencoder y = g(f(x)) on squared L2 loss, and the base of every family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ae_lightning.errors import UserError
from ae_lightning.nets import IMAGE_SHAPE, OUTPUTS, Encoder, build_encoder_decoder
from ae_lightning.objectives import CORRUPTIONS, corrupt
from ae_lightning.system import TrainingSystem, check_choice

LOSSES = ("mse", "bce")  # the plain autoencoder's training losses (model.loss)


class Autoencoder(TrainingSystem):
    """The encoder f and decoder g MLPs; the family contract with the plain AE's answers.

    What the rest of the package asks a family (override what differs):

    - ``training_loss(x) -> (loss, terms)`` and ``evaluation_terms(x)`` (at least ``mse``):
      the objective, see ``TrainingSystem``; ``graph_blocker`` likewise.
    - ``encode(x) -> codes`` and ``decode(codes) -> images``: ``(B, *image_shape)`` pixels
      in [0, 1] to ``(B, z)`` codes and back; figures, probes, comparisons and ``load_run`` use
      only these (a stochastic encoder gives its mean code).
    - ``prior_sample(n, seed) -> codes | None``: ``(n, z)`` draws from the family's own prior
      (what ``samples.png`` decodes by default), or None for a family with none
      (``fitted_sampler``, a ``latent.SAMPLERS`` kind, is fitted to the training codes then:
      a Gaussian unless the family names another); ``prior_description`` names it in titles.
    - ``log_weights(x, k) -> (B, k) | None``: k log importance weights
      log p(x|z_i) + log p(z_i) - log q(z_i|x), z_i ~ q(z|x), for families with a likelihood
      (what ``test/nll`` estimates log p(x) from), or None for those without.
    - ``recipe_words() -> list[str]``: the family's own knobs in words for the recipe column
      of summaries (e.g. ``["beta 1.0 bernoulli"]``).
    - ``label``: the family in figure titles (``MLP 784-1024-2``, ``VAE 784-1024-2``).
    - ``image_shape``: ``(C, H, W)`` of the data, given by the data module when the model is
      built and saved with the other settings, so a checkpoint rebuilds its own nets (those
      written before the key hold MNIST's ``(1, 28, 28)``).
    - ``family`` (its name in checkpoints), ``encoder_class`` (the encoder net it needs) and
      ``code_outputs``, the values that encoder emits per code dimension, for the size
      arithmetic of ``limits.check_model_size`` (nothing is built to count), with
      ``extra_parameters(bottleneck, knobs, pixels)``: the parameters beyond the
      encoder/decoder MLPs (pseudo-inputs, codebooks) for the model's config or a
      checkpoint's ``knobs``, on images of ``pixels`` values.

    ``dropout`` drops hidden units in training; ``output`` is the decoder's last layer:
    ``sigmoid`` (pixels in (0, 1), like the targets) or ``linear`` (unbounded). ``loss`` is
    what the plain AE minimises: ``mse`` (per pixel) or ``bce``, the binary cross-entropy of
    the sigmoid's logits, whose gradient does not vanish where the sigmoid saturates (the
    classic deep autoencoders' loss); every evaluation reports MSE either way.
    ``corruption`` (``gaussian`` noise of std ``corruption_level``, or ``mask``: pixels zeroed
    with probability ``corruption_level``) makes a denoising autoencoder: the input is
    corrupted in training only, the target and every evaluation stay clean. The training knobs
    (optimizer, scheduler, engine) go on to ``TrainingSystem``.
    """

    family = "ae"
    label = "MLP"
    encoder_class: type[torch.nn.Module] = Encoder
    code_outputs = 1
    prior_description: str | None = None
    fitted_sampler = "gaussian"

    def __init__(
        self,
        bottleneck: int = 2,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        decoder_hidden: Sequence[int] | None = None,
        dropout: float = 0.0,
        output: str = "sigmoid",
        loss: str = "mse",
        corruption: str = "none",
        corruption_level: float = 0.0,
        image_shape: Sequence[int] = IMAGE_SHAPE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("model.output", output, OUTPUTS)
        check_choice("model.corruption", corruption, CORRUPTIONS)
        check_choice("model.loss", loss, LOSSES)
        if loss != "mse" and self.family != "ae":
            raise UserError(
                f"model.loss={loss} is the plain autoencoder's; the {self.family} family "
                "minimises its own objective: leave model.loss=mse (see its config's knobs)."
            )
        if loss == "bce" and output != "sigmoid":
            raise UserError(
                f"model.loss=bce needs pixels in (0, 1) but model.output={output}: use "
                "model.output=sigmoid, or model.loss=mse."
            )
        if not 0 <= dropout < 1:
            raise UserError(f"model.dropout={dropout!r} is not in [0, 1): use e.g. 0.1.")
        if corruption_level < 0 or (corruption == "mask" and corruption_level >= 1):
            raise UserError(
                f"model.corruption_level={corruption_level!r} does not suit "
                f"model.corruption={corruption}: use a noise std >= 0 or a mask probability "
                "in [0, 1), e.g. 0.2."
            )
        self.encoder, self.decoder = build_encoder_decoder(
            bottleneck, hidden, activation, decoder_hidden, dropout, output, self.encoder_class,
            image_shape,
        )  # fmt: skip
        self.image_shape = tuple(int(d) for d in image_shape)
        self.corruption, self.corruption_level = corruption, corruption_level
        self.loss = loss
        # Lightning's model summary runs it once, so the table shows each part's input and
        # output sizes and real FLOPs (without one: a FLOPs column of 0).
        self.example_input_array = torch.zeros(1, *self.image_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """f: ``(B, *image_shape)`` pixels in [0, 1] -> ``(B, z)`` codes."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """g: ``(B, z)`` codes -> ``(B, *image_shape)`` pixels in (0, 1)."""
        return self.decoder(z)

    @classmethod
    def extra_parameters(cls, bottleneck: int, knobs: Mapping[str, Any], pixels: int) -> int:
        """Parameters beyond the encoder and decoder MLPs: none for the plain AE."""
        return 0

    @property
    def bottleneck(self) -> int:
        return self.encoder.bottleneck

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pixel MSE (or BCE) of the reconstruction of corrupted inputs against ``x``."""
        inputs = corrupt(x, self.corruption, self.corruption_level)
        if self.loss == "bce":
            logits = self.decoder.logits(self.encode(inputs))
            bce = F.binary_cross_entropy_with_logits(logits, x)  # mean per pixel
            return bce, {"bce": bce, "mse": F.mse_loss(torch.sigmoid(logits).detach(), x)}
        loss = F.mse_loss(self(inputs), x)  # mean squared error per pixel
        return loss, {"mse": loss}

    def evaluation_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": F.mse_loss(self(x), x)}

    def prior_sample(self, n: int, seed: int = 0) -> torch.Tensor | None:
        """None: a plain AE has no prior of its own (decoding N(0, I) would be arbitrary)."""
        return None

    def log_weights(self, x: torch.Tensor, samples: int) -> torch.Tensor | None:
        """None: a plain AE defines no likelihood p(x), so it has no test/nll."""
        return None

    def recipe_words(self) -> list[str]:
        """The shared knobs are described by ``train.describe_run``; the loss if not MSE."""
        return ["bce loss"] if self.loss == "bce" else []


class PenalisedAutoencoder(Autoencoder):
    """A deterministic autoencoder trained on a reconstruction plus a penalty (sparse,
    contractive, WAE, RAE): the family gives ``_objective``, this class the rest.

    ``_objective(inputs, x) -> (decoded, terms)`` reconstructs ``inputs`` and returns the
    loss terms against the clean ``x`` (``terms["loss"]`` is the one minimised). Training
    corrupts the input as every autoencoder does; evaluation adds the per-pixel ``mse``.
    Declares no ``family`` of its own, so the registry does not list it.
    """

    def _objective(
        self, inputs: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, terms = self._objective(corrupt(x, self.corruption, self.corruption_level), x)
        return terms["loss"], terms

    def evaluation_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        decoded, terms = self._objective(x, x)
        return {"mse": F.mse_loss(decoded, x), **terms}
