"""``ae-train``: ``python train.py`` installed; the same Hydra overrides, from any folder."""

import sys

import hydra
from omegaconf import DictConfig

from ae_lightning.cli import check_extras, quiet_console, record_config
from ae_lightning.naming import quote_path_overrides
from ae_lightning.train import ensure_writable_logs, refuse_finished_resume, run_cli


@hydra.main(version_base="1.3", config_path="pkg://ae_lightning.conf", config_name="train")
def _train(cfg: DictConfig) -> float:
    quiet_console()  # again here: a sweep's job may run in a fresh worker process
    record_config(cfg)
    return run_cli(cfg)


def main() -> None:
    quiet_console()
    check_extras()
    ensure_writable_logs()
    refuse_finished_resume()  # before Hydra writes .hydra-resumed/ into the finished run
    sys.argv = quote_path_overrides(sys.argv)  # run folders paste back as printed
    _train()
