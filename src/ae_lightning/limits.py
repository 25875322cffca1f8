"""Size limits checked before anything is allocated: a config or a received file names sizes.

A model's widths come from the command line and from checkpoints people send each other; a
width of 3,000,000 or a million layers would ask for gigabytes (or minutes) before any other
check could refuse it. ``check_model_size`` counts the parameters of the MLP a set of sizes
describes, by arithmetic alone, and refuses in one sentence what exceeds the limits.

The parameter limit is ``DEFAULT_MAX_PARAMETERS``; ``AE_MAX_PARAMETERS=<n>`` in the
environment raises (or lowers) it for every entry point at once: training, eval, ae-compare,
ae-export and ``load_run``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ae_lightning.errors import UserError

# Far above any MLP autoencoder of the literature (784-1000-500-250-30 has 2.8M), far below
# what would exhaust a workstation's memory once Adam's two moments are added.
DEFAULT_MAX_PARAMETERS = 100_000_000
MAX_WIDTH = 1_000_000
MAX_LAYERS = 64
LIMIT_VARIABLE = "AE_MAX_PARAMETERS"


def max_parameters() -> int:
    """The parameter limit in force: ``$AE_MAX_PARAMETERS`` if set, else the default."""
    raw = os.environ.get(LIMIT_VARIABLE)
    if raw is None or raw == "":
        return DEFAULT_MAX_PARAMETERS
    try:
        value = int(raw)
    except ValueError:
        raise UserError(
            f"{LIMIT_VARIABLE}={raw!r} is not a whole number: use e.g. "
            f"{LIMIT_VARIABLE}={DEFAULT_MAX_PARAMETERS}."
        ) from None
    if value < 1:
        raise UserError(
            f"{LIMIT_VARIABLE}={raw} must be positive: use e.g. "
            f"{LIMIT_VARIABLE}={DEFAULT_MAX_PARAMETERS}."
        )
    return value


def mlp_parameters(sizes: Sequence[int]) -> int:
    """Weights and biases of linear layers through ``sizes`` (arithmetic, nothing built)."""
    return sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False))


def check_model_size(
    bottleneck: int,
    hidden: Sequence[int],
    decoder_hidden: Sequence[int] | None,
    in_features: int,
    where: str,
    code_outputs: int = 1,
    extra_parameters: int = 0,
) -> int:
    """The parameter count of an encoder/decoder pair, or one sentence if it is too large.

    ``code_outputs`` is how many values per code dimension the encoder emits (2 for a mean
    and a log-variance); ``extra_parameters`` counts those outside the MLPs (a family's
    pseudo-inputs or codebooks). ``where`` names the source in the sentence
    (``model.hidden`` on the command line, a checkpoint's path).
    """
    decoder = list(hidden)[::-1] if decoder_hidden is None else list(decoder_hidden)
    layers = len(hidden) + len(decoder)
    if layers > 2 * MAX_LAYERS:
        raise UserError(
            f"{where} has {layers} hidden layers, more than {2 * MAX_LAYERS}: use a shorter "
            "model.hidden list."
        )
    for width in [bottleneck, *hidden, *decoder]:
        if width > MAX_WIDTH:
            raise UserError(
                f"{where} has a layer of {width} units, more than {MAX_WIDTH}: use a narrower "
                "layer (model.hidden or bottleneck)."
            )
    count = (
        mlp_parameters([in_features, *hidden, bottleneck * code_outputs])
        + mlp_parameters([bottleneck, *decoder, in_features])
        + extra_parameters
    )
    limit = max_parameters()
    if count > limit:
        raise UserError(
            f"{where} describes a model of {count:,} parameters, more than the limit of "
            f"{limit:,}: use smaller model.hidden/bottleneck sizes, or raise the limit with "
            f"{LIMIT_VARIABLE}={count}."
        )
    return count
