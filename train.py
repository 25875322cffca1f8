"""Train one MLP autoencoder on MNIST: `python train.py model=hidden1024 bottleneck=10`."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("AE_PROJECT_DIR", str(Path(__file__).resolve().parent))  # data/ beside us

from ae_lightning.naming import quote_path_overrides  # noqa: E402
from ae_lightning.train import ensure_writable_logs, run_cli  # noqa: E402  (+ resolvers)


@hydra.main(version_base="1.3", config_path="pkg://ae_lightning.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run_cli(cfg)


if __name__ == "__main__":
    ensure_writable_logs()
    sys.argv = quote_path_overrides(sys.argv)  # run folders paste back as printed
    main()
