"""What both benchmarks share: running `train(cfg)` with the benchmark's settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from ae_lightning.train import train

PROJECT = Path(__file__).resolve().parents[1]


def train_with(args: argparse.Namespace, run_dir: Path | str, *overrides: str) -> dict[str, Any]:
    """`train(cfg)` with the default config plus the benchmark's device, data and epochs."""
    settings = [
        f"trainer.max_epochs={args.epochs}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"data.root={args.data_root}",
        "data.download=false",
        f"data.batch_size={args.batch_size}",
        f"data.val_size={args.val_size}",
        f"run_dir={run_dir}",
    ]
    chosen = {override.split("=", 1)[0].lstrip("+") for override in overrides}
    settings = [s for s in settings if s.split("=", 1)[0] not in chosen]  # a recipe's own wins
    return train(compose_config(*settings, *overrides))


def compose_config(*overrides: str) -> DictConfig:
    """The package's config (ae_lightning/conf/train.yaml) with ``overrides``, as train.py."""
    with initialize_config_module(config_module="ae_lightning.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))
