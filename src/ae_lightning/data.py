"""Images held in memory as uint8 tensors, served as batches sliced on the training device.

MNIST (and Fashion-MNIST, KMNIST) through torchvision; a user's ``.npz`` (``NpzDataModule``)
or ``ImageFolder`` (``ImageFolderDataModule``) through the same machinery, their image shape
``(C, H, W)`` read from the data (``image_shape``) and handed to the model.

MNIST is 47 MB as uint8, so the whole split lives on the device and an epoch is a seeded
permutation plus tensor slicing: no per-sample PIL decoding, no worker processes. Batches
stay uint8 until ``on_after_batch_transfer`` scales them to float pixels in [0, 1].

With ``steps_per_call=K > 1`` a training "batch" is a list of K consecutive minibatches that
the module steps through in one Lightning step (see ``Autoencoder``): the same minibatches in
the same order, with Lightning's per-batch cost paid once per K optimizer steps.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import struct
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision.datasets import KMNIST, MNIST, FashionMNIST

from ae_lightning.errors import UserError
from ae_lightning.nets import IMAGE_SHAPE

DATA_ENV_VAR = "AE_DATA_ROOT"
DEFAULT_BATCH_SIZE = 128  # the reference workflow's
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # uint8, 3-D / 1-D
IDX_IMAGE_DIMS = IMAGE_SHAPE[1:]  # what the nets of MNIST-style datasets are built for
Batch = tuple[torch.Tensor, torch.Tensor]
# data.dataset -> (torchvision class, name in messages, class names). All three ship the same
# IDX files (60k train, 10k test, 28x28 uint8) in <root>/<class name>/raw/.
DATASETS: dict[str, tuple[type[MNIST], str, tuple[str, ...]]] = {
    "mnist": (MNIST, "MNIST", tuple(str(d) for d in range(10))),
    "fashion_mnist": (FashionMNIST, "Fashion-MNIST", tuple(FashionMNIST.classes)),
    "kmnist": (KMNIST, "KMNIST", tuple(KMNIST.classes)),
}
TrainBatch = Batch | list[Batch]  # a list of minibatches when steps_per_call > 1
BINARIZE = ("none", "dynamic", "static")


def steps_per_call_for(requested: int, trainer: pl.Trainer | None) -> int:
    """``requested``, or 1 under DDP, whose gradient sync expects one backward per step."""
    return 1 if trainer is not None and trainer.world_size > 1 else requested


class MNISTNotFoundError(UserError):
    """MNIST is neither in the data folder nor downloadable."""


class MNISTFileError(UserError):
    """An MNIST file is there but unreadable, not IDX, or truncated."""


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` (grey) or ``(B, C, H, W)`` uint8 -> ``(B, C, H, W)`` float pixels in [0, 1]."""
    images = images.unsqueeze(1) if images.dim() == 3 else images
    return images.float().div_(255.0)


def binarized(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images with each pixel 255 with probability intensity / 255, else 0.

    Bernoulli draws, as for the binarised MNIST of the likelihood papers (Burda et al. 2016
    binarise dynamically: ``dynamic`` in ``MNISTDataModule``).
    """
    probability = images.float().div_(255.0)
    return torch.bernoulli(probability, generator=generator).mul_(255).to(torch.uint8)


def metric_suffix(dataset: str, label: int) -> str:
    """``digit3`` for MNIST; the class name as a tag-safe word otherwise (``t_shirt_top``)."""
    if dataset == "mnist":
        return f"digit{label}"
    return _slug(DATASETS[dataset][2][label])


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def load_mnist(
    root: str | os.PathLike, train: bool, download: bool = True, dataset: str = "mnist"
) -> Batch:
    """Parse one official split with torchvision into ``(uint8 images, int64 labels)``.

    ``dataset`` is ``mnist``, ``fashion_mnist`` or ``kmnist`` (``DATASETS``).

    Downloads into ``root/MNIST/raw`` when the files are missing and ``download`` is set;
    when that fails (no network), raises one sentence that names the folder and the fix.
    """
    if dataset not in DATASETS:
        raise UserError(
            f"data.dataset={dataset!r} is not a dataset: use one of {', '.join(DATASETS)} "
            "(data=mnist, data=fashion_mnist or data=kmnist)."
        )
    torchvision_class, name, _ = DATASETS[dataset]
    root = Path(root).expanduser()
    raw = root / torchvision_class.__name__ / "raw"
    prefix = "train" if train else "t10k"
    counts = {}
    for kind, magic in (("images-idx3", IDX_IMAGES), ("labels-idx1", IDX_LABELS)):
        path = raw / f"{prefix}-{kind}-ubyte"
        if path.exists() or path.is_symlink():
            counts[path] = check_idx_file(path, magic, name)[0]
    if len(counts) == 2 and len(set(counts.values())) == 2:
        (images_file, images), (labels_file, labels) = counts.items()
        raise MNISTFileError(
            f"{name} file {images_file} holds {images} images but {labels_file} holds {labels} "
            f"labels: both files must come from the same split; re-download them, or point "
            f"data.root (or {DATA_ENV_VAR}) at a good copy."
        )
    try:
        split = torchvision_class(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise MNISTNotFoundError(
                _not_found_message(raw, "downloading is switched off (data.download=false)", name)
            ) from None
        new_folders = [f for f in (raw, *raw.parents) if not f.exists()]  # deepest first
        try:
            split = torchvision_class(str(root), train=train, download=True)
        except Exception as err:  # URLError, OSError, RuntimeError: all mean "no copy here"
            for folder in new_folders:  # the empty folders torchvision made for it
                with contextlib.suppress(OSError):
                    folder.rmdir()
            reason = f"the download failed ({type(err).__name__})"
            raise MNISTNotFoundError(_not_found_message(raw, reason, name)) from None
    check_pair(raw, prefix, split.data, split.targets, name)
    return split.data, split.targets


def check_pair(
    raw: Path, prefix: str, images: torch.Tensor, labels: torch.Tensor, name: str = "MNIST"
) -> None:
    """Images and labels of one split belong together: same count, classes 0-9 only."""
    images_file, labels_file = (
        raw / f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")
    )
    fix = (
        f"both files must come from the same split; re-download them, or point data.root "
        f"(or {DATA_ENV_VAR}) at a good copy"
    )
    if len(images) != len(labels):
        raise MNISTFileError(
            f"{name} file {images_file} holds {len(images)} images but {labels_file} holds "
            f"{len(labels)} labels: {fix}."
        )
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise MNISTFileError(
            f"{name} file {labels_file} has labels from {int(labels.min())} to "
            f"{int(labels.max())}, not classes 0-9: {fix}."
        )


def check_idx_file(path: Path, magic: int, name: str = "MNIST") -> tuple[int, ...]:
    """The header's dims, or one clear sentence if ``path`` is unreadable, not IDX, not of
    28x28 images (the nets' shape: other dims would crash mid-run), or cut short."""
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
                    f"{name} file {path} is not an IDX file of this kind (magic number {shown}, "
                    f"expected 0x{magic:08x}): {fix}."
                )
            ndim = magic & 0xFF
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    except OSError as err:
        raise MNISTFileError(
            f"{name} file {path} cannot be read ({err.strerror or type(err).__name__}): make it "
            f"a readable file or point data.root (or {DATA_ENV_VAR}) at a readable copy."
        ) from None
    except struct.error:
        raise MNISTFileError(f"{name} file {path} ends inside its header: {fix}.") from None
    if magic == IDX_IMAGES and dims[1:] != IDX_IMAGE_DIMS:
        height, width = IDX_IMAGE_DIMS
        raise MNISTFileError(
            f"{name} file {path} holds images of {dims[1]}x{dims[2]} pixels (header "
            f"{list(dims)}), not the {height}x{width} of {name}: {fix}."
        )
    expected = 4 + 4 * len(dims) + math.prod(dims)
    actual = path.stat().st_size
    if actual != expected:
        raise MNISTFileError(
            f"{name} file {path} has {actual} bytes but its header {list(dims)} promises "
            f"{expected} (truncated or corrupted): {fix}."
        )
    return dims


def _not_found_message(raw: Path, reason: str, name: str = "MNIST") -> str:
    return (
        f"{name} was not found in {raw} and {reason}: point the run at a copy in torchvision's "
        f"layout with data.root=/path/to/data or the environment variable {DATA_ENV_VAR}, "
        "or run once with network access (and data.download=true) to download it there."
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


class _ResumesMidEpoch:
    """Lightning's ``state_dict``/``load_state_dict`` protocol for loaders: a checkpoint
    records the epoch and how many of its minibatches were handed out, and a resumed run
    skips exactly those (the order depends only on seed and epoch)."""

    _served = 0  # minibatches handed out in the current epoch
    _resume_at: tuple[int, int] | None = None  # (epoch, minibatches) to skip

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "minibatches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """``state`` comes from a checkpoint, perhaps a received one: two whole numbers, the
        count clamped at 0 so a crafted one cannot start an epoch anywhere but its start."""
        epoch, served = (state.get(key) if isinstance(state, dict) else None
                         for key in ("epoch", "minibatches"))  # fmt: skip
        if not all(type(value) is int for value in (epoch, served)):
            raise UserError(
                f"The checkpoint's loader state {state!r} is not an epoch and a count of "
                "minibatches: resume from a checkpoint that train.py wrote."
            )
        self._resume_at = (epoch, max(0, served))

    def _resume_skip(self) -> int:
        """Minibatches of this epoch a resumed run has already trained on (0 otherwise);
        read once, so the next epoch starts from its first minibatch."""
        resume_at, self._resume_at = self._resume_at, None
        if resume_at is None or resume_at[0] != self.sampler.epoch:
            return 0
        return min(resume_at[1], self.num_minibatches)


class InMemoryBatches(_ResumesMidEpoch):
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
        skip = self._resume_skip()
        starts = range(skip * size, self.num_minibatches * size, size)
        self._served = skip
        for first in range(0, len(starts), per_call):
            group = [
                (images[start : start + size], labels[start : start + size])
                for start in starts[first : first + per_call]
            ]
            self._served += len(group)
            yield group[0] if per_call == 1 else group


class EpochSampler(DistributedSampler):
    """``EpochPermutation``'s order (this rank's shard) as a torch sampler, for a DataLoader.

    A ``DistributedSampler`` so that Lightning, under DDP, keeps it rather than wrapping it in
    one that would shard the shard again; ``skip`` drops the first indices of the next epoch
    only, where a resumed run starts.
    """

    def __init__(self, permutation: EpochPermutation) -> None:
        super().__init__(
            range(permutation.n), num_replicas=permutation.world_size, rank=permutation.rank,
            shuffle=permutation.shuffle, seed=permutation.seed,
        )  # fmt: skip
        self.permutation = permutation
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.permutation.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.permutation)

    def __iter__(self) -> Iterator[int]:
        index = self.permutation.indices(torch.device("cpu"))
        order = range(self.permutation.n)[index] if isinstance(index, slice) else index.tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])


class ResumableDataLoader(_ResumesMidEpoch, DataLoader):
    """A standard DataLoader (worker processes, any dataset) in the in-memory loader's order,
    resumable mid-epoch the same way: one minibatch per Lightning step."""

    sampler: EpochSampler

    @property
    def num_minibatches(self) -> int:
        return DataLoader.__len__(self)

    def __iter__(self) -> Iterator[Batch]:
        skip = self._resume_skip()
        self.sampler.skip, self._served = skip * self.batch_size, skip
        for batch in super().__iter__():
            self._served += 1
            yield batch


def _binarized_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float pixels, each 1 with probability intensity / 255, else 0."""
    return torch.bernoulli(to_unit_float(images))


def _stack_pair(samples: list[Batch]) -> Batch:
    """A DataLoader batch as an ``(images, labels)`` tuple, like the in-memory loader's.

    (PyTorch's default collate gives a list, which reads as a list of K minibatches.)
    """
    images, labels = zip(*samples, strict=True)
    return torch.stack(images), torch.stack(labels)


class MNISTDataModule(pl.LightningDataModule):
    """MNIST (or Fashion-MNIST, KMNIST: ``dataset``): a seeded train/val split of the 60k
    training images; the official 10k as test.

    ``binarize``: ``none`` (grey pixels), ``static`` (every split binarised once with
    ``binarize_seed``) or ``dynamic`` (validation and test binarised once like ``static``;
    each training minibatch re-binarised on the device as it arrives, so each epoch sees
    new draws). Under ``dynamic``, :meth:`split` gives evaluation a training split
    binarised once as well, so codes fitted on it (kNN, probe, samplers) come from images
    like those the model trains on and is tested on, not from grey ones.
    """

    def __init__(
        self,
        root: str = "data",
        batch_size: int = DEFAULT_BATCH_SIZE,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        download: bool = True,
        loader: str = "memory",
        num_workers: int = 0,
        steps_per_call: int = 1,
        dataset: str = "mnist",
        binarize: str = "none",
        binarize_seed: int = 0,
    ) -> None:
        super().__init__()
        if binarize not in BINARIZE:
            raise UserError(
                f"data.binarize={binarize!r} is not a choice: use one of {', '.join(BINARIZE)}."
            )
        self.binarize, self.binarize_seed = binarize, binarize_seed
        self._evaluation_train: Batch | None = None
        self.root = root
        self.dataset = dataset
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
        self._grey_splits: dict[str, Batch] = {}

    # --- Lightning hooks -----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download once (rank zero) if the files are missing, and check them; keeps nothing.

        Lightning runs this on one process only, so what it parsed would not reach the
        others; ``setup`` parses the files itself.
        """
        for train in (True, False):
            load_mnist(self.root, train, self.download, self.dataset)

    def _load(self, train: bool) -> Batch:
        return load_mnist(self.root, train, self.download, self.dataset)

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        images, labels = self._load(train=True)
        if not 0 < self.val_size < len(images) or self.batch_size > len(images) - self.val_size:
            raise UserError(
                f"data.val_size={self.val_size} with data.batch_size={self.batch_size} does not "
                f"fit the {len(images)} training images in {self.root_name}: keep val_size below "
                "the image count and batch_size at most what is left for training."
            )
        order = torch.randperm(
            len(images), generator=torch.Generator().manual_seed(self.split_seed)
        )
        val, train = order[: self.val_size], order[self.val_size :]
        self._splits["train"] = images[train], labels[train]
        self._splits["val"] = images[val], labels[val]
        self._splits["test"] = self._load(train=False)
        self._grey_splits = dict(self._splits)  # the same tensors unless binarised below
        if self.binarize != "none":
            fixed = ("val", "test") if self.binarize == "dynamic" else ("train", "val", "test")
            for offset, name in enumerate(fixed):
                generator = torch.Generator().manual_seed(self.binarize_seed * 1_000 + offset)
                split_images, split_labels = self._splits[name]
                self._splits[name] = binarized(split_images, generator), split_labels
        if self.binarize == "dynamic":  # one fixed draw of the training images, to evaluate on
            generator = torch.Generator().manual_seed(self.binarize_seed * 1_000 + 2)
            train_images, train_labels = self._splits["train"]
            self._evaluation_train = binarized(train_images, generator), train_labels

    def train_dataloader(self) -> InMemoryBatches | DataLoader:
        steps = steps_per_call_for(self.steps_per_call, self.trainer)
        # Trainer(overfit_batches=N) (debug=overfit) means the same N batches every epoch:
        # Lightning only unshuffles loaders whose sampler it knows, so ours stops itself.
        overfitting = self.trainer is not None and self.trainer.overfit_batches > 0
        return self._batches(
            "train", self.batch_size, shuffle=not overfitting, drop_last=self.drop_last,
            steps_per_call=steps,
        )  # fmt: skip

    def val_dataloader(self) -> InMemoryBatches | DataLoader:
        return self._batches("val", self.eval_batch_size, shuffle=False, drop_last=False)

    def test_dataloader(self) -> InMemoryBatches | DataLoader:
        return self._batches("test", self.eval_batch_size, shuffle=False, drop_last=False)

    def on_after_batch_transfer(self, batch: TrainBatch, dataloader_idx: int) -> TrainBatch:
        if isinstance(batch, torch.Tensor):  # the model summary's example input, pixels already
            return batch
        pixels = to_unit_float
        if self.binarize == "dynamic" and self.trainer is not None and self.trainer.training:
            pixels = _binarized_pixels  # fresh draws each minibatch, on the device
        if isinstance(batch, list):
            return [(pixels(images), labels) for images, labels in batch]
        images, labels = batch
        return pixels(images), labels

    # --- public API for callbacks, comparisons and benchmarks -----------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image: what the model's nets are built for."""
        return IMAGE_SHAPE

    @property
    def root_name(self) -> str:
        """Where the images come from, for messages (the file or folder a user named)."""
        return self.root

    @property
    def has_labels(self) -> bool:
        """False for label-free data: the label metrics and the scatter's colours are skipped."""
        return True

    @property
    def class_names(self) -> tuple[str, ...]:
        """The ten labels' names, for legends and titles (``T-shirt/top``... for Fashion)."""
        return DATASETS[self.dataset][2]

    @property
    def display_name(self) -> str:
        return DATASETS[self.dataset][1]

    @property
    def label_word(self) -> str:
        """What one label is, for legends and captions: a digit on MNIST, a class elsewhere."""
        return "digit" if self.dataset == "mnist" else "class"

    @property
    def metric_names(self) -> list[str]:
        """Each class's word in ``test/mse_<word>`` (``digit3``, ``t_shirt_top``)."""
        return [metric_suffix(self.dataset, c) for c in range(len(self.class_names))]

    def split(self, name: str) -> Batch:
        """``(uint8 images (N, H, W) or (N, C, H, W), labels (N,))`` of ``"train"``, ``"val"``
        or ``"test"`` (zeros as labels for label-free data)."""
        if not self._splits:
            self.setup()
        if name == "train" and self._evaluation_train is not None:
            return self._evaluation_train
        return self._splits[name]

    def grey_split(self, name: str) -> Batch:
        """A split as its files hold it, before any ``binarize``: what a model's outputs are
        compared with. A binarised pixel is 1 with probability intensity/255, so a decoder's
        mean estimates the grey pixel, not the draw (the same as :meth:`split` when not
        binarised)."""
        if not self._splits:
            self.setup()
        return self._grey_splits[name]

    def official_train_split(self) -> Batch:
        """All official training images in file order (validation's too), whatever the run's
        ``val_size`` and split seed: what the sample-quality classifier learns from."""
        return self._load(train=True)

    @property
    def cache_dir(self) -> Path:
        """``<root>/<Dataset>/ae_lightning/``: what is derived from these files, beside them."""
        return Path(self.root).expanduser() / DATASETS[self.dataset][0].__name__ / "ae_lightning"

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
        if not self._splits:
            self.setup()
        images, labels = self._splits[split]  # under dynamic binarisation, the grey pixels
        rank, world_size = self._rank_and_world()
        sampler = EpochPermutation(len(images), self.seed, shuffle, rank, world_size)
        if self.loader == "dataloader":  # the standard path, for data that does not fit
            # (one minibatch per Lightning step; the module takes a lone batch as a list of one)
            return ResumableDataLoader(
                TensorDataset(images, labels),
                batch_size=batch_size,
                sampler=EpochSampler(sampler),
                drop_last=drop_last,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                collate_fn=_stack_pair,
            )
        device = self._device()
        return InMemoryBatches(
            images.to(device),
            labels.to(device),
            batch_size,
            sampler,
            drop_last=drop_last,
            steps_per_call=steps_per_call,
        )


MAX_NPZ_BYTES = 8 << 30  # the arrays' uncompressed size: beyond it, data is not for memory
NPZ_KEYS = ("images", "labels", "test_images", "test_labels")
# Labels are class numbers 0, 1, 2...: one name and one metric per class up to the largest, so
# a stray 10**12 would build a trillion names after training. Far above any dataset here.
MAX_CLASSES = 10_000


class NpzFileError(UserError):
    """A user's ``.npz`` that is not uint8 images (and integer labels) of a size we hold."""


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``key -> (shape, dtype)`` of the known arrays, read from the zip directory and the
    ``.npy`` headers alone, so nothing is allocated before the sizes are checked."""
    fix = "save it with np.savez(path, images=uint8 array, labels=int array)"
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            total = sum(info.file_size for info in members.values())
            if total > MAX_NPZ_BYTES:
                raise NpzFileError(
                    f"data.path={path} unpacks to {total} bytes, more than the "
                    f"{MAX_NPZ_BYTES} held in memory: use a smaller subset of the images."
                )
            headers = {}
            for key in NPZ_KEYS:
                if f"{key}.npy" not in members:
                    continue
                with archive.open(f"{key}.npy") as member:
                    version = np.lib.format.read_magic(member)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(member)
                headers[key] = (tuple(shape), dtype)
    except NpzFileError:
        raise
    except FileNotFoundError:
        raise NpzFileError(
            f"data.path={path} does not exist: point data.path at an .npz file of images."
        ) from None
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as err:
        raise NpzFileError(
            f"data.path={path} is not a readable .npz archive ({type(err).__name__}): {fix}."
        ) from None
    if "images" not in headers:
        raise NpzFileError(f"data.path={path} holds no array named 'images': {fix}.")
    promised = sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values())
    if promised > MAX_NPZ_BYTES:
        raise NpzFileError(
            f"data.path={path} holds arrays of {promised} bytes, more than the "
            f"{MAX_NPZ_BYTES} held in memory: use a smaller subset of the images."
        )
    for key, (shape, dtype) in headers.items():
        if dtype.hasobject:
            raise NpzFileError(
                f"data.path={path} holds '{key}' as an array of Python objects, which loading "
                "would unpickle: save plain numeric arrays (uint8 images, integer labels)."
            )
        images = key.endswith("images")
        if images and dtype != np.uint8:
            raise NpzFileError(
                f"data.path={path} holds '{key}' of dtype {dtype}, not uint8: save pixels "
                "0-255 as np.uint8 (e.g. (x * 255).round().astype(np.uint8))."
            )
        if images and not (len(shape) == 4 and shape[-1] in (1, 3) or len(shape) == 3):
            raise NpzFileError(
                f"data.path={path} holds '{key}' of shape {shape}, not (N, H, W) or "
                "(N, H, W, C) with C 1 or 3: save grey images as (N, H, W), colour ones as "
                "(N, H, W, 3)."
            )
        if not images and (dtype.kind not in "iu" or len(shape) != 1):
            raise NpzFileError(
                f"data.path={path} holds '{key}' of shape {shape} and dtype {dtype}, not one "
                "integer class per image: save labels as an (N,) integer array."
            )
    return headers


def load_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The known arrays of an ``.npz`` as tensors: images ``(N, C, H, W)`` uint8, labels int64.

    Checked from the headers first (``_npz_headers``); never unpickles (``allow_pickle=False``).
    """
    if not str(path):
        raise NpzFileError(
            "data.path is not set: name the file, e.g. data=npz data.path=/path/to/images.npz."
        )
    path = Path(path).expanduser()
    headers = _npz_headers(path)
    if ("test_images" in headers) != ("test_labels" in headers) and "labels" in headers:
        raise NpzFileError(
            f"data.path={path} has labels but test_images without test_labels (or the other "
            "way round): save both test arrays or neither."
        )
    loaded = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            loaded = {key: np.ascontiguousarray(npz[key]) for key in headers}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise NpzFileError(
            f"data.path={path} cannot be read ({type(err).__name__}: truncated or damaged): "
            "save it again with np.savez."
        ) from None
    for key, array in loaded.items():
        if not key.endswith("images") and len(array):
            check_labels(path, key, array)
    arrays = {}
    for key, array in loaded.items():
        value = torch.from_numpy(array)
        if key.endswith("images"):
            value = value.unsqueeze(1) if value.dim() == 3 else value.permute(0, 3, 1, 2)
            arrays[key] = value.contiguous()
        else:
            arrays[key] = value.long()
    shapes = {tuple(arrays[k].shape[1:]) for k in ("images", "test_images") if k in arrays}
    if len(shapes) > 1:
        raise NpzFileError(
            f"data.path={path} holds images and test_images of different shapes {sorted(shapes)}:"
            " save both at one size."
        )
    for images, labels in (("images", "labels"), ("test_images", "test_labels")):
        if labels in arrays and len(arrays[labels]) != len(arrays[images]):
            raise NpzFileError(
                f"data.path={path} holds {len(arrays[images])} {images} but "
                f"{len(arrays[labels])} {labels}: save one label per image."
            )
    return arrays


def check_labels(path: Path, key: str, labels: np.ndarray) -> None:
    """One sentence unless ``labels`` are class numbers 0 to ``MAX_CLASSES - 1``: checked on
    the integer array itself (before ``long()``, which would wrap a huge uint64)."""
    low, high = labels.min(), labels.max()
    if low < 0 or high >= MAX_CLASSES:
        shown = low if low < 0 else high
        raise NpzFileError(
            f"data.path={path} holds the label {shown} in '{key}', not a class number from 0 "
            f"to {MAX_CLASSES - 1}: number the classes 0, 1, 2..."
        )


class ArrayDataModule(MNISTDataModule):
    """Images already held as tensors (a user's ``.npz``, a converted ``ImageFolder``), served
    by the same in-memory machinery as MNIST: a seeded split, device-side batches.

    A subclass gives ``_read()`` -> the arrays of ``load_npz``; without ``test_images`` the
    last ``test_size`` of a seeded permutation are the test set (``split_seed``, like val).
    """

    display = "images"

    def __init__(self, test_size: int = 1000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test_size = test_size
        self._arrays: dict[str, torch.Tensor] | None = None
        self._given: dict[str, Batch] = {}

    def _read(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def arrays(self) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            self._arrays = self._read()
        return self._arrays

    def prepare_data(self) -> None:
        """Read, check and split now, so a bad file or size is refused before any model."""
        self.setup()

    def _load(self, train: bool) -> Batch:
        if not self._given:
            arrays = self.arrays()
            images = arrays["images"]
            labels = arrays.get("labels", torch.zeros(len(images), dtype=torch.long))
            if "test_images" in arrays:
                test = arrays["test_images"]
                test_labels = arrays.get("test_labels", torch.zeros(len(test), dtype=torch.long))
                self._given = {"train": (images, labels), "test": (test, test_labels)}
            else:
                if not 0 < self.test_size < len(images):
                    raise UserError(
                        f"data.test_size={self.test_size} does not fit the {len(images)} images"
                        f" in {self.root_name}: keep it between 1 and {len(images) - 1}."
                    )
                order = torch.randperm(
                    len(images), generator=torch.Generator().manual_seed(self.split_seed + 1)
                )
                keep, test = order[: -self.test_size], order[-self.test_size :]
                self._given = {
                    "train": (images[keep], labels[keep]),
                    "test": (images[test], labels[test]),
                }
        return self._given["train" if train else "test"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.arrays()["images"].shape[1:]
        return int(channels), int(height), int(width)

    @property
    def has_labels(self) -> bool:
        return "labels" in self.arrays()

    @property
    def class_names(self) -> tuple[str, ...]:
        if not self.has_labels:
            return ()
        arrays = self.arrays()
        top = max(int(arrays[k].max()) for k in ("labels", "test_labels") if k in arrays)
        return tuple(str(c) for c in range(top + 1))

    @property
    def display_name(self) -> str:
        return self.display

    @property
    def metric_names(self) -> list[str]:
        return [f"class{c}" if n.isdigit() else _slug(n) for c, n in enumerate(self.class_names)]


class NpzDataModule(ArrayDataModule):
    """A user's ``.npz`` of uint8 images ``(N, H, W)`` or ``(N, H, W, C)`` (``images``), with
    optional ``labels`` and a given test split (``test_images``/``test_labels``)."""

    display = "npz"

    def __init__(self, path: str = "", **kwargs: Any) -> None:
        kwargs.setdefault("dataset", "npz")
        super().__init__(**kwargs)
        self.path = path

    def _read(self) -> dict[str, torch.Tensor]:
        return load_npz(self.path)

    @property
    def root_name(self) -> str:
        return self.path

    @property
    def display_name(self) -> str:
        return Path(self.path).stem or "npz"


MAX_FOLDER_ENTRIES = 1_000_000  # files and folders the walk of data.path looks at
MAX_FOLDER_DEPTH = 32  # folder levels below data.path
FOLDER_FIX = "use the layout <path>/<class name>/<image>.png"


def image_folder_files(top: str) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """``(class names, [(image file, class index)])`` of ``<top>/<class name>/**/<image>``,
    in the order of torchvision's ``ImageFolder`` (so splits stay as they were).

    Our own walk, since torchvision's follows links (a link loop never ends) and counts
    nothing (``data.path=/`` would walk the disk): it refuses links to folders (never
    followed) and links to files outside ``top``, and stops with one sentence past
    ``MAX_FOLDER_ENTRIES`` entries or ``MAX_FOLDER_DEPTH`` levels.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root, seen = os.path.realpath(top), 0

    def scan(folder: str, depth: int) -> list[os.DirEntry]:
        nonlocal seen
        if depth > MAX_FOLDER_DEPTH:
            raise UserError(
                f"data.path={top} nests folders more than {MAX_FOLDER_DEPTH} levels deep (at "
                f"{folder}): point data.path at the folder of class folders ({FOLDER_FIX})."
            )
        try:
            with os.scandir(folder) as entries:  # islice: a huge folder is never listed whole
                found = list(itertools.islice(entries, MAX_FOLDER_ENTRIES - seen + 1))
        except OSError as err:
            if depth == 0:
                raise UserError(
                    f"data.path={top} is not a folder of class subfolders holding images "
                    f"({type(err).__name__}): {FOLDER_FIX}."
                ) from None
            raise UserError(
                f"data.path={top} has a folder {folder} that cannot be read "
                f"({err.strerror or type(err).__name__}): make it readable or remove it."
            ) from None
        seen += len(found)
        if seen > MAX_FOLDER_ENTRIES:
            raise UserError(
                f"data.path={top} holds more than {MAX_FOLDER_ENTRIES:,} files and folders: "
                f"point it at a folder of class folders ({FOLDER_FIX}), not a whole disk."
            )
        for entry in found:
            if not entry.is_symlink():
                continue
            target = os.path.realpath(entry.path)
            if os.path.isdir(target):
                raise UserError(
                    f"data.path={top} holds {entry.path}, a link to the folder {target}, "
                    "which is not followed: replace the link with the folder itself."
                )
            if depth > 0 and os.path.commonpath([root, target]) != root:
                raise UserError(
                    f"data.path={top} holds {entry.path}, a link to {target} outside it: "
                    "copy the image into the folder instead."
                )
        return found

    classes = tuple(sorted(e.name for e in scan(top, 0) if e.is_dir(follow_symlinks=False)))
    if not classes:
        raise UserError(f"data.path={top} holds no class folders: {FOLDER_FIX}.")
    samples = []
    for index, name in enumerate(classes):
        found, pending = [], [(os.path.join(top, name), 1)]
        while pending:
            folder, depth = pending.pop()
            names = []
            for entry in scan(folder, depth):
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, depth + 1))
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    if not entry.is_file():  # a FIFO named x.png would block the first read
                        raise UserError(
                            f"data.path={top} holds {entry.path}, which is not a regular file: "
                            "replace it with the image or remove it."
                        )
                    names.append(entry.name)
            found.append((folder, sorted(names)))
        if not any(names for _, names in found):
            raise UserError(
                f"data.path={top} has no images ({', '.join(IMG_EXTENSIONS)}) in its class "
                f"folder {name}: add some or remove that folder."
            )
        samples += [(os.path.join(f, n), index) for f, names in sorted(found) for n in names]
    return classes, samples


class ImageFolderDataModule(ArrayDataModule):
    """torchvision's ``ImageFolder`` layout (``<path>/<class name>/<image>``, listed by the
    bounded walk of ``image_folder_files``), each image converted once to ``channels`` (1 grey,
    3 RGB) and resized to ``image_size`` ``[H, W]``, then held in memory as uint8 like the
    rest; the class names are the folder names."""

    display = "image folder"

    def __init__(
        self,
        path: str = "",
        image_size: Sequence[int] = (32, 32),
        channels: int = 3,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("dataset", "image_folder")
        super().__init__(**kwargs)
        self.path, self.image_size, self.channels = path, image_size, channels
        self._classes: tuple[str, ...] = ()

    def _check_settings(self) -> None:
        """In ``prepare_data``, not ``__init__``: Hydra would wrap the sentence in its own."""
        size = list(self.image_size) if isinstance(self.image_size, Sequence) else []
        if len(size) != 2 or not all(isinstance(d, int) and 0 < d <= 4096 for d in size):
            raise UserError(
                f"data.image_size={self.image_size!r} is not [height, width] in pixels: use "
                "e.g. data.image_size=[32,32]."
            )
        self.image_size = (size[0], size[1])
        if self.channels not in (1, 3):
            raise UserError(
                f"data.channels={self.channels!r} is not 1 (grey) or 3 (RGB): use data.channels=3."
            )

    def _read(self) -> dict[str, torch.Tensor]:
        from PIL import Image

        self._check_settings()
        if not self.path:
            raise UserError(
                "data.path is not set: name the folder, e.g. data=image_folder "
                "data.path=/path/to/images (one subfolder per class)."
            )
        height, width = self.image_size
        mode = "L" if self.channels == 1 else "RGB"

        def convert(file: str) -> np.ndarray:
            with Image.open(file) as image:  # PIL refuses decompression bombs itself
                resized = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                return np.asarray(resized, dtype=np.uint8)

        classes, samples = image_folder_files(os.path.expanduser(self.path))
        total = len(samples) * self.channels * height * width
        if total > MAX_NPZ_BYTES:
            raise UserError(
                f"data.path={self.path} holds {len(samples)} images, {total} bytes at "
                f"data.image_size={list(self.image_size)}, more than the {MAX_NPZ_BYTES} held "
                "in memory: use a smaller data.image_size or fewer images."
            )
        images = np.empty((len(samples), height, width, self.channels), dtype=np.uint8)
        for index, (file, _) in enumerate(samples):
            try:
                images[index] = convert(file).reshape(height, width, self.channels)
            except Exception as err:  # PIL's errors for a damaged or foreign file vary
                raise UserError(
                    f"data.path={self.path} has an image {file} that cannot be read "
                    f"({type(err).__name__}): remove or replace that file."
                ) from None
        self._classes = classes
        return {
            "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            "labels": torch.tensor([label for _, label in samples], dtype=torch.long),
        }

    @property
    def root_name(self) -> str:
        return self.path

    @property
    def class_names(self) -> tuple[str, ...]:
        self.arrays()
        return self._classes

    @property
    def display_name(self) -> str:
        return Path(self.path).name or "images"
