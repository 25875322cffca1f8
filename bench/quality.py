"""Test MSE of the reference workflow's three models next to PCA at the same dimension,
the VAE next to a plain PyTorch VAE loop, and experiment=deep30 next to its default recipe.

``workflow``: trains, with the default config (batch 128, 25 epochs, Adam at each model's
default lr: 3e-3 for linear, 1e-3 for hidden1024; no weight decay): no hidden layer with a
2-D bottleneck, 1024 hidden units with 2-D, and with 10-D. PCA is the closed-form linear
baseline on the same training images: the best any linear encoder/decoder pair can reach
(the linear model's sigmoid decoder can end a little either side of it).

``vae``: model=vae (784-1024-z, Bernoulli likelihood, beta 1) at z=2 and z=20, beside
``plain_vae``, a hand-written loop in the style of PyTorch's examples/vae with the same
architecture, optimizer, batches, epochs and seed: test/nelbo should agree within 1%.

``iwae`` and ``vqvae``: model=iwae (k=5) and model=vqvae beside ``plain_iwae`` and
``plain_vqvae``, hand-written loops of the same objective (Burda et al. 2016's bound; van den
Oord et al. 2017's loss with a straight-through gradient) with the same architecture,
optimizer, batches, epochs and seed: test/bound and test/mse should agree within 1%.

``iwae_paper``: experiment=iwae_paper (Burda et al.'s one-stochastic-layer MNIST setting)
for model=vae, IWAE k=5 and k=50, shortened to ``--paper-passes`` epochs (their schedule's
stages kept in proportion), with test/nll from ``--nll-samples`` importance samples (5000,
as theirs) beside their Table 1.

``zoo``: model=sparse (kl and l1), contractive, wae and rae at z=2 (``--zoo-bottleneck``),
each beside ``plain_zoo``, a hand-written loop of the same objective (the penalties written
out again in plain torch: the Jacobian by z autograd passes, the MMD by its kernel
matrices) on the same 784-1024-z net, optimizer, batch size, epochs and seed: test/loss
should agree within 1%.

``families``: the zoo table: every registered family (``ae_lightning.models.families()``,
each with its own ``conf/model/<family>.yaml``, the plain AE's being hidden1024) on the same
784-1024-z net at each ``--family-bottlenecks`` (2 and 16), ``--epochs`` epochs, with the
default evaluation (the NLL from ``--family-nll-samples`` importance samples over a fixed
random subset of ``--family-nll-images`` test images): test MSE, NLL, the Fréchet
distances of samples and reconstructions, kNN/probe accuracy, active units and seconds per
epoch. The VQ-VAE gets one codebook per 2 code dimensions. ``ae-compare`` then draws each
bottleneck's samples of every family side by side
(``<runs-dir>/families_z<z>/comparison/samples.png``).

``deep30``: experiment=deep30 beside the same 784-1000-500-250-30 model with the default
recipe (Adam 1e-3, clean inputs), both for ``--deep-epochs`` epochs (100 by default; the
experiment's own schedule is 150).

``sample_quality``: the floor of ``test/fd_*``, the Fréchet distance of the test images to
as many official training images in the sample-quality CNN's features (trained, or read
from its cache beside the data, as a run would), and the CNN's test accuracy; beside them
the test images against their own static binary draw (``data.binarize=static``): what
perfect Bernoulli means would score had ``test/fd_*`` of binarised runs kept the draws as
their reference instead of the grey images.

``evaluators``: images per second of the evaluators, batched on ``--device`` as runs use
them, beside a loop of the same maths one image at a time: the CNN's features (for the
Fréchet distance) and the mean codes of a 784-1024-10 VAE (for active units).

    python bench/quality.py --json quality.json --markdown quality.md
    python bench/quality.py --sections vae --epochs 25
    python bench/quality.py --sections sample_quality evaluators --device cuda
    python bench/quality.py --sections zoo --epochs 1 --data-root <tiny> --val-size 100  # smoke
    python bench/quality.py --sections iwae_paper --paper-passes 100 --device cuda
    python bench/quality.py --sections families --epochs 25 --runs-dir zoo-runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PROJECT, compose_config, train_with
from torch import nn

from ae_lightning.data import MNISTDataModule, to_unit_float
from ae_lightning.latent import active_units, encode_images

WORKFLOW = [("linear", 2), ("hidden1024", 2), ("hidden1024", 10)]
VAE_BOTTLENECKS = [2, 20]
SECTIONS = [
    "workflow", "vae", "zoo", "iwae", "vqvae", "iwae_paper", "families", "deep30",
    "sample_quality", "evaluators",
]  # fmt: skip
# The model config of a family named otherwise (the rest: conf/model/<family>.yaml).
FAMILY_CONFIG = {"ae": "hidden1024"}
CODE_DIMS_PER_CODEBOOK = 2  # the VQ-VAE's groups in the families table: bottleneck / 2
# Each family's overrides; the plain loop reads the same weights from ZOO_WEIGHTS.
ZOO = {
    "sparse kl": ["model=sparse", "model.sparsity=kl"],
    "sparse l1": ["model=sparse", "model.sparsity=l1", "model.sparsity_weight=0.001"],
    "contractive": ["model=contractive"],
    "wae": ["model=wae"],
    "rae": ["model=rae"],
}
ZOO_WEIGHTS = {
    "sparse kl": {"weight": 0.1, "target": 0.05},
    "sparse l1": {"weight": 0.001},
    "contractive": {"weight": 0.1},
    "wae": {"weight": 10.0},
    "rae": {"code": 0.01, "decoder": 0.001},
}
PLAIN_BOTTLENECK = 20  # the iwae and vqvae checks' code size
IWAE_SAMPLES = 5
# Burda et al. 2016, Table 1, MNIST, one stochastic layer: test NLL in nats (k = 5000).
PAPER_NLL = {"VAE k=1": 86.76, "IWAE k=5": 85.54, "IWAE k=50": 84.78}
PAPER_MODELS = {
    "VAE k=1": ["model=vae"],
    "IWAE k=5": ["model=iwae", "model.samples=5"],
    "IWAE k=50": ["model=iwae", "model.samples=50"],
}
DEEP_DEFAULT = ["model=deep", "model.hidden=[1000,500,250]", "bottleneck=30"]
MASK = ["model.corruption=mask"]
DEEP30_ELU = [*DEEP_DEFAULT, "model.activation=elu", "model.optimizer.lr=2e-3", "scheduler=cosine"]
ADAMW, BCE = ["optimizer=adamw"], "model.loss=bce"
# The recipes tried for experiment=deep30 (BENCHMARKS.md, "deep30"), each a set of overrides.
DEEP_RECIPES = {
    "default recipe": DEEP_DEFAULT,
    "experiment=deep30": ["experiment=deep30"],
    "mask 10%": [*DEEP_DEFAULT, *MASK, "model.corruption_level=0.1"],
    "mask 30%": [*DEEP_DEFAULT, *MASK, "model.corruption_level=0.3"],
    "gaussian 0.2": [*DEEP_DEFAULT, "model.corruption=gaussian", "model.corruption_level=0.2"],
    "dropout 10%": [*DEEP_DEFAULT, "model.dropout=0.1"],
    "cosine": [*DEEP_DEFAULT, "scheduler=cosine"],
    "mask 20% + cosine": [*DEEP_DEFAULT, *MASK, "model.corruption_level=0.2", "scheduler=cosine"],
    "mask 10% + cosine": [*DEEP_DEFAULT, *MASK, "model.corruption_level=0.1", "scheduler=cosine"],
    "adamw 0.05 + cosine": [
        *DEEP_DEFAULT, "optimizer=adamw", "model.optimizer.weight_decay=0.05", "scheduler=cosine"
    ],
    "mask 20% + onecycle 3e-3": [
        *DEEP_DEFAULT, *MASK, "model.corruption_level=0.2", "scheduler=onecycle",
        "model.optimizer.lr=3e-3", "+model.scheduler.cycle_momentum=false",
    ],
    "elu": [*DEEP_DEFAULT, "model.activation=elu"],
    "silu": [*DEEP_DEFAULT, "model.activation=silu"],
    "gelu": [*DEEP_DEFAULT, "model.activation=gelu"],
    "leaky_relu": [*DEEP_DEFAULT, "model.activation=leaky_relu"],
    "lr 3e-4": [*DEEP_DEFAULT, "model.optimizer.lr=3e-4"],
    "lr 3e-3 + cosine": [*DEEP_DEFAULT, "model.optimizer.lr=3e-3", "scheduler=cosine"],
    "batch 64": [*DEEP_DEFAULT, "data.batch_size=64"],
    "elu + lr 2e-3 + cosine": DEEP30_ELU,
    "silu + batch 64 + cosine": [
        *DEEP_DEFAULT, "model.activation=silu", "data.batch_size=64", "scheduler=cosine"
    ],
    # From here on built on "elu + lr 2e-3 + cosine", experiment=deep30 until 2026-12-03.
    # Longer schedules overfit (train MSE half the validation's), so these add a regulariser.
    "deep30 + gaussian 0.2": [*DEEP30_ELU, "model.corruption=gaussian",
                              "model.corruption_level=0.2"],
    "deep30 + adamw 0.01": [*DEEP30_ELU, *ADAMW, "model.optimizer.weight_decay=0.01"],
    # The classic deep autoencoders (Hinton and Salakhutdinov 2006) trained on cross-entropy.
    "deep30 + bce": [*DEEP30_ELU, BCE],
    "deep30 + bce + adamw 0.01": [*DEEP30_ELU, BCE, *ADAMW, "model.optimizer.weight_decay=0.01"],
    "deep30 + bce + adamw 0.05": [*DEEP30_ELU, BCE, *ADAMW, "model.optimizer.weight_decay=0.05"],
    "deep30 + bce + adamw 0.1": [*DEEP30_ELU, BCE, *ADAMW, "model.optimizer.weight_decay=0.1"],
    # "deep30 + bce + adamw 0.2" at 150 epochs is experiment=deep30 since 2026-12-03.
    "deep30 + bce + adamw 0.2": [*DEEP30_ELU, BCE, *ADAMW, "model.optimizer.weight_decay=0.2"],
    "deep30 + bce + gaussian 0.1": [*DEEP30_ELU, BCE, "model.corruption=gaussian",
                                    "model.corruption_level=0.1"],
    "deep30 + bce + adamw 0.4": [*DEEP30_ELU, BCE, *ADAMW, "model.optimizer.weight_decay=0.4"],
}  # fmt: skip


class PlainVAE(nn.Module):
    """PyTorch's examples/vae model with one ``hidden``-unit layer each side and a z-D code."""

    def __init__(self, bottleneck: int, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc21 = nn.Linear(hidden, bottleneck)
        self.fc22 = nn.Linear(hidden, bottleneck)
        self.fc3 = nn.Linear(bottleneck, hidden)
        self.fc4 = nn.Linear(hidden, 784)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x.view(-1, 784))
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


def plain_vae_loss(recon_x, x, mu, logvar) -> torch.Tensor:
    """examples/vae's loss: summed BCE + KL (nats, summed over the batch)."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def plain_vae(
    datamodule: MNISTDataModule, bottleneck: int, epochs: int, batch_size: int, seed: int
) -> dict[str, float]:
    """Train and test PlainVAE like examples/vae; test/nelbo and the mean code's test/mse."""
    torch.manual_seed(seed)
    model = PlainVAE(bottleneck)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_images = datamodule.split("train")[0]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(train_images), generator=generator).split(batch_size):
            data = to_unit_float(train_images[index])
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = plain_vae_loss(recon_batch, data, mu, logvar)
            (loss / len(data)).backward()  # per-image mean, as the framework's loss
            optimizer.step()
    model.eval()
    test_images = datamodule.split("test")[0]
    total, squared = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(test_images), 1000):
            data = to_unit_float(test_images[start : start + 1000])
            recon_batch, mu, logvar = model(data)
            total += float(plain_vae_loss(recon_batch, data, mu, logvar))
            squared += float((model.decode(mu) - data.view(-1, 784)).square().sum())
    return {"test/nelbo": total / len(test_images), "test/mse": squared / test_images.numel()}


def iwae_log_weights(model: PlainVAE, x: torch.Tensor, samples: int) -> torch.Tensor:
    """``(B, k)`` log p(x|z) + log N(z; 0, I) - log q(z|x), written out by hand."""
    mu, logvar = model.encode(x.view(-1, 784))
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(samples, *mu.shape)
    z = mu + std * eps  # (k, B, z)
    logits = model.fc4(F.relu(model.fc3(z)))
    target = x.view(1, -1, 784).expand_as(logits)
    log_px = -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)
    log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
    log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi)).sum(-1) - (0.5 * logvar).sum(-1)
    return (log_px + log_pz - log_qz).T


def plain_iwae(
    datamodule: MNISTDataModule,
    bottleneck: int,
    samples: int,
    epochs: int,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """PlainVAE trained on -L_k (Burda et al. 2016, eq. 8); the test L_k and mean-code MSE."""
    torch.manual_seed(seed)
    model = PlainVAE(bottleneck)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_images = datamodule.split("train")[0]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(train_images), generator=generator).split(batch_size):
            data = to_unit_float(train_images[index])
            optimizer.zero_grad()
            weights = iwae_log_weights(model, data, samples)
            loss = -(torch.logsumexp(weights, 1) - math.log(samples)).mean()
            loss.backward()
            optimizer.step()
    test_images = datamodule.split("test")[0]
    bound, squared = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(test_images), 1000):
            data = to_unit_float(test_images[start : start + 1000])
            weights = iwae_log_weights(model, data, samples)
            bound += float((torch.logsumexp(weights, 1) - math.log(samples)).sum())
            mu, _ = model.encode(data.view(-1, 784))
            squared += float((model.decode(mu) - data.view(-1, 784)).square().sum())
    return {"test/bound": bound / len(test_images), "test/mse": squared / test_images.numel()}


def plain_vqvae(
    datamodule: MNISTDataModule,
    bottleneck: int,
    epochs: int,
    batch_size: int,
    seed: int,
    codebook_size: int = 512,
    commitment: float = 0.25,
    hidden: int = 1024,
) -> dict[str, float]:
    """An MLP VQ-VAE loop (van den Oord et al. 2017, eq. 3): one codebook, entries started
    on the first batch's codes; test/mse of the quantised codes' reconstructions."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, bottleneck))
    decoder = nn.Sequential(
        nn.Linear(bottleneck, hidden), nn.ReLU(), nn.Linear(hidden, 784), nn.Sigmoid()
    )
    codebook = nn.Parameter(
        torch.empty(codebook_size, bottleneck).uniform_(-1 / codebook_size, 1 / codebook_size)
    )
    parameters = [*encoder.parameters(), *decoder.parameters(), codebook]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    train_images = datamodule.split("train")[0]
    generator = torch.Generator().manual_seed(seed)
    seeded = False

    def quantise(z: torch.Tensor) -> torch.Tensor:
        nearest = torch.cdist(z, codebook).argmin(1)
        return codebook[nearest]

    for _ in range(epochs):
        for index in torch.randperm(len(train_images), generator=generator).split(batch_size):
            x = to_unit_float(train_images[index]).view(-1, 784)
            optimizer.zero_grad()
            z = encoder(x)
            if not seeded:  # entries on random codes of the first batch, jittered
                with torch.no_grad():
                    rows = torch.randint(len(z), (codebook_size,))
                    codebook.copy_(
                        z[rows] + 0.01 * z.std() * torch.randn(codebook_size, bottleneck)
                    )
                seeded = True
            e = quantise(z)
            recon = decoder(z + (e - z).detach())
            loss = (
                (recon - x).square().sum(1).mean()
                + (z.detach() - e).square().sum(1).mean()
                + commitment * (z - e.detach()).square().sum(1).mean()
            )
            loss.backward()
            optimizer.step()
    test_images = datamodule.split("test")[0]
    squared = 0.0
    with torch.no_grad():
        for start in range(0, len(test_images), 1000):
            x = to_unit_float(test_images[start : start + 1000]).view(-1, 784)
            squared += float((decoder(quantise(encoder(x))) - x).square().sum())
    return {"test/mse": squared / test_images.numel()}


class PlainAE(nn.Module):
    """784-``hidden``-z-``hidden``-784, ReLU, sigmoid pixels: the zoo families' default net."""

    def __init__(self, bottleneck: int, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, bottleneck)
        self.decoder = nn.Sequential(
            nn.Linear(bottleneck, hidden), nn.ReLU(), nn.Linear(hidden, 784), nn.Sigmoid()
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden layer's pre-activations and the code."""
        pre = self.fc1(x)
        return pre, self.fc2(F.relu(pre))


def plain_zoo_loss(name: str, model: PlainAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's objective written out again (loss, per-pixel mse) on ``x`` ``(B, 784)``."""
    w = ZOO_WEIGHTS[name]
    if name == "contractive":
        x = x.detach().requires_grad_(True)  # the Jacobian is taken at the input
    pre, z = model.encode(x)
    recon_x = model.decoder(z)
    sse = (recon_x - x).pow(2).sum(1).mean()
    if name == "sparse kl":
        rho, rho_hat = w["target"], torch.sigmoid(pre).mean(0)
        kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
        penalty = w["weight"] * kl.sum()
    elif name == "sparse l1":
        penalty = w["weight"] * z.abs().sum(1).mean()
    elif name == "contractive":
        rows = [
            torch.autograd.grad(z[:, k].sum(), x, create_graph=True)[0] for k in range(z.shape[1])
        ]  # row k of every image's Jacobian: images are independent
        penalty = w["weight"] * sum(row.pow(2).sum(1) for row in rows).mean()
    elif name == "wae":
        n, prior = len(z), torch.randn_like(z)
        mmd = 0.0
        for scale in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0):
            c = 2.0 * z.shape[1] * scale

            def kernel(a, b, c=c):
                return c / (c + (a[:, None, :] - b[None, :, :]).pow(2).sum(-1))

            off = 1 - torch.eye(n)
            mmd = mmd + ((kernel(z, z) + kernel(prior, prior)) * off).sum() / (n * (n - 1))
            mmd = mmd - 2 * kernel(z, prior).mean()
        penalty = w["weight"] * mmd
    else:
        decoder_l2 = sum(p.pow(2).sum() for p in model.decoder.parameters())
        penalty = w["code"] * 0.5 * z.pow(2).sum(1).mean() + w["decoder"] * decoder_l2
    return sse + penalty, (recon_x - x).pow(2).mean()


def plain_zoo(
    datamodule: MNISTDataModule, name: str, bottleneck: int, epochs: int, batch_size: int,
    seed: int,
) -> dict[str, float]:  # fmt: skip
    """Train and test PlainAE on ``name``'s objective; test/loss and test/mse per batch of
    1000 (the framework's eval batches: the sparsity and MMD terms are batch statistics)."""
    torch.manual_seed(seed)
    model = PlainAE(bottleneck)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_images = datamodule.split("train")[0]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(train_images), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss, _ = plain_zoo_loss(name, model, to_unit_float(train_images[index]).view(-1, 784))
            loss.backward()
            optimizer.step()
    test_images = datamodule.split("test")[0]
    total, squared = 0.0, 0.0
    with torch.enable_grad() if name == "contractive" else torch.no_grad():
        for start in range(0, len(test_images), 1000):
            data = to_unit_float(test_images[start : start + 1000]).view(-1, 784)
            loss, mse = plain_zoo_loss(name, model, data)
            total, squared = total + float(loss) * len(data), squared + float(mse) * len(data)
    return {"test/loss": total / len(test_images), "test/mse": squared / len(test_images)}


def pca_test_mse(train_images: torch.Tensor, test_images: torch.Tensor, k: int) -> float:
    """Per-pixel MSE of the rank-k PCA reconstruction of the test set (fitted on train)."""
    x = to_unit_float(train_images).flatten(1).double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vh[:k]  # (k, 784)
    t = to_unit_float(test_images).flatten(1).double() - mean
    return float(((t @ basis.T @ basis - t) ** 2).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    parser.add_argument("--zoo-bottleneck", type=int, default=2, help="z of the zoo rows")
    parser.add_argument(
        "--zoo", nargs="+", choices=list(ZOO), default=list(ZOO), help="the zoo rows to train"
    )
    parser.add_argument(
        "--family-bottlenecks", type=int, nargs="+", default=[2, 16],
        help="the z of the families table",
    )  # fmt: skip
    parser.add_argument(
        "--families", nargs="+", default=None,
        help="the families of the families table (default: every registered one)",
    )  # fmt: skip
    parser.add_argument("--family-nll-samples", type=int, default=1000)
    parser.add_argument("--family-nll-images", type=int, default=500)
    parser.add_argument("--deep-epochs", type=int, default=100, help="epochs of the deep30 rows")
    parser.add_argument(
        "--deep-recipes", nargs="+", choices=list(DEEP_RECIPES),
        default=["default recipe", "experiment=deep30"], help="the deep30 rows to train",
    )  # fmt: skip
    parser.add_argument(
        "--paper-passes", type=int, default=100,
        help="epochs of each iwae_paper run (the paper's full schedule is 3280)",
    )  # fmt: skip
    parser.add_argument(
        "--nll-samples", type=int, default=5000, help="importance samples of iwae_paper's NLL"
    )
    parser.add_argument(
        "--paper-nll-images", type=int, default=None,
        help="N test images of iwae_paper's NLL, a fixed random subset (default: all 10k)",
    )  # fmt: skip
    parser.add_argument("--figures", action="store_true", help="keep the figure callbacks on")
    parser.add_argument(
        "--data-root", default=os.environ.get("AE_DATA_ROOT", str(PROJECT / "data"))
    )
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument(
        "--loop-images", type=int, default=1000, help="images the one-at-a-time loops take"
    )
    args = parser.parse_args(argv)

    datamodule = MNISTDataModule(root=args.data_root, val_size=args.val_size, download=False)
    train_images, test_images = datamodule.split("train")[0], datamodule.split("test")[0]
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="ae_quality_"))
    results: dict = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "device": args.device,
        "models": [],
    }
    for model, bottleneck in WORKFLOW if "workflow" in args.sections else []:
        runs = []
        for seed in args.seeds:
            overrides = [f"model={model}", f"bottleneck={bottleneck}", f"seed={seed}"]
            if not args.figures:
                overrides.append("callbacks=none")
            run_dir = runs_dir / f"{model}_z{bottleneck}_seed{seed}"
            runs.append(train_with(args, run_dir, *overrides))
        test_mse = [run["test/mse"] for run in runs]
        results["models"].append(
            {
                "model": model,
                "bottleneck": bottleneck,
                "seeds": args.seeds,
                "test_mse": round(statistics.mean(test_mse), 5),
                "test_mse_per_seed": [round(v, 5) for v in test_mse],
                "pca_test_mse": round(pca_test_mse(train_images, test_images, bottleneck), 5),
                "train_time_s": round(statistics.mean(run["train_time_s"] for run in runs), 1),
                "num_parameters": runs[0]["num_parameters"],
            }
        )
    if "vae" in args.sections:
        results["vae"] = vae_rows(args, datamodule, runs_dir)
    if "zoo" in args.sections:
        results["zoo"] = zoo_rows(args, datamodule, runs_dir)
    if "iwae" in args.sections:
        results["iwae"] = iwae_row(args, datamodule, runs_dir)
    if "vqvae" in args.sections:
        results["vqvae"] = vqvae_row(args, datamodule, runs_dir)
    if "iwae_paper" in args.sections:
        results["iwae_paper"] = iwae_paper_rows(args, runs_dir)
    if "families" in args.sections:
        results["families"] = family_rows(args, runs_dir)
    if "deep30" in args.sections:
        results["deep30"] = deep30_rows(args, runs_dir)
    if "sample_quality" in args.sections:
        results["sample_quality"] = sample_quality_floor(args, datamodule)
    if "evaluators" in args.sections:
        results["evaluators"] = evaluator_speed(args, datamodule)
    table = markdown_table(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return results


def vae_rows(args: argparse.Namespace, datamodule: MNISTDataModule, runs_dir: Path) -> list:
    """model=vae and the plain loop at each bottleneck, first seed only."""
    seed, rows = args.seeds[0], []
    for bottleneck in VAE_BOTTLENECKS:
        run = train_with(
            args, runs_dir / f"vae_z{bottleneck}_seed{seed}", "model=vae",
            f"bottleneck={bottleneck}", f"seed={seed}", "callbacks=none", "logger=none",
            "test_ckpt=last", "latent_metrics=false",
        )  # fmt: skip
        plain = plain_vae(datamodule, bottleneck, args.epochs, args.batch_size, seed)
        rows.append(
            {
                "bottleneck": bottleneck,
                "test_nelbo": round(run["test/nelbo"], 3),
                "test_mse": round(run["test/mse"], 5),
                "plain_test_nelbo": round(plain["test/nelbo"], 3),
                "plain_test_mse": round(plain["test/mse"], 5),
                "nelbo_vs_plain": round(run["test/nelbo"] / plain["test/nelbo"], 4),
            }
        )
    return rows


PLAIN_CHECK = ["callbacks=none", "logger=none", "test_ckpt=last", "latent_metrics=false",
               "eval.nll_samples=0"]  # fmt: skip


def iwae_row(args: argparse.Namespace, datamodule: MNISTDataModule, runs_dir: Path) -> dict:
    """model=iwae (k=5) beside ``plain_iwae``: test/bound and the mean code's test/mse."""
    seed, z = args.seeds[0], PLAIN_BOTTLENECK
    run = train_with(
        args, runs_dir / f"iwae_z{z}_seed{seed}", "model=iwae", f"model.samples={IWAE_SAMPLES}",
        f"bottleneck={z}", f"seed={seed}", *PLAIN_CHECK,
    )  # fmt: skip
    plain = plain_iwae(datamodule, z, IWAE_SAMPLES, args.epochs, args.batch_size, seed)
    return {
        "bottleneck": z, "samples": IWAE_SAMPLES,
        "test_bound": round(run["test/bound"], 3),
        "plain_test_bound": round(plain["test/bound"], 3),
        "bound_vs_plain": round(run["test/bound"] / plain["test/bound"], 4),
        "test_mse": round(run["test/mse"], 5), "plain_test_mse": round(plain["test/mse"], 5),
    }  # fmt: skip


def vqvae_row(args: argparse.Namespace, datamodule: MNISTDataModule, runs_dir: Path) -> dict:
    """model=vqvae (one codebook of 512) beside ``plain_vqvae``: the quantised test/mse."""
    seed, z = args.seeds[0], PLAIN_BOTTLENECK
    run = train_with(
        args, runs_dir / f"vqvae_z{z}_seed{seed}", "model=vqvae", f"bottleneck={z}",
        f"seed={seed}", *PLAIN_CHECK,
    )  # fmt: skip
    plain = plain_vqvae(datamodule, z, args.epochs, args.batch_size, seed)
    return {
        "bottleneck": z, "test_mse": round(run["test/mse"], 5),
        "plain_test_mse": round(plain["test/mse"], 5),
        "mse_vs_plain": round(run["test/mse"] / plain["test/mse"], 4),
    }  # fmt: skip


def iwae_paper_rows(args: argparse.Namespace, runs_dir: Path) -> list:
    """experiment=iwae_paper for the paper's three models, ``--paper-passes`` epochs each."""
    rows = []
    passes, images = args.paper_passes, args.paper_nll_images
    for name, overrides in PAPER_MODELS.items():
        run = train_with(
            args, runs_dir / f"iwae_paper_{name.replace(' ', '_').replace('=', '')}",
            "experiment=iwae_paper", *overrides, f"schedule_passes={passes}",
            f"trainer.max_epochs={passes}", "data.batch_size=20", "callbacks=minimal",
            "logger=none", "latent_metrics=false", f"eval.nll_samples={args.nll_samples}",
            f"eval.nll_images={'null' if images is None else images}", f"seed={args.seeds[0]}",
        )  # fmt: skip
        rows.append(
            {"model": name, "passes": passes, "nll_samples": args.nll_samples,
             "nll_images": images,  # None: the whole test split
             "test_nll": round(run["test/nll"], 2), "paper_nll": PAPER_NLL[name],
             "test_nelbo": round(run["test/nelbo"], 2),
             "train_time_s": round(run["train_time_s"], 1)}
        )  # fmt: skip
    return rows


def zoo_rows(args: argparse.Namespace, datamodule: MNISTDataModule, runs_dir: Path) -> list:
    """Each ``--zoo`` family and its plain loop at ``--zoo-bottleneck``, first seed only."""
    seed, bottleneck, rows = args.seeds[0], args.zoo_bottleneck, []
    for name in args.zoo:
        run = train_with(
            args, runs_dir / f"{name.replace(' ', '_')}_z{bottleneck}_seed{seed}", *ZOO[name],
            f"bottleneck={bottleneck}", f"seed={seed}", "callbacks=none", "logger=none",
            "test_ckpt=last", "latent_metrics=false",
        )  # fmt: skip
        plain = plain_zoo(datamodule, name, bottleneck, args.epochs, args.batch_size, seed)
        rows.append(
            {"family": name, "recipe_words": run["recipe"], "bottleneck": bottleneck,
             "test_loss": round(run["test/loss"], 3), "test_mse": round(run["test/mse"], 5),
             "plain_test_loss": round(plain["test/loss"], 3),
             "plain_test_mse": round(plain["test/mse"], 5),
             "loss_vs_plain": round(run["test/loss"] / plain["test/loss"], 4)}
        )  # fmt: skip
    return rows


def family_rows(args: argparse.Namespace, runs_dir: Path) -> list:
    """Every family at each ``--family-bottlenecks``, evaluated as a default run is, then
    each bottleneck's runs compared by ``ae-compare`` (their samples side by side)."""
    from ae_lightning.compare import compare
    from ae_lightning.models import families

    seed, rows = args.seeds[0], []
    for bottleneck in args.family_bottlenecks:
        folder = runs_dir / f"families_z{bottleneck}"
        runs = []
        for family in args.families or families():
            if family not in families():
                raise SystemExit(f"--families {family}: choose among {sorted(families())}")
            config = FAMILY_CONFIG.get(family, family)
            run_dir = folder / f"{family}_z{bottleneck}"
            named = [f"model={config}", f"bottleneck={bottleneck}"]
            if family == "vqvae":
                named.append(f"model.groups={max(1, bottleneck // CODE_DIMS_PER_CODEBOOK)}")
            run = train_with(
                args, run_dir, *named, f"seed={seed}", "callbacks=minimal", "logger=none",
                f"eval.nll_samples={args.family_nll_samples}",
                f"eval.nll_images={args.family_nll_images}", named=named,
            )  # fmt: skip
            runs.append(run_dir)
            rows.append(
                {"family": family, "config": config, "bottleneck": bottleneck,
                 "recipe_words": run["recipe"], "epochs": run["epochs"],
                 **{key: run.get(f"test/{key}") for key in (
                     "mse", "nll", "fd_samples", "fd_recon", "sample_class_entropy",
                     "knn_acc", "probe_acc", "active_units")},
                 "epoch_s": round(statistics.median(run["epoch_times_s"]), 2),
                 "train_time_s": round(run["train_time_s"], 1)}
            )  # fmt: skip
        compare(runs, folder / "comparison", args.data_root, "auto", seed)
    return rows


def deep30_rows(args: argparse.Namespace, runs_dir: Path) -> list:
    """``--deep-recipes`` (experiment=deep30 and the same model with the default recipe, by
    default), ``--deep-epochs`` each."""
    rows = []
    for name in args.deep_recipes:
        overrides = DEEP_RECIPES[name]
        run = train_with(
            argparse.Namespace(**{**vars(args), "epochs": args.deep_epochs}),
            runs_dir / "".join(c if c.isalnum() else "_" for c in name), *overrides,
            f"seed={args.seeds[0]}", "callbacks=minimal", "logger=none", "latent_metrics=false",
        )  # fmt: skip
        rows.append(
            {"recipe": name, "recipe_words": run["recipe"], "epochs": run["epochs"],
             "test_mse": round(run["test/mse"], 5),
             "best_val_mse": round(run.get("best_val/mse", float("nan")), 5),
             "train_time_s": round(run["train_time_s"], 1)}
        )  # fmt: skip
    return rows


def sample_quality_floor(args: argparse.Namespace, datamodule: MNISTDataModule) -> dict:
    """The test images against as many official training images, in the CNN's features."""
    from ae_lightning.sample_quality import (
        embed,
        frechet_distance,
        pixel_batches,
        prepare_classifier,
    )

    device = torch.device(args.device)
    epochs = compose_config().eval.classifier_epochs  # the runs' own classifier and cache
    train_set = datamodule.official_train_split()
    classifier = prepare_classifier(datamodule.cache_dir, train_set, epochs).to(device)
    test_images, test_labels = datamodule.grey_split("test")
    train_images = train_set[0][: len(test_images)]
    test, predicted = embed(classifier, pixel_batches(test_images, device))
    train, _ = embed(classifier, pixel_batches(train_images, device))
    # What perfect Bernoulli means would score against a binarised run's test draws, had
    # test/fd_* kept those draws as their reference (they use the grey images).
    binary = MNISTDataModule(root=datamodule.root, download=False, val_size=datamodule.val_size,
                             binarize="static")  # fmt: skip
    draws, _ = embed(classifier, pixel_batches(binary.split("test")[0], device))
    return {
        "images": len(test_images),
        "classifier_epochs": epochs,
        "classifier_test_acc": round(float((predicted.cpu() == test_labels).float().mean()), 4),
        "fd_test_vs_train": round(frechet_distance(test, train), 4),
        "fd_test_vs_itself": round(frechet_distance(test, test), 6) + 0.0,  # no "-0"
        "fd_test_vs_its_binary_draw": round(frechet_distance(test, draws), 4),
    }


def images_per_second(run, n: int, device: torch.device) -> float:
    """``n`` over the seconds ``run()`` takes, after one warm-up call."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


@torch.no_grad()
def evaluator_speed(args: argparse.Namespace, datamodule: MNISTDataModule) -> dict:
    """Images/s of the batched evaluators beside a loop over single images of the same maths."""
    from ae_lightning.models import families
    from ae_lightning.sample_quality import DigitClassifier, embed, pixel_batches

    device = torch.device(args.device)
    test_images = datamodule.split("test")[0]
    loop_images = test_images[: args.loop_images]
    torch.manual_seed(0)
    classifier = DigitClassifier().to(device).eval()  # its speed does not depend on training
    model = families()["vae"](bottleneck=10, hidden=[1024]).to(device).eval()

    def features_loop() -> None:
        for image in loop_images:
            classifier.features(to_unit_float(image[None].to(device)))

    def codes_loop() -> None:
        codes = torch.cat([model.encode(to_unit_float(image[None].to(device))) for image in
                           loop_images])  # fmt: skip
        active_units(codes)

    rows = {
        "features": (lambda: embed(classifier, pixel_batches(test_images, device)), features_loop),
        "active_units": (
            lambda: active_units(encode_images(model.encode, test_images, device=device)),
            codes_loop,
        ),
    }
    out = {"device": args.device, "batched_images": len(test_images),
           "loop_images": len(loop_images)}  # fmt: skip
    for name, (batched, loop) in rows.items():
        fast = images_per_second(batched, len(test_images), device)
        slow = images_per_second(loop, len(loop_images), device)
        out[name] = {"batched_images_per_s": round(fast), "loop_images_per_s": round(slow),
                     "speedup": round(fast / slow, 1)}  # fmt: skip
    return out


def markdown_table(results: dict) -> str:
    if not results["models"]:
        return extra_tables(results)
    lines = [
        f"{results['epochs']} epochs, batch {results['batch_size']}, test per-pixel MSE "
        "(mean over seeds; each seed's value after it)",
        "",
        "| model | bottleneck | test MSE | per seed | PCA test MSE | parameters | train time s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["models"]:
        per_seed = ", ".join(
            f"{seed}: {v:.4f}"
            for seed, v in zip(row["seeds"], row["test_mse_per_seed"], strict=True)
        )
        lines.append(
            f"| {row['model']} | {row['bottleneck']} | {row['test_mse']:.4f} | {per_seed} "
            f"| {row['pca_test_mse']:.4f} | {row['num_parameters']:,} | {row['train_time_s']:.0f} |"
        )
    return "\n".join(lines) + extra_tables(results)


def extra_tables(results: dict) -> str:
    lines = []
    if results.get("vae"):
        lines += [
            "",
            f"VAE (784-1024-z, Bernoulli, beta 1), {results['epochs']} epochs, batch "
            f"{results['batch_size']}: test negative ELBO (nats per image, one sample) and "
            "the mean code's per-pixel test MSE, beside a plain PyTorch loop (examples/vae)",
            "",
            "| z | test/nelbo | plain loop nelbo | ratio | test/mse | plain loop mse |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['bottleneck']} | {r['test_nelbo']:.2f} | {r['plain_test_nelbo']:.2f} | "
            f"{r['nelbo_vs_plain']:.4f} | {r['test_mse']:.4f} | {r['plain_test_mse']:.4f} |"
            for r in results["vae"]
        ]
    if results.get("iwae"):
        r = results["iwae"]
        lines += [
            "",
            f"IWAE (784-1024-{r['bottleneck']}, k={r['samples']}), {results['epochs']} epochs, "
            f"batch {results['batch_size']}: test L_k (nats per image) and the mean code's "
            "test MSE, beside a plain PyTorch loop of the same bound",
            "",
            "| test/bound | plain loop bound | ratio | test/mse | plain loop mse |",
            "|---|---|---|---|---|",
            f"| {r['test_bound']:.2f} | {r['plain_test_bound']:.2f} | {r['bound_vs_plain']:.4f} "
            f"| {r['test_mse']:.4f} | {r['plain_test_mse']:.4f} |",
        ]
    if results.get("vqvae"):
        r = results["vqvae"]
        lines += [
            "",
            f"VQ-VAE (784-1024-{r['bottleneck']}, one codebook of 512), {results['epochs']} "
            f"epochs, batch {results['batch_size']}: test MSE of the quantised codes, beside a "
            "plain PyTorch loop",
            "",
            "| test/mse | plain loop mse | ratio |",
            "|---|---|---|",
            f"| {r['test_mse']:.4f} | {r['plain_test_mse']:.4f} | {r['mse_vs_plain']:.4f} |",
        ]
    if results.get("iwae_paper"):
        first = results["iwae_paper"][0]
        images = first["nll_images"]
        on = "all the test images" if images is None else f"{images} random test images"
        lines += [
            "",
            f"experiment=iwae_paper (784-200-200-50 tanh, dynamic binarisation, batch 20), "
            f"{first['passes']} of the paper's 3280 passes: test NLL (nats, "
            f"{first['nll_samples']} importance samples, {on}) beside Burda et al. 2016, "
            "Table 1 (all 10k test images)",
            "",
            "| model | test/nll | paper | test/nelbo | train time s |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['test_nll']:.2f} | {r['paper_nll']:.2f} | "
            f"{r['test_nelbo']:.2f} | {r['train_time_s']:.0f} |"
            for r in results["iwae_paper"]
        ]
    if results.get("zoo"):
        lines += [
            "",
            f"Zoo families (784-1024-z), {results['epochs']} epochs, batch "
            f"{results['batch_size']}: test loss (summed squared error per image + the "
            "penalty) beside a plain PyTorch loop of the same objective",
            "",
            "| family | recipe | z | test/loss | plain loop loss | ratio | test/mse | plain mse |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['family']} | {r['recipe_words']} | {r['bottleneck']} | {r['test_loss']:.3f} "
            f"| {r['plain_test_loss']:.3f} | {r['loss_vs_plain']:.4f} | {r['test_mse']:.4f} "
            f"| {r['plain_test_mse']:.4f} |"
            for r in results["zoo"]
        ]
    if results.get("families"):
        lines += family_table(results)
    if results.get("deep30"):
        lines += ["", "deep30 (784-1000-500-250-30): test per-pixel MSE (best val checkpoint)",
                  "", "| recipe | what | epochs | test MSE | best val MSE |",
                  "|---|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {r['recipe']} | {r['recipe_words']} | {r['epochs']} | {r['test_mse']:.4f} | "
            f"{r['best_val_mse']:.4f} |"
            for r in results["deep30"]
        ]
    if results.get("sample_quality"):
        r = results["sample_quality"]
        lines += ["", f"Sample quality floor: {r['images']} test images against as many "
                  f"training images, in the features of the CNN ({r['classifier_epochs']} "
                  "epochs)", "", "| Fréchet distance test vs train | test vs itself | test "
                  "vs its static binary draw | CNN test accuracy |", "|---|---|---|---|",
                  f"| {r['fd_test_vs_train']:.4f} | {r['fd_test_vs_itself']:.2g} | "
                  f"{r['fd_test_vs_its_binary_draw']:.4f} | "
                  f"{r['classifier_test_acc']:.4f} |"]  # fmt: skip
    if results.get("evaluators"):
        r = results["evaluators"]
        lines += ["", f"Evaluators on {r['device']}: images/s batched ({r['batched_images']} "
                  f"images) and one image at a time ({r['loop_images']} images)", "",
                  "| evaluator | batched images/s | loop images/s | speed-up |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {name} | {r[name]['batched_images_per_s']:,} | {r[name]['loop_images_per_s']:,}"
            f" | {r[name]['speedup']:.1f} |"
            for name in ("features", "active_units")
        ]
    return "\n".join(lines)


def family_table(results: dict) -> list[str]:
    """The families rows as Markdown: a dash where a family has no such number."""

    def cell(value: object, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    first = results["families"][0]
    lines = [
        "",
        f"Every family (784-1024-z), {first['epochs']} epochs, batch {results['batch_size']}: "
        "per-pixel test MSE, test NLL (nats), Fréchet distances of samples (each family's "
        "own sampler) and reconstructions to the test images, kNN and linear-probe accuracy "
        "of the codes, active units, median seconds per epoch",
        "",
        "| family | z | recipe | test MSE | NLL | FD samples | FD recon | kNN | probe | "
        "active | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['family']} | {r['bottleneck']} | {r['recipe_words']} | {cell(r['mse'], 4)} | "
        f"{cell(r['nll'], 1)} | {cell(r['fd_samples'], 2)} | {cell(r['fd_recon'], 2)} | "
        f"{cell(r['knn_acc'], 3)} | {cell(r['probe_acc'], 3)} | {cell(r['active_units'], 0)} "
        f"| {cell(r['epoch_s'], 2)} |"
        for r in results["families"]
    ]
    return lines


if __name__ == "__main__":
    main()
