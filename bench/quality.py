"""Test MSE of the reference workflow's three models next to PCA at the same dimension.

Trains, with the default config (batch 128, 25 epochs, Adam at each model's default lr:
3e-3 for linear, 1e-3 for hidden1024; no weight decay): no hidden layer with a 2-D
bottleneck, 1024 hidden units with 2-D, and with 10-D. PCA is the closed-form linear
baseline on the same training images: the best any linear encoder/decoder pair can reach
(the linear model's sigmoid decoder can end a little either side of it).

    python bench/quality.py --json quality.json --markdown quality.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
from common import PROJECT, train_with

from ae_lightning.data import MNISTDataModule, to_unit_float

WORKFLOW = [("linear", 2), ("hidden1024", 2), ("hidden1024", 10)]


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
    parser.add_argument("--figures", action="store_true", help="keep the figure callbacks on")
    parser.add_argument(
        "--data-root", default=os.environ.get("AE_DATA_ROOT", str(PROJECT / "data"))
    )
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
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
    for model, bottleneck in WORKFLOW:
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
    table = markdown_table(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return results


def markdown_table(results: dict) -> str:
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
    return "\n".join(lines)


if __name__ == "__main__":
    main()
