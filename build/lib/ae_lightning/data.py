"""MNIST held in memory as uint8 tensors, served as batches sliced on the training device.

MNIST is 47 MB as uint8, so the whole split lives on the device and an epoch is a seeded
permutation plus tensor slicing: no per-sample PIL decoding, no worker processes. Batches
stay uint8 until ``on_after_batch_transfer`` scales them to float pixels in [0, 1].

With ``steps_per_call=K > 1`` a training "batch" is a list of K consecutive minibatches that
the module steps through in one Lightning step (see ``Autoencoder``): the same minibatches in
the same order, with Lightning's per-batch cost paid once per K optimizer steps.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST

from ae_lightning.errors import UserError

DATA_ENV_VAR = "AE_DATA_ROOT"
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # uint8, 3-D / 1-D
Batch = tuple[torch.Tensor, torch.Tensor]
TrainBatch = Batch | list[Batch]  # a list of minibatches when steps_per_call > 1


def steps_per_call_for(requested: int, trainer: pl.Trainer | None) -> int:
    """``requested``, or 1 under DDP, whose gradient sync expects one backward per step."""
    return 1 if trainer is not None and trainer.world_size > 1 else requested


class MNISTNotFoundError(UserError):
    """MNIST is neither in the data folder nor downloadable."""


class MNISTFileError(UserError):
    """An MNIST file is there but unreadable, not IDX, or truncated."""


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """``(B, 28, 28)`` uint8 -> ``(B, 1, 28, 28)`` float pixels in [0, 1]."""
    return images.unsqueeze(1).float().div_(255.0)


def load_mnist(root: str | os.PathLike, train: bool, download: bool = True) -> Batch:
    """Parse one official MNIST split with torchvision into ``(uint8 images, int64 labels)``.

    Downloads into ``root/MNIST/raw`` when the files are missing and ``download`` is set;
    when that fails (no network), raises one sentence that names the folder and the fix.
    """
    root = Path(root).expanduser()
    raw = root / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    for kind, magic in (("images-idx3", IDX_IMAGES), ("labels-idx1", IDX_LABELS)):
        path = raw / f"{prefix}-{kind}-ubyte"
        if path.exists() or path.is_symlink():
            check_idx_file(path, magic)
    try:
        dataset = MNIST(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise MNISTNotFoundError(
                _not_found_message(raw, "downloading is switched off")
            ) from None
        try:
            dataset = MNIST(str(root), train=train, download=True)
        except Exception as err:  # URLError, OSError, RuntimeError: all mean "no copy here"
            reason = f"the download failed ({type(err).__name__})"
            raise MNISTNotFoundError(_not_found_message(raw, reason)) from None
    return dataset.data, dataset.targets


def check_idx_file(path: Path, magic: int) -> None:
    """Raise one clear sentence if ``path`` is unreadable, not IDX, or cut short."""
    fix = (
        f"delete it and run again to re-download, or point data.root (or {DATA_ENV_VAR}) "
        "at a good copy"
    )
    try:
        with open(path, "rb") as f:
            header = f.read(4)
            found = int.from_bytes(header, "big") if len(header) == 4 else None
            if found != magic:
                shown = "nothing" if found is None else f"0x{found:08x}"
                raise MNISTFileError(
                    f"MNIST file {path} is not an IDX file of this kind (magic number {shown}, "
                    f"expected 0x{magic:08x}): {fix}."
                )
            ndim = magic & 0xFF
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    except OSError as err:
        raise MNISTFileError(
            f"MNIST file {path} cannot be read ({err.strerror or type(err).__name__}): make it "
            f"a readable file or point data.root (or {DATA_ENV_VAR}) at a readable copy."
        ) from None
    except struct.error:
        raise MNISTFileError(f"MNIST file {path} ends inside its header: {fix}.") from None
    expected = 4 + 4 * len(dims) + math.prod(dims)
    actual = path.stat().st_size
    if actual != expected:
        raise MNISTFileError(
            f"MNIST file {path} has {actual} bytes but its header {list(dims)} promises "
            f"{expected} (truncated or corrupted): {fix}."
        )


def _not_found_message(raw: Path, reason: str) -> str:
    return (
        f"MNIST was not found in {raw} and {reason}: point the run at a copy in torchvision's "
        f"layout with data.root=/path/to/data or the environment variable {DATA_ENV_VAR}, "
        "or run once with network access to download it there."
    )


class EpochPermutation:
    """Indices of one epoch: a fresh seeded permutation per epoch, drawn on the device.

    Lightning calls ``set_epoch`` on a loader's ``sampler`` before each epoch, so the order
    depends only on (seed, epoch): a resumed run sees the batches the original would have.
    Under DDP each rank takes a disjoint, equally long shard of every epoch's permutation.
    """

    def __init__(
        self, n: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.shuffle:
            return self.n // self.world_size  # equal shards so no rank waits on another
        return len(range(self.rank, self.n, self.world_size))

    def indices(self, device: torch.device) -> torch.Tensor | slice:
        """This rank's indices for the current epoch (a slice when nothing is shuffled)."""
        if not self.shuffle:
            return slice(self.rank, self.n, self.world_size)
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator, device=device)
        end = len(self) * self.world_size
        return order[self.rank : end : self.world_size]


class InMemoryBatches:
    """Iterable of ``(uint8 images, labels)`` batches sliced from tensors on one device.

    With ``steps_per_call=K > 1`` it yields lists of K such minibatches (the last list of an
    epoch may be shorter); the minibatches themselves are the same either way.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        sampler: EpochPermutation,
        drop_last: bool = False,
        steps_per_call: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.drop_last = batch_size, drop_last
        self.steps_per_call = steps_per_call
        # DataLoader's attribute names: Lightning calls `sampler.set_epoch` before each epoch.
        self.sampler = sampler
        self.batch_sampler = None

    @property
    def num_minibatches(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.num_minibatches / self.steps_per_call)

    def __iter__(self) -> Iterator[TrainBatch]:
        index = self.sampler.indices(self.images.device)
        images, labels = self.images[index], self.labels[index]  # one gather per epoch
        size, per_call = self.batch_size, self.steps_per_call
        starts = range(0, self.num_minibatches * size, size)
        if per_call == 1:
            for start in starts:
                yield images[start : start + size], labels[start : start + size]
            return
        for first in range(0, len(starts), per_call):
            yield [
                (images[start : start + size], labels[start : start + size])
                for start in starts[first : first + per_call]
            ]


class MNISTDataModule(pl.LightningDataModule):
    """MNIST: a seeded train/val split of the 60k training images; the official 10k as test."""

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        download: bool = True,
        loader: str = "memory",
        num_workers: int = 0,
        steps_per_call: int = 1,
    ) -> None:
        super().__init__()
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size  # eval has no backward pass: bigger is faster
        self.val_size = val_size
        self.split_seed = split_seed  # fixed apart from `seed` so every run validates alike
        self.seed = seed
        self.drop_last = drop_last
        self.download = download
        self.loader = loader  # "memory": device-resident tensors; "dataloader": torch DataLoader
        self.num_workers = num_workers
        # Training minibatches per Lightning step; must match the module's (one config key).
        self.steps_per_call = steps_per_call
        self._splits: dict[str, Batch] = {}
        self._parsed: dict[bool, Batch] = {}

    # --- Lightning hooks -----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download once (rank zero) if the files are missing; keep what was parsed."""
        for train in (True, False):
            self._parsed[train] = load_mnist(self.root, train=train, download=self.download)

    def _load(self, train: bool) -> Batch:
        """A split parsed by ``prepare_data`` in this process, else parsed now."""
        if train not in self._parsed:
            self._parsed[train] = load_mnist(self.root, train=train, download=self.download)
        return self._parsed.pop(train)  # setup keeps its own slices; free the full copy

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        images, labels = self._load(train=True)
        if not 0 < self.val_size < len(images) or self.batch_size > len(images) - self.val_size:
            raise UserError(
                f"data.val_size={self.val_size} with data.batch_size={self.batch_size} does not "
                f"fit the {len(images)} training images in {self.root}: keep val_size below "
                "the image count and batch_size at most what is left for training."
            )
        order = torch.randperm(
            len(images), generator=torch.Generator().manual_seed(self.split_seed)
        )
        val, train = order[: self.val_size], order[self.val_size :]
        self._splits["train"] = images[train], labels[train]
        self._splits["val"] = images[val], labels[val]
        self._splits["test"] = self._load(train=False)

    def train_dataloader(self) -> InMemoryBatches | DataLoader:
        steps = steps_per_call_for(self.steps_per_call, self.trainer)
        return self._batches(
            "train", self.batch_size, shuffle=True, drop_last=self.drop_last, steps_per_call=steps
        )

    def val_dataloader(self) -> InMemoryBatches | DataLoader:
        return self._batches("val", self.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> InMemoryBatches | DataLoader:
        return self._batches("test", self.eval_batch_size, shuffle=False, drop_last=False)

    def on_after_batch_transfer(self, batch: TrainBatch, dataloader_idx: int) -> TrainBatch:
        if isinstance(batch, list):
            return [(to_unit_float(images), labels) for images, labels in batch]
        images, labels = batch
        return to_unit_float(images), labels

    # --- public API for callbacks, comparisons and benchmarks -----------------------------
    def split(self, name: str) -> Batch:
        """``(uint8 images (N, 28, 28), labels (N,))`` of ``"train"``, ``"val"`` or ``"test"``."""
        if not self._splits:
            self.setup()
        return self._splits[name]

    def probe_images(self, n: int = 64, split: str = "test") -> Batch:
        """The first ``n`` images of a split as float pixels, the same in every run."""
        images, labels = self.split(split)
        return to_unit_float(images[:n]), labels[:n]

    # --- internals -------------------------------------------------------------------------
    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _batches(
        self, split: str, batch_size: int, shuffle: bool, drop_last: bool, steps_per_call: int = 1
    ) -> InMemoryBatches | DataLoader:
        images, labels = self.split(split)
        if self.loader == "dataloader":  # the standard path, for data that does not fit
            # (one minibatch per Lightning step; the module takes a lone batch as a list of one)
            return DataLoader(
                TensorDataset(images, labels),
                batch_size=batch_size,
                shuffle=shuffle,
                drop_last=drop_last,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            )
        device = self._device()
        rank, world_size = self._rank_and_world()
        sampler = EpochPermutation(len(images), self.seed, shuffle, rank, world_size)
        return InMemoryBatches(
            images.to(device),
            labels.to(device),
            batch_size,
            sampler,
            drop_last=drop_last,
            steps_per_call=steps_per_call,
        )
