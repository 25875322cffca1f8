"""The model families, one file each, registered by being in this folder.

A family is a class in a module here that declares its own ``family`` name (the string
checkpoints store as ``model_family``) and subclasses ``ae_lightning.models.ae.Autoencoder``,
which holds the family contract (a family with other nets sets ``encoder_class`` or
overrides ``encode``/``decode``). To add one:

1. ``models/<name>.py``: a subclass with ``family = "<name>"``, its own knobs as keyword
   arguments of its own ``__init__`` (the shared ones arrive through ``**kwargs``, passed on
   to ``super().__init__``), checked there in one sentence each (``UserError``), and the
   methods of the contract it changes (see ``Autoencoder``'s docstring): ``training_loss``,
   ``evaluation_terms``, ``encode``/``decode``, ``prior_sample``, ``log_weights`` (for
   ``test/nll``), ``extra_parameters`` (weights outside the MLPs), ``recipe_words``,
   ``label``, ``graph_blocker``.
2. ``conf/model/<name>.yaml``: ``_target_: ae_lightning.models.<name>.<Class>`` and its knobs.

Nothing else names a family: training, checkpoints, figures, comparisons and the tests of
``tests/test_families.py`` ask the class. Only this package's own modules are imported;
a name read from a file (a checkpoint's ``model_family``) is looked up, never imported.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from functools import cache

from ae_lightning.system import TrainingSystem


@cache
def families() -> dict[str, type[TrainingSystem]]:
    """Every family class of this package by its ``family`` name, in file-name order."""
    found: dict[str, type[TrainingSystem]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            declared = (
                isinstance(value, type)
                and issubclass(value, TrainingSystem)
                and value.__module__ == module.__name__  # not a base it imported
                and "family" in vars(value)  # declared by this class, not inherited
            )
            if not declared:
                continue
            if value.family in found:
                raise RuntimeError(
                    f"model family {value.family!r} is declared by both "
                    f"{found[value.family].__qualname__} and {value.__qualname__}"
                )
            found[value.family] = value
    return found


def checkpoint_family(checkpoint: Mapping[str, object]) -> object:
    """The family a loaded checkpoint names; those written before the key hold plain AEs."""
    return checkpoint.get("model_family", "ae")


def family_class(name: object) -> type[TrainingSystem] | None:
    """The class of family ``name`` (a checkpoint's ``model_family``), or None if unknown."""
    return families().get(name) if isinstance(name, str) else None


def init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The settings ``cls(...)`` takes by name: its ``__init__``'s, and those it passes on
    through ``**kwargs`` to the classes above it (what ``save_hyperparameters`` records)."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        try:
            parameters = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):  # a builtin's: nothing more to read
            break
        for p in parameters:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                found.setdefault(p.name, p)  # the class's own default wins over a parent's
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break  # this class passes nothing further up
    return found
