"""Latent-space maths on plain tensors: encode a set, fit samplers, interpolate, project.

Shared by the figure callbacks and the comparison tool; no Lightning, no plotting, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ae_lightning.data import to_unit_float

SAMPLERS = ("gaussian", "normal", "gmm", "box")


@torch.no_grad()
def encode_images(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int = 2000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Codes ``(N, z)`` on the CPU for uint8 images ``(N, H, W)`` or ``(N, C, H, W)``, in
    chunks to bound memory."""
    device = torch.device(device) if device is not None else images.device
    chunks = [
        encode(to_unit_float(images[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def decode_codes(
    decode: Callable[[torch.Tensor], torch.Tensor],
    codes: torch.Tensor,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Images ``(N, C, H, W)`` on the CPU for codes ``(N, z)``."""
    return decode(codes.to(device)).float().cpu()


def interpolate(z_start: torch.Tensor, z_end: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` codes on the straight line from ``z_start`` to ``z_end`` (both included)."""
    assert steps >= 2, f"an interpolation needs at least 2 steps, got {steps}"
    t = torch.linspace(0.0, 1.0, steps, dtype=z_start.dtype, device=z_start.device).unsqueeze(1)
    return (1 - t) * z_start.unsqueeze(0) + t * z_end.unsqueeze(0)  # (S, 1) -> (S, z)


def crossfade(x_start: torch.Tensor, x_end: torch.Tensor, steps: int) -> torch.Tensor:
    """The pixel-space blend of two images, for contrast with the latent interpolation."""
    t = torch.linspace(0.0, 1.0, steps, dtype=x_start.dtype, device=x_start.device)
    t = t.view(-1, *([1] * x_start.dim()))  # (S, 1, 1, 1)
    return (1 - t) * x_start.unsqueeze(0) + t * x_end.unsqueeze(0)  # (S, *image)


def pick_pair(labels: torch.Tensor, seed: int) -> tuple[int, int]:
    """Indices of two images of different digits (two images, if all share one label, as
    label-free data does), drawn with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(len(labels), (1,), generator=generator))
    others = torch.nonzero(labels != labels[first]).flatten()
    if len(others) == 0:
        others = torch.nonzero(torch.arange(len(labels)) != first).flatten()
    assert len(others) > 0, "an interpolation needs two images"
    second = int(others[torch.randint(len(others), (1,), generator=generator)])
    return first, second


@dataclass
class Projection:
    """A linear map of codes to 2-D and a label for the axes/title."""

    mean: torch.Tensor
    components: torch.Tensor  # (z, 2)
    method: str
    explained: tuple[float, float] | None = None

    def __call__(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.mean) @ self.components  # (N, z) -> (N, 2)

    @property
    def axis_labels(self) -> tuple[str, str]:
        if self.method == "pca" and self.explained is not None:
            return tuple(f"PC{i + 1} ({100 * v:.0f}% var.)" for i, v in enumerate(self.explained))
        return ("z[0]", "z[1]")


def fit_projection(codes: torch.Tensor, method: str = "pca") -> Projection:
    """2-D view of codes: identity for 2-D codes, else PCA (or the first two coordinates)."""
    z = codes.shape[1]
    if z <= 2 or method == "first_two":
        components = torch.eye(z, 2, dtype=codes.dtype)
        return Projection(torch.zeros(z, dtype=codes.dtype), components, "first_two")
    if method != "pca":
        raise ValueError(f"Unknown projection {method!r}: use 'pca' or 'first_two'.")
    mean = codes.mean(0)
    _, singular, vh = torch.linalg.svd(codes - mean, full_matrices=False)
    variance = singular**2
    explained = (variance[:2] / variance.sum()).tolist()
    return Projection(mean, vh[:2].T.contiguous(), "pca", (explained[0], explained[1]))


def check_sampler(kind: str) -> None:
    if kind not in SAMPLERS:
        raise ValueError(f"Unknown sampler {kind!r}: choose one of {SAMPLERS}.")


class CodeSampler:
    """Draws bottleneck vectors from a distribution fitted to (or independent of) the codes."""

    def __init__(self, kind: str, codes: torch.Tensor, seed: int = 0, gmm_components: int = 10):
        check_sampler(kind)
        self.kind, self.dim = kind, codes.shape[1]
        codes = codes.double()
        if kind == "gaussian":
            self.mean = codes.mean(0)
            covariance = torch.cov(codes.T).reshape(self.dim, self.dim)
            jitter = 1e-6 * covariance.diagonal().mean() * torch.eye(self.dim, dtype=codes.dtype)
            self.scale = torch.linalg.cholesky(covariance + jitter)
        elif kind == "box":
            self.low, self.high = codes.min(0).values, codes.max(0).values
        elif kind == "gmm":
            from sklearn.mixture import GaussianMixture

            self.gmm = GaussianMixture(gmm_components, covariance_type="full", random_state=seed)
            self.gmm.fit(codes.numpy())
        self.seed = seed

    @property
    def description(self) -> str:
        return {
            "gaussian": "Gaussian fitted to the training codes",
            "normal": "standard normal N(0, I)",
            "gmm": f"{self.gmm.n_components}-component GMM fitted to the training codes"
            if self.kind == "gmm"
            else "",
            "box": "uniform over the training codes' bounding box",
        }[self.kind]

    def sample(self, n: int) -> torch.Tensor:
        """``(n, z)`` float32 codes; the same ``n`` draws for the same seed."""
        generator = torch.Generator().manual_seed(self.seed)
        if self.kind == "gaussian":
            noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
            out = self.mean + noise @ self.scale.T
        elif self.kind == "normal":
            out = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        elif self.kind == "box":
            u = torch.rand(n, self.dim, generator=generator, dtype=torch.float64)
            out = self.low + u * (self.high - self.low)
        else:
            self.gmm.random_state = self.seed
            drawn, _ = self.gmm.sample(n)
            out = torch.from_numpy(drawn[np.random.default_rng(self.seed).permutation(n)])
        return out.float()


def default_codes(
    model: object, n: int, seed: int, train_codes: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, str]:
    """The ``(n, z)`` codes ``samples.png`` decodes by default, and what drew them.

    ``model`` keeps the family contract: its own prior (``prior_sample``), else (a family with
    none) its ``fitted_sampler`` (a Gaussian unless it names another) fitted to
    ``train_codes()``, called only then.
    """
    prior = model.prior_sample(n, seed)
    if prior is not None:
        return prior, f"{model.prior_description}, the {model.label}'s prior"
    sampler = CodeSampler(getattr(model, "fitted_sampler", "gaussian"), train_codes(), seed=seed)
    return sampler.sample(n), sampler.description


def manifold_grid(
    codes: torch.Tensor, n: int = 20, percentiles: tuple[float, float] = (1.0, 99.0)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An ``n x n`` grid of 2-D codes spanning the given percentiles of ``codes`` per axis.

    Returns ``(grid (n*n, 2), xs (n,), ys (n,))``; rows run from the highest y (top of an
    image) to the lowest, columns from the lowest x to the highest.
    """
    assert codes.shape[1] == 2, f"the manifold needs 2-D codes, got {codes.shape[1]}-D"
    q = torch.tensor(percentiles, dtype=codes.dtype) / 100
    (x_lo, x_hi), (y_lo, y_hi) = (torch.quantile(codes[:, d], q).tolist() for d in (0, 1))
    xs = torch.linspace(x_lo, x_hi, n)
    ys = torch.linspace(y_hi, y_lo, n)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1), xs, ys


# --- latent-quality metrics: how well the unsupervised codes separate the digits -----------


def knn_accuracy(
    train_codes: torch.Tensor,
    train_labels: torch.Tensor,
    test_codes: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 5,
) -> float:
    """Share of test codes whose k nearest training codes vote for the right digit."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=k).fit(train_codes.numpy(), train_labels.numpy())
    return float(knn.score(test_codes.numpy(), test_labels.numpy()))


def probe_accuracy(
    train_codes: torch.Tensor,
    train_labels: torch.Tensor,
    test_codes: torch.Tensor,
    test_labels: torch.Tensor,
) -> float:
    """Test accuracy of a logistic regression fitted on standardised training codes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(train_codes.numpy(), train_labels.numpy())
    return float(probe.score(test_codes.numpy(), test_labels.numpy()))


def active_units(codes: torch.Tensor, threshold: float = 0.01) -> int:
    """Code dimensions in use: Cov_x(E_q[z_d | x]) > ``threshold`` over a set of inputs.

    Burda, Grosse & Salakhutdinov 2016 ("Importance weighted autoencoders", section 5.2):
    a unit whose posterior mean hardly moves with the input carries no information.
    ``codes`` are ``(N, z)`` mean codes (a family's ``encode``); for a deterministic
    encoder the criterion reads the codes themselves.
    """
    return int((codes.double().var(dim=0) > threshold).sum())


def per_digit_mse(squared_errors: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Mean per-pixel squared error of each digit's images; ``squared_errors`` is ``(N,)``."""
    return {int(d): float(squared_errors[labels == d].mean()) for d in labels.unique(sorted=True)}


@torch.no_grad()
def latent_quality(
    encode: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor], torch.Tensor],
    train_set: tuple[torch.Tensor, torch.Tensor],
    test_set: tuple[torch.Tensor, torch.Tensor],
    device: torch.device | str = "cpu",
    max_train: int = 20_000,
    batch_size: int = 2000,
    metric_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """kNN (k=5) and linear-probe digit accuracy of the codes, their active units (see
    ``active_units``) and the test MSE per digit.

    Labels are used only here, after training: they measure how well the bottleneck
    separates digits it was never told about. ``max_train`` training codes fit the probes.
    Per-class MSEs are ``test/mse_<metric_names[label]>`` (``test/mse_digit3`` by default).
    """
    (train_images, train_labels), (test_images, test_labels) = train_set, test_set
    train_codes = encode_images(encode, train_images[:max_train], batch_size, device)
    train_labels = train_labels[:max_train].cpu()
    test_codes = encode_images(encode, test_images, batch_size, device)
    errors = torch.cat(
        [
            (decode(encode(x)) - x).square().flatten(1).mean(1).cpu()
            for x in (
                to_unit_float(test_images[i : i + batch_size].to(device))
                for i in range(0, len(test_images), batch_size)
            )
        ]
    )
    test_labels = test_labels.cpu()
    metrics = {
        "test/knn_acc": knn_accuracy(train_codes, train_labels, test_codes, test_labels),
        "test/probe_acc": probe_accuracy(train_codes, train_labels, test_codes, test_labels),
        "test/active_units": active_units(test_codes),
    }
    for digit, mse in per_digit_mse(errors, test_labels).items():
        name = f"digit{digit}" if metric_names is None else metric_names[digit]
        metrics[f"test/mse_{name}"] = mse
    return metrics


# --- the importance-sampled negative log-likelihood of a family with a likelihood ----------

LogWeights = Callable[[torch.Tensor, int], "torch.Tensor | None"]


NLL_SUBSET_SEED = 0  # one subset for every run, whatever its own seed, so their NLLs compare


def evaluation_subset(total: int, size: int | None) -> torch.Tensor:
    """The indices (ascending) of ``size`` of ``total`` images drawn at random with a fixed
    seed, or all of them for ``size`` None: the images ``test/nll`` is measured on.

    Random, not the first ``size``: MNIST's test file is ordered by writer, and its first
    images are easier to model than the rest.
    """
    if size is None or size >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(NLL_SUBSET_SEED)
    return torch.randperm(total, generator=generator)[:size].sort().values


@torch.no_grad()
def importance_sampled_nll(
    log_weights: LogWeights,
    images: torch.Tensor,
    samples: int,
    device: torch.device | str | None = None,
    max_rows: int = 20_000,
) -> float | None:
    """-log p(x) in nats per image, averaged over ``images``, from ``samples`` weights each.

    log p(x) ~= log 1/k sum_i p(x, z_i) / q(z_i | x), z_i ~ q(z | x) (Burda et al. 2016,
    appendix: k = 5000 for their Table 1). ``log_weights(x, k)`` is the family's
    (``(B, k)`` log weights, or None for a family without a likelihood: then None here).
    Images and samples go through in chunks of at most ``max_rows`` decoded codes (several
    images times their samples, or one image's samples in parts), combined exactly by
    ``logsumexp``. ``images`` are float pixels ``(N, 1, 28, 28)``.
    """
    device = torch.device(device) if device is not None else images.device
    per_chunk = max(1, max_rows // samples)
    sample_chunk = min(samples, max_rows)
    total = 0.0
    for start in range(0, len(images), per_chunk):
        x = images[start : start + per_chunk].to(device)
        parts = []
        for done in range(0, samples, sample_chunk):
            weights = log_weights(x, min(sample_chunk, samples - done))
            if weights is None:
                return None
            parts.append(torch.logsumexp(weights.double(), dim=1))
        log_px = torch.logsumexp(torch.stack(parts, dim=1), dim=1) - math.log(samples)
        total += float(-log_px.sum())  # one host read per chunk
    return total / len(images)
