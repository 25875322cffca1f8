"""``ae-train``: ``python train.py`` installed; the same Hydra overrides, from any folder.

Light until a run starts: ``--help``, ``--cfg job`` and shell completion need Hydra only, so
torch and Lightning are imported inside the task function.
"""

import sys

import hydra
from omegaconf import DictConfig

from ae_lightning.cli import (
    check_extras,
    ensure_writable_logs,
    freeze_start_up_objects,
    quiet_console,
    record_config,
    refuse_a_used_run_folder,
    refuse_bad_resume,
    refuse_finished_resume,
    refuse_sweep_without_multirun,
)
from ae_lightning.cli.help import print_help, wants_help
from ae_lightning.naming import quote_path_overrides


@hydra.main(version_base="1.3", config_path="pkg://ae_lightning.conf", config_name="train")
def _train(cfg: DictConfig) -> float:
    quiet_console()  # again here: a sweep's job may run in a fresh worker process
    from ae_lightning.policy import run_cli  # the heavy stack, only now that a run starts

    freeze_start_up_objects()  # everything is imported: keep the collector off it
    record_config(cfg)
    return run_cli(cfg)


def main() -> None:
    if wants_help(sys.argv):  # Hydra's page, without Hydra's repository walk
        print_help("train")
        return
    quiet_console()
    check_extras()
    ensure_writable_logs()
    refuse_sweep_without_multirun()
    refuse_a_used_run_folder()
    refuse_bad_resume()  # before Hydra creates it or writes .hydra-resumed/ and train.log there
    refuse_finished_resume()  # before Hydra writes .hydra-resumed/ into the finished run
    sys.argv = quote_path_overrides(sys.argv)  # run folders paste back as printed
    _train()
