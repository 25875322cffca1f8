"""Plain ``nn.Module`` MLPs for the encoder f and decoder g (no Lightning here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
PIXELS = 28 * 28

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


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers through ``sizes`` with ``activation`` between them (not after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(make_activation(activation))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """f: image -> bottleneck code. ``(B, 1, 28, 28)`` or ``(B, 784)`` -> ``(B, z)``.

    The code is linear (no activation at the bottleneck) so it can take any real value,
    as in the reference workflow.
    """

    def __init__(
        self,
        bottleneck: int,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        in_features: int = PIXELS,
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.to_latent = mlp([in_features, *hidden, bottleneck], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(x.flatten(1))  # (B, 784) -> (B, z)


class Decoder(nn.Module):
    """g: bottleneck code -> image. ``(B, z)`` -> ``(B, 1, 28, 28)`` with pixels in (0, 1).

    Ends in a sigmoid because the targets are pixels in [0, 1]; ``hidden`` lists the layer
    sizes from the bottleneck outwards (the mirror of the encoder's).
    """

    def __init__(
        self,
        bottleneck: int,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        image_shape: Sequence[int] = IMAGE_SHAPE,
    ) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.image_shape = tuple(image_shape)
        out_features = 1
        for dim in self.image_shape:
            out_features *= dim
        self.to_pixels = nn.Sequential(
            mlp([bottleneck, *hidden, out_features], activation), nn.Sigmoid()
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.to_pixels(z).view(-1, *self.image_shape)  # (B, z) -> (B, 1, 28, 28)


def build_encoder_decoder(
    bottleneck: int,
    hidden: Sequence[int] = (),
    activation: str = "relu",
    decoder_hidden: Sequence[int] | None = None,
) -> tuple[Encoder, Decoder]:
    """Encoder with ``hidden`` sizes and a decoder that mirrors it unless told otherwise."""
    hidden = list(hidden)
    mirrored = list(reversed(hidden)) if decoder_hidden is None else list(decoder_hidden)
    return (
        Encoder(bottleneck, hidden, activation),
        Decoder(bottleneck, mirrored, activation),
    )


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
