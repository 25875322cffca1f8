"""Test a saved checkpoint again, with figures: `python eval.py ckpt_path=<file.ckpt>`."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("AE_PROJECT_DIR", str(Path(__file__).resolve().parent))  # data/ beside us

from ae_lightning.naming import quote_path_overrides  # noqa: E402
from ae_lightning.train import ensure_writable_logs, evaluate, run_cli  # noqa: E402


@hydra.main(version_base="1.3", config_path="pkg://ae_lightning.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return run_cli(cfg, task=evaluate)


if __name__ == "__main__":
    ensure_writable_logs()
    sys.argv = quote_path_overrides(sys.argv)  # run folders paste back as printed
    main()
