"""A finished run for notebooks and export: ``run = ae_lightning.load_run("logs/runs/<run>")``.

Everything in a run folder is read as data: the checkpoint with ``weights_only=True``, the
saved config as plain YAML (never instantiated), ``metrics.json`` as JSON. Images go in as
numpy arrays or tensors of the run's image shape, ``(N, C, H, W)``, ``(N, H, W)`` (grey) or
flat ``(N, C*H*W)`` (MNIST: ``(N, 28, 28)``, ``(N, 1, 28, 28)`` or ``(N, 784)``), uint8
(0-255) or float in [0, 1]; results come back as tensors on the model's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ae_lightning import runfolder
from ae_lightning.data import MNISTDataModule, to_unit_float
from ae_lightning.errors import UserError
from ae_lightning.latent import SAMPLERS, CodeSampler, encode_images
from ae_lightning.latent import interpolate as line_between

ArrayLike = np.ndarray | torch.Tensor


# --- the public API -------------------------------------------------------------------------


@dataclass
class Run:
    """A trained model with its config and metrics, and image-level helpers for notebooks."""

    path: Path
    checkpoint: Path
    model: pl.LightningModule
    config: DictConfig
    metrics: dict[str, Any]
    data_root: str | None = None
    _samplers: dict[tuple[str, int, int], CodeSampler] = field(default_factory=dict, repr=False)
    _data: MNISTDataModule | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def bottleneck(self) -> int:
        return int(self.model.bottleneck)

    def to(self, device: torch.device | str) -> Run:
        """Move the model (and so every result) to ``device``; returns the run."""
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: ArrayLike) -> torch.Tensor:
        """Codes ``(N, z)`` of images (the mean code for a variational model)."""
        return self.model.encode(self._pixels(images))

    @torch.no_grad()
    def decode(self, codes: ArrayLike) -> torch.Tensor:
        """Images ``(N, C, H, W)``, pixels in (0, 1), of codes ``(N, z)``."""
        return self.model.decode(self._codes(codes))

    @torch.no_grad()
    def reconstruct(self, images: ArrayLike) -> torch.Tensor:
        """``decode(encode(images))``: ``(N, C, H, W)`` pixels in (0, 1)."""
        return self.model.decode(self.model.encode(self._pixels(images)))

    @torch.no_grad()
    def interpolate(self, a: ArrayLike, b: ArrayLike, steps: int = 11) -> torch.Tensor:
        """``steps`` images decoded along the straight line between the codes of ``a`` and ``b``.

        ``a`` and ``b`` are one image each; the first and last outputs are their
        reconstructions. A pixel cross-fade would only blend the two pictures.
        """
        if not isinstance(steps, int) or steps < 2:
            raise UserError(f"steps={steps!r} is too few: an interpolation needs steps >= 2.")
        ends = [self._pixels(self._one_image(x, name), name) for x, name in ((a, "a"), (b, "b"))]
        z_a, z_b = (self.model.encode(x)[0] for x in ends)
        return self.model.decode(line_between(z_a, z_b, steps))

    @torch.no_grad()
    def sample(
        self, n: int, sampler: str = "gaussian", seed: int = 0, fit_on: int = 10_000
    ) -> torch.Tensor:
        """``n`` images decoded from codes drawn by ``sampler``: ``prior``, the model's own
        prior (a VAE's N(0, I)); ``gaussian``, ``gmm`` or ``box`` fitted to ``fit_on``
        training codes; ``normal``, N(0, I) whatever the model."""
        if sampler != "prior" and sampler not in SAMPLERS:
            choices = ("prior", *SAMPLERS)
            raise UserError(f"sampler={sampler!r} is not a sampler: choose one of {choices}.")
        if not isinstance(n, int) or n < 1:
            raise UserError(f"n={n!r} is not a positive whole number of samples: use e.g. 16.")
        if sampler == "prior":
            prior = self.model.prior_sample(n, seed)
            if prior is None:
                raise UserError(
                    f"sampler='prior' needs a model with a prior of its own, and this run's "
                    f"{self.model.family} model has none: use sampler='gaussian'."
                )
            return self.model.decode(prior.to(self.device))
        key = (sampler, seed, fit_on)
        if key not in self._samplers:
            if sampler == "normal":
                codes = torch.zeros(1, self.bottleneck)  # N(0, I) needs only the code size
            else:
                images, _ = self.train_images()
                codes = encode_images(self.model.encode, images[:fit_on], device=self.device)
            self._samplers[key] = CodeSampler(sampler, codes, seed=seed)
        return self.model.decode(self._samplers[key].sample(n).to(self.device))

    def test_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 images, labels (N,))`` of the run's test split, on the CPU."""
        return self._datamodule().split("test")

    def train_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The run's own training split (its ``val_size`` and ``split_seed``), on the CPU."""
        return self._datamodule().split("train")

    # --- input checks: one sentence each -------------------------------------------------

    def _datamodule(self) -> MNISTDataModule:
        if self._data is None:
            folder = self.path if self.path.is_dir() else None
            self._data = runfolder.saved_data_module(folder, self.data_root)
            self._data.setup()
        return self._data

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the run was trained on (MNIST's ``(1, 28, 28)``)."""
        return tuple(self.model.image_shape)

    def _one_shapes(self) -> list[tuple[int, ...]]:
        """One image's accepted shapes: ``(H, W)`` if grey, ``(C, H, W)`` and flat."""
        channels, height, width = self.image_shape
        grey = [(height, width)] if channels == 1 else []
        return [*grey, (channels, height, width), (channels * height * width,)]

    def _shapes_text(self) -> str:
        """``(N, 28, 28), (N, 1, 28, 28) or (N, 784)`` for this run's images."""
        shown = [str(("N", *s)).replace("'", "") for s in self._one_shapes()]
        return ", ".join(shown[:-1]) + f" or {shown[-1]}"

    def _one_image(self, x: ArrayLike, name: str) -> ArrayLike:
        if tuple(x.shape) in self._one_shapes():
            return x.reshape(1, math.prod(self.image_shape))
        if len(x.shape) >= 2 and x.shape[0] == 1:
            return x
        one = [str(s) for s in self._one_shapes()]
        raise UserError(
            f"{name} has shape {tuple(x.shape)}: interpolate takes one image each, of shape "
            f"{', '.join(one[:-1])} or {one[-1]}."
        )

    def _pixels(self, images: ArrayLike, name: str = "images") -> torch.Tensor:
        """``(N, C, H, W)`` float32 on the model's device, or one sentence saying why not."""
        x = _as_tensor(images, name)
        shape = tuple(x.shape)
        if not (x.dim() >= 2 and shape[1:] in self._one_shapes()):
            hint = " (add a batch dimension: x[None])" if shape in self._one_shapes() else ""
            raise UserError(f"{name} has shape {shape}: pass {self._shapes_text()}{hint}.")
        x = x.reshape(-1, *self.image_shape)
        if x.dtype == torch.uint8:
            return to_unit_float(x.to(self.device))
        if not x.is_floating_point():
            raise UserError(
                f"{name} has dtype {x.dtype}: pass uint8 (0-255) or float pixels in [0, 1]."
            )
        low, high = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
        if not (low >= 0.0 and high <= 1.0):  # also catches NaN
            hint = " (divide 0-255 values by 255, or pass uint8)" if high > 1 else ""
            raise UserError(
                f"{name} has float values from {low:g} to {high:g}: pixels must lie in "
                f"[0, 1]{hint}."
            )
        return x.to(self.device, torch.float32)

    def _codes(self, codes: ArrayLike) -> torch.Tensor:
        z = _as_tensor(codes, "codes")
        if z.dim() == 1:
            z = z.unsqueeze(0)
        if z.dim() != 2 or z.shape[1] != self.bottleneck or not z.is_floating_point():
            raise UserError(
                f"codes have shape {tuple(codes.shape)} and dtype {z.dtype}: pass floats of "
                f"shape (N, {self.bottleneck}), this model's code size."
            )
        return z.to(self.device, torch.float32)


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise UserError(f"{name} is a {type(x).__name__}: pass a numpy array or a torch tensor.")


def load_run(
    path: str | Path,
    checkpoint: str = "best",
    device: torch.device | str | None = None,
    data_root: str | Path | None = None,
) -> Run:
    """Load a finished run: a run folder, a sweep job folder or a ``.ckpt`` file.

    ``checkpoint``: ``best`` (lowest val/mse, the default) or ``last``. ``device``: where the
    model lives (default: a GPU if there is one). ``data_root``: where the data is on this
    machine (default: ``$AE_DATA_ROOT``, else ``./data``; the run's own ``data.root`` is
    never read, as it names the sender's machine); for an npz or image-folder run, the folder
    holding its file (a run's own ``data.path`` is read only inside its folder).
    """
    named = Path(path).expanduser()
    files = runfolder.find_files(named, checkpoint)
    config = OmegaConf.create(runfolder.saved_config(files.folder))  # plain values only
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    within = files.folder if named.is_dir() else None  # a checkpoint found in the folder named
    model = runfolder.load_autoencoder(files.checkpoint, map_location=device, within=within)
    return Run(
        path=files.folder or files.checkpoint,
        checkpoint=files.checkpoint,
        model=model,
        config=config,
        metrics=runfolder.metrics(files.folder) if files.folder is not None else {},
        data_root=str(data_root) if data_root is not None else None,
    )
