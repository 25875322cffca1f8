"""Optional dependencies: a feature asked for without its extra is refused in one sentence."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from ae_lightning.errors import UserError

# Command-line choices that need an optional package: (prefix, module, extra, feature).
CHOICES_NEEDING_EXTRAS = (
    ("hydra/launcher=local_parallel", "hydra_plugins.hydra_joblib_launcher", "sweeps",
     "hydra/launcher=local_parallel"),
    ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher", "sweeps",
     "hydra/launcher=joblib"),
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "sweeps",
     "hydra/launcher=slurm"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "sweeps",
     "hydra/launcher=submitit"),
    ("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "sweeps",
     "hparams_search=optuna"),
    ("logger=mlflow", "mlflow", "mlflow", "logger=mlflow"),
    ("logger=wandb", "wandb", "wandb", "logger=wandb"),
)  # fmt: skip


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def require(module: str, extra: str, feature: str) -> None:
    """Raise ``UserError`` naming the extra if ``module`` is not installed."""
    if not installed(module):
        raise UserError(
            f"{feature} needs the optional package {module.split('.')[-1]}, which is not "
            f"installed: pip install 'ae-lightning[{extra}]'."
        )


def check_command_line(args: Sequence[str]) -> None:
    """Refuse, before Hydra starts, a command-line choice whose extra is missing; a list of
    choices (``'logger=[tensorboard,mlflow]'``) is checked choice by choice."""
    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        value = value.strip().strip("'\"")
        if value.startswith("[") and value.endswith("]"):
            choices = [f"{key}={v.strip()}" for v in value[1:-1].split(",")]
        else:
            choices = [arg.lstrip("+~")]
        for choice in choices:
            for prefix, module, extra, feature in CHOICES_NEEDING_EXTRAS:
                if choice.startswith(prefix):
                    require(module, extra, feature)
