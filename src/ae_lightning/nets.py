"""Plain ``nn.Module`` MLPs for the encoder f and decoder g (no Lightning here).

Deterministic encoders give one code per image; the variational encoder gives the mean and
log-variance of a diagonal Gaussian over codes (its ``forward`` is the mean, so every figure
and metric that calls ``encode`` sees the mean code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)  # MNIST's, and that of checkpoints written before the key
PIXELS = math.prod(IMAGE_SHAPE)

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    """An activation module by name, so configs stay plain strings."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown activation {name!r}: choose one of {sorted(ACTIVATIONS)}."
        ) from None


OUTPUTS = ("sigmoid", "linear")


def mlp(
    sizes: Sequence[int], activation: str, dropout: float = 0.0, activate_last: bool = False
) -> nn.Sequential:
    """Linear layers through ``sizes`` with ``activation`` (and dropout) after each hidden one.

    The last layer stays linear unless ``activate_last``. Dropout modules are added only when
    ``dropout > 0``, so models without it keep the parameter names of older checkpoints.
    """
    layers: list[nn.Module] = []
    last = len(sizes) - 2
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < last or activate_last:
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """f: image -> bottleneck code. ``(B, C, H, W)`` or ``(B, C*H*W)`` -> ``(B, z)``.

    The code is linear (no activation at the bottleneck) so it can take any real value,
    as in the reference workflow.
    """

    def __init__(
        self,
        bottleneck: int,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        in_features: int = PIXELS,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.to_latent = mlp([in_features, *hidden, bottleneck], activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(x.flatten(1))  # (B, C*H*W) -> (B, z)


class VariationalEncoder(nn.Module):
    """q(z|x): image -> mean and log-variance of a diagonal Gaussian over ``(B, z)`` codes.

    ``forward`` returns the mean: the code every figure, metric and comparison uses.
    Log-variance rather than variance so the head is unconstrained and exp() keeps it positive.
    """

    def __init__(
        self,
        bottleneck: int,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        in_features: int = PIXELS,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        hidden = list(hidden)
        self.body = mlp([in_features, *hidden], activation, dropout, activate_last=True)
        features = hidden[-1] if hidden else in_features
        self.mean = nn.Linear(features, bottleneck)
        self.log_var = nn.Linear(features, bottleneck)

    def distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_var)``, each ``(B, z)``."""
        features = self.body(x.flatten(1))
        return self.mean(features), self.log_var(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean(self.body(x.flatten(1)))


class Decoder(nn.Module):
    """g: bottleneck code -> image. ``(B, z)`` -> ``(B, C, H, W)`` with pixels in (0, 1).

    ``output="sigmoid"`` (default) keeps pixels in (0, 1) like the targets, and its
    pre-sigmoid ``logits`` feed the Bernoulli likelihood; ``"linear"`` leaves them unbounded
    (for the MSE / Gaussian losses only). ``hidden`` lists the layer sizes from the
    bottleneck outwards (the mirror of the encoder's).
    """

    def __init__(
        self,
        bottleneck: int,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        image_shape: Sequence[int] = IMAGE_SHAPE,
        dropout: float = 0.0,
        output: str = "sigmoid",
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"Unknown output {output!r}: choose one of {list(OUTPUTS)}.")
        self.bottleneck = bottleneck
        self.image_shape = tuple(image_shape)
        self.output = output
        out_features = 1
        for dim in self.image_shape:
            out_features *= dim
        # (Sequential of mlp + output keeps the parameter names of older checkpoints.)
        self.to_pixels = nn.Sequential(
            mlp([bottleneck, *hidden, out_features], activation, dropout),
            nn.Sigmoid() if output == "sigmoid" else nn.Identity(),
        )

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The pre-output values ``(B, C, H, W)``: the pixels themselves for ``linear``."""
        return self.to_pixels[0](z).view(-1, *self.image_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_pixels(z).view(-1, *self.image_shape)  # (B, z) -> (B, C, H, W)


def build_encoder_decoder(
    bottleneck: int,
    hidden: Sequence[int] = (),
    activation: str = "relu",
    decoder_hidden: Sequence[int] | None = None,
    dropout: float = 0.0,
    output: str = "sigmoid",
    encoder_class: type[nn.Module] = Encoder,
    image_shape: Sequence[int] = IMAGE_SHAPE,
) -> tuple[nn.Module, Decoder]:
    """Encoder with ``hidden`` sizes and a decoder that mirrors it unless told otherwise.

    ``encoder_class`` is the encoder the model asks for (``Encoder``, ``VariationalEncoder``
    or any class taking the same arguments); ``image_shape`` ``(C, H, W)`` is the data's.
    """
    hidden = list(hidden)
    mirrored = list(reversed(hidden)) if decoder_hidden is None else list(decoder_hidden)
    pixels = math.prod(image_shape)
    return (
        encoder_class(bottleneck, hidden, activation, in_features=pixels, dropout=dropout),
        Decoder(bottleneck, mirrored, activation, image_shape, dropout=dropout, output=output),
    )


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
