"""MLP autoencoders on MNIST. ``ae_lightning.load_run(path)`` opens a finished run.

The API is imported on first use, so ``import ae_lightning`` stays light (no torch).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("ae-lightning")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from ae_lightning.api import Run, load_run

__all__ = ["Run", "load_run"]  # (and __version__)


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ae_lightning import api

        return getattr(api, name)
    raise AttributeError(f"module 'ae_lightning' has no attribute {name!r}")
