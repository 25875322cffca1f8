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

``deep30``: experiment=deep30 beside the same 784-1000-500-250-30 model with the default
recipe (Adam 1e-3, clean inputs), both for ``--deep-epochs`` epochs (100 by default).

``sample_quality``: the floor of ``test/fd_*``, the Fréchet distance of the test images to
as many official training images in the sample-quality CNN's features (trained, or read
from its cache beside the data, as a run would), and the CNN's test accuracy.

``evaluators``: images per second of the evaluators, batched on ``--device`` as runs use
them, beside a loop of the same maths one image at a time: the CNN's features (for the
Fréchet distance) and the mean codes of a 784-1024-10 VAE (for active units).

    python bench/quality.py --json quality.json --markdown quality.md
    python bench/quality.py --sections vae --epochs 25
    python bench/quality.py --sections sample_quality evaluators --device cuda
"""

from __future__ import annotations

import argparse
import json
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
SECTIONS = ["workflow", "vae", "deep30", "sample_quality", "evaluators"]
DEEP_DEFAULT = ["model=deep", "model.hidden=[1000,500,250]", "bottleneck=30"]
MASK = ["model.corruption=mask"]
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
    "elu + lr 2e-3 + cosine": [
        *DEEP_DEFAULT, "model.activation=elu", "model.optimizer.lr=2e-3", "scheduler=cosine"
    ],
    "silu + batch 64 + cosine": [
        *DEEP_DEFAULT, "model.activation=silu", "data.batch_size=64", "scheduler=cosine"
    ],
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
    parser.add_argument("--deep-epochs", type=int, default=100, help="epochs of the deep30 rows")
    parser.add_argument(
        "--deep-recipes", nargs="+", choices=list(DEEP_RECIPES),
        default=["default recipe", "experiment=deep30"], help="the deep30 rows to train",
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
    test_images, test_labels = datamodule.split("test")
    train_images = train_set[0][: len(test_images)]
    test, predicted = embed(classifier, pixel_batches(test_images, device))
    train, _ = embed(classifier, pixel_batches(train_images, device))
    return {
        "images": len(test_images),
        "classifier_epochs": epochs,
        "classifier_test_acc": round(float((predicted.cpu() == test_labels).float().mean()), 4),
        "fd_test_vs_train": round(frechet_distance(test, train), 4),
        "fd_test_vs_itself": round(frechet_distance(test, test), 6) + 0.0,  # no "-0"
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
                  "epochs)", "", "| Fréchet distance test vs train | test vs itself | CNN "
                  "test accuracy |", "|---|---|---|",
                  f"| {r['fd_test_vs_train']:.4f} | {r['fd_test_vs_itself']:.2g} | "
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


if __name__ == "__main__":
    main()
