"""``ae-eval``: ``python eval.py`` installed; test a saved checkpoint again, with figures.

Light until a run starts, as ``ae-train``: the heavy stack is imported in the task function.
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
    refuse_eval_resume,
)
from ae_lightning.cli.help import print_help, wants_help
from ae_lightning.naming import quote_path_overrides


@hydra.main(version_base="1.3", config_path="pkg://ae_lightning.conf", config_name="train")
def _eval(cfg: DictConfig) -> float:
    quiet_console()
    from ae_lightning.policy import run_cli  # the heavy stack, only now
    from ae_lightning.train import evaluate

    freeze_start_up_objects()  # everything is imported: keep the collector off it
    record_config(cfg)
    return run_cli(cfg, task=evaluate)


def main() -> None:
    if wants_help(sys.argv):  # Hydra's page, without Hydra's repository walk
        print_help("eval")
        return
    quiet_console()
    check_extras()
    ensure_writable_logs()
    refuse_eval_resume()
    refuse_a_used_run_folder()
    sys.argv = quote_path_overrides(sys.argv)  # run folders paste back as printed
    _eval()
