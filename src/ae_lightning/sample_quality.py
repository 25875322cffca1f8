"""How real a model's samples and reconstructions look to a small classifier of the dataset.

The Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule
converge to a local Nash equilibrium", the FID) between a model's images and the test images,
in the feature space of a small CNN trained once on the dataset's own training split
(Inception's ImageNet features say little about 28x28 digits), computed by torchmetrics'
``FrechetInceptionDistance`` with that CNN as its feature network; and how evenly the CNN
spreads the samples over the classes (a sampler stuck on a few digits scores low).

The CNN is trained on first use (seeded, a few epochs on the CPU) and cached beside the data,
``<data root>/<Dataset>/ae_lightning/classifier-<hash>.pt``: the hash covers its recipe and
the training images, so every run on that data shares it. The file is loaded as weights only
and refused in one sentence if damaged or planted (a link, a zip that would inflate past
``MAX_CLASSIFIER_BYTES``). Imported only by runs that ask for these metrics.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ae_lightning.checkpointing import AtomicCheckpointIO
from ae_lightning.data import to_unit_float
from ae_lightning.errors import UserError
from ae_lightning.latent import default_codes

log = logging.getLogger(__name__)
CLASSIFIER_VERSION = 1  # bump when the net or its training changes: the hash names a new file
CLASSIFIER_BATCH, CLASSIFIER_LR = 128, 1e-3
MAX_CLASSIFIER_BYTES = 16 * 2**20  # the net is ~0.2 MB; a larger file is not one of ours
EVAL_BATCH = 2000


class DigitClassifier(nn.Module):
    """Two small strided conv layers and a 64-unit feature layer: cheap to train on a CPU.

    Ten classes: every dataset here (MNIST, Fashion-MNIST, KMNIST) has ten.

    ``features`` (after the ReLU, before the class layer) are what the Fréchet distance
    compares; ``forward`` gives the class logits.
    """

    num_features = 64

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        # Strided convolutions, not pooling: a quarter of the work, which sets CPU time here.
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),  # 16 x 14 x 14
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # 32 x 7 x 7
            nn.Flatten(), nn.Linear(32 * 7 * 7, self.num_features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(self.num_features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _GivenFeatures(nn.Module):
    """torchmetrics' feature network for features computed already (one pass per image set
    gives the features, the predicted classes and the accuracy)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of a dummy forward

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two ``(N, d)`` feature sets.

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017), accumulated
    and computed in float64 by torchmetrics' ``FrechetInceptionDistance``.
    """
    metric = FrechetInceptionDistance(
        feature=_GivenFeatures(features_a.shape[1]),
        normalize=True,  # float features in, as given
        sync_on_compute=False,  # one process holds every feature (rank zero, under DDP too)
    ).to(features_a.device)
    metric.update(features_a, real=True)
    metric.update(features_b.to(features_a.device), real=False)
    return float(metric.compute())


def class_coverage(predicted: torch.Tensor, classes: int) -> dict[str, float]:
    """How evenly ``predicted`` (class indices) cover ``classes`` classes.

    ``entropy``: the entropy of the class histogram over log(classes), 1 for equal shares, 0
    for one class; ``top_share``: the share of the most common class (1/classes at best).
    """
    shares = torch.bincount(predicted.flatten().cpu(), minlength=classes).double()
    shares /= shares.sum()
    entropy = torch.distributions.Categorical(probs=shares).entropy()
    return {"entropy": float(entropy) / math.log(classes), "top_share": float(shares.max())}


@torch.no_grad()
def embed(
    classifier: DigitClassifier, batches: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(N, 64)`` and predicted classes ``(N,)`` of float image batches, batched on
    the classifier's device (no loop per image)."""
    features, predicted = [], []
    for x in batches:
        h = classifier.features(x.clamp(0, 1))  # pixels as the figures show them
        features.append(h)
        predicted.append(classifier.head(h).argmax(1))
    return torch.cat(features), torch.cat(predicted)


def pixel_batches(
    images: torch.Tensor, device: torch.device | str, batch_size: int = EVAL_BATCH
) -> Iterator[torch.Tensor]:
    """uint8 ``(N, 28, 28)`` images as float ``(B, 1, 28, 28)`` batches on ``device``."""
    for start in range(0, len(images), batch_size):
        yield to_unit_float(images[start : start + batch_size].to(device))


# --- the classifier: trained once per dataset, cached beside the data -----------------------


def classifier_path(folder: Path, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                    seed: int) -> Path:  # fmt: skip
    """``folder/classifier-<hash>.pt``, the hash of the recipe and the training data."""
    recipe = {"version": CLASSIFIER_VERSION, "epochs": epochs, "seed": seed,
              "batch": CLASSIFIER_BATCH, "lr": CLASSIFIER_LR}  # fmt: skip
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.contiguous().numpy().tobytes())
    return folder / f"classifier-{digest.hexdigest()[:12]}.pt"


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, device: torch.device
) -> DigitClassifier:
    """A ``DigitClassifier`` fitted with Adam on uint8 ``images`` and their ``labels``.

    Seeded inside its own RNG state, so training it (or finding it cached) leaves the run's
    random stream, and so the model's weights, as they would be without it.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        net = DigitClassifier().to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR)
        x_all, y_all = images.to(device), labels.to(device).long()
        for _ in range(epochs):
            order = torch.randperm(len(x_all), device=device)
            for start in range(0, len(order), CLASSIFIER_BATCH):
                batch = order[start : start + CLASSIFIER_BATCH]
                loss = F.cross_entropy(net(to_unit_float(x_all[batch])), y_all[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return net.eval()


def load_classifier(path: Path) -> DigitClassifier:
    """The cached classifier at ``path``, read as tensors only; one sentence if damaged.

    A bad file is refused, not retrained over: it sits in a folder others may write (the
    shared data's), so it is left in place for the user to look at, and the sentence says
    to delete it (or to switch the metrics off). Bounded before anything inflates
    (``read_cache_file``).
    """
    refusal = (
        f"The cached classifier {path} cannot be read ({{}}): delete it and run again to "
        "retrain it, or switch the sample-quality metrics off with eval.sample_quality=false."
    )
    data = read_cache_file(path, refusal)
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # no code
        with torch.random.fork_rng(devices=[]):  # its initial weights are overwritten: the
            net = DigitClassifier()  # run's random stream stays as without the metrics
        net.load_state_dict(saved["state_dict"])  # strict: a foreign net's keys are refused
    except Exception as err:  # an unpickling refusal, a cut file, foreign keys: all damage
        raise UserError(refusal.format(type(err).__name__)) from None
    return net.eval()


def read_cache_file(path: Path, refusal: str) -> bytes:
    """The bytes of the cache file at ``path``, or ``refusal`` filled with the reason.

    The name is predictable and the folder shared, so the file may be planted: a link is
    never followed (``O_NOFOLLOW``, and the bytes read once, so nothing is swapped in after
    the checks), a FIFO never blocks, and the zip directory must inflate to at most
    ``MAX_CLASSIFIER_BYTES`` in all (torch.load inflates deflated members: a 0.5 MB file
    could ask for gigabytes).
    """
    if path.is_symlink():
        raise UserError(refusal.format("a link, which is not followed"))
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        with os.fdopen(os.open(path, flags), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UserError(refusal.format("not a regular file"))
            data = f.read(MAX_CLASSIFIER_BYTES + 1)
    except OSError as err:
        raise UserError(refusal.format(err.strerror or type(err).__name__)) from None
    if len(data) > MAX_CLASSIFIER_BYTES:
        limit = f"over {MAX_CLASSIFIER_BYTES:,} bytes, larger than any classifier of ours"
        raise UserError(refusal.format(limit))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            inflated = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, ValueError) as err:  # not torch.save's zip, or cut short
        raise UserError(refusal.format(type(err).__name__)) from None
    if inflated > MAX_CLASSIFIER_BYTES:
        raise UserError(
            refusal.format(f"it would inflate to {inflated:,} bytes, more than any classifier")
        )
    return data


def user_cache_dir() -> Path:
    """Where a classifier goes when the data's own folder cannot be written (a shared,
    read-only copy): ``$AE_CACHE_DIR``, else ``$XDG_CACHE_HOME/ae-lightning``, else
    ``~/.cache/ae-lightning``."""
    if os.environ.get("AE_CACHE_DIR"):
        return Path(os.environ["AE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ae-lightning"


def prepare_classifier(
    folder: Path | Sequence[Path],
    train_set: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    seed: int = 0,
) -> DigitClassifier:
    """The classifier of this training split: from a cache, else trained and cached.

    ``folder`` is one cache folder or several, in order of preference: the file is looked for
    in each, and a new one goes to the first that can be written (the hash in its name ties
    it to the training bytes and recipe, so any of them serves). Trained on the CPU whatever
    the run's device, so one file means one set of weights. When none can be written it is a
    warning: the classifier then serves this run only.
    """
    images, labels = train_set
    folders = [folder] if isinstance(folder, str | os.PathLike) else list(folder)
    paths = [classifier_path(f, images, labels, epochs, seed) for f in folders]
    for path in paths:
        if path.is_file() or path.is_symlink():  # a link there is refused, never followed
            log.info("Sample-quality classifier: %s (cached)", path)
            return load_classifier(path)
    log.info(
        "Training the sample-quality classifier (%d epochs on %d images, CPU); caching it at %s",
        epochs, len(images), paths[0],
    )  # fmt: skip
    net = train_classifier(images, labels, epochs, seed, torch.device("cpu"))
    payload = {"state_dict": net.state_dict(), "version": CLASSIFIER_VERSION, "epochs": epochs,
               "seed": seed}  # fmt: skip
    for path in paths:
        if _marked_read_only(path.parent):
            log.info("Not caching the classifier in %s: its folder is read-only.", path.parent)
            continue
        try:
            AtomicCheckpointIO().save_checkpoint(payload, path)
        except OSError as err:
            log.warning("Could not cache the classifier at %s (%s).", path,
                        err.strerror or type(err).__name__)  # fmt: skip
            continue
        if path != paths[0]:
            log.info("Sample-quality classifier cached at %s instead.", path)
        return net
    log.warning("No cache folder could be written: the classifier serves this run only.")
    return net


def _marked_read_only(folder: Path) -> bool:
    """Whether ``folder`` (or, if it does not exist yet, its nearest existing parent) has no
    write bit: a shared data copy marked read-only is left alone even by a process that
    could write it anyway (root), which would otherwise create a cache folder inside it."""
    for existing in (folder, *folder.parents):
        try:
            return not existing.stat().st_mode & 0o222
        except (FileNotFoundError, NotADirectoryError):  # the save says what is wrong there
            continue
        except OSError:
            return True
    return False


# --- the metrics of one model -----------------------------------------------------------------


@torch.no_grad()
def sample_quality(
    model: nn.Module,
    classifier: DigitClassifier,
    test_set: tuple[torch.Tensor, torch.Tensor],
    train_codes: Callable[[], torch.Tensor],
    seed: int = 0,
    device: torch.device | str = "cpu",
    reference: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fréchet distances of samples and reconstructions to the test set, and sample coverage.

    ``model`` keeps the family contract (``encode``/``decode``, ``prior_sample``); the samples
    are as many as the test images, drawn as ``samples.png`` draws them by default (the
    family's prior, else a Gaussian fitted to ``train_codes()``). ``reference``: the uint8
    images, in the test set's order, that the outputs are measured against, when not the
    test images themselves: under binarisation the grey ones, which a decoder's means
    estimate (against the binary draws even a perfect model's means would score the
    binarisation noise, in features the CNN learnt from grey digits).
    """
    device = torch.device(device)
    classifier = classifier.to(device).eval()
    test_images, test_labels = test_set
    reference = test_images if reference is None else reference
    if reference.shape != test_images.shape:
        raise ValueError(f"reference {tuple(reference.shape)} is not {tuple(test_images.shape)}")
    real, real_classes = embed(classifier, pixel_batches(reference, device))
    recon, _ = embed(classifier, (model(x) for x in pixel_batches(test_images, device)))
    codes, _ = default_codes(model, len(test_images), seed, train_codes)
    drawn = (
        model.decode(codes[start : start + EVAL_BATCH].to(device))
        for start in range(0, len(codes), EVAL_BATCH)
    )
    samples, sample_classes = embed(classifier, drawn)
    coverage = class_coverage(sample_classes, classifier.head.out_features)
    return {
        "test/fd_samples": frechet_distance(real, samples),
        "test/fd_recon": frechet_distance(real, recon),
        "test/sample_class_entropy": coverage["entropy"],
        "test/sample_top_class_share": coverage["top_share"],
        "test/classifier_acc": float((real_classes.cpu() == test_labels.cpu()).float().mean()),
    }
