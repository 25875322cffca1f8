"""What both benchmarks share: running `train(cfg)` with the benchmark's settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from ae_lightning.cli import quiet_console
from ae_lightning.train import train

PROJECT = Path(__file__).resolve().parents[1]

# The benchmarks' logs read as a run's console does: without the third-party deprecation
# warnings and adverts that `train.py` hides (torch 2.14's pytree warning once per fit).
quiet_console()


def train_with(
    args: argparse.Namespace, run_dir: Path | str, *overrides: str, named: list[str] | None = None
) -> dict[str, Any]:
    """`train(cfg)` with the default config plus the benchmark's device, data and epochs.

    ``named``: also write the ``.hydra/`` files `python train.py` would, with these overrides
    as the run's own, so ``ae-compare`` reads the folder and labels it by them.
    """
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
    cfg = compose_config(*settings, *overrides)
    if named is not None:
        hydra_dir = Path(run_dir) / ".hydra"
        hydra_dir.mkdir(parents=True, exist_ok=True)
        (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(named)))
    return train(cfg)


def compose_config(*overrides: str) -> DictConfig:
    """The package's config (ae_lightning/conf/train.yaml) with ``overrides``, as train.py."""
    with initialize_config_module(config_module="ae_lightning.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))
