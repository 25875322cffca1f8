"""What TensorBoard shows beyond Lightning's own logging: HParams, the curves layout, tags.

Written with TensorBoard's own summary functions into a separate event file of the run's
folder, so nothing here depends on a logger's internals. Each function takes a folder and
plain values; callers decide what goes where (a run's folder, or the sweep's).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.types_pb2 import DT_STRING
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from torch.utils.tensorboard.summary import hparams as torch_hparams

from ae_lightning import markdown

# metrics.json keys -> logged names, so no final metric makes a group of its own.
FINAL_TAGS = {"best_val/mse": "val/best_mse", "train_time_s": "time/train_s"}
# TensorBoard's Time Series sorts tag groups by name and expands only the first two: the
# landing view must be `train/` and `val/`. The figures (`views/`, a sweep's `versus/`) sort
# after them; the final metrics, one point per run, last: their group's name is chosen for
# its place in that order (the card titles keep `test/mse`).
COMPARISON_GROUP = "versus"
FINAL_GROUP = "zfinal"
# Names other loggers keep but TensorBoard files elsewhere: per-epoch curves into `train/`.
CURVE_TAGS = {"time/epoch_s": "train/epoch_s"}
LR_MONITOR_PREFIX = "lr-"  # LearningRateMonitor's `lr-Adam`, `lr-Adam/pg1`, ...
# The HParams table's metric columns (final values; the plugin reads each run's last point).
HPARAMS_METRICS = (
    "test/mse", "val/best_mse", "test/knn_acc", "test/probe_acc", "time/train_s", "val/mse",
    "test/nll",
    "test/fd_samples",
)  # fmt: skip


def tensorboard_tag(name: str) -> str | None:
    """The TensorBoard tag of a logged name (None: not shown; Lightning's ``epoch`` counter
    is every chart's x axis already)."""
    if name == "epoch":
        return None
    if name.startswith(LR_MONITOR_PREFIX):
        _, _, group = name.partition("/")
        return "train/lr" + (f"/{group}" if group else "")
    if name in CURVE_TAGS:
        return CURVE_TAGS[name]
    if name.startswith("test/") or name in FINAL_TAGS.values():
        return f"{FINAL_GROUP}/{name}"
    return name


# The knobs every run reports, in the order the HParams table lists them.
KNOBS = (
    "model", "architecture", "bottleneck", "hidden", "activation", "lr", "weight_decay",
    "batch_size", "max_epochs", "seed",
)  # fmt: skip
# Which knobs a command-line override changes (other overrides become knobs of their own).
KNOBS_OF_OVERRIDE = {
    "model": ("model", "architecture"),
    "bottleneck": ("bottleneck", "architecture"),
    "model.hidden": ("hidden", "architecture"),
    "model.activation": ("activation",),
    "model.optimizer.lr": ("lr",),
    "model.optimizer.weight_decay": ("weight_decay",),
    "data.batch_size": ("batch_size",),
    "trainer.max_epochs": ("max_epochs",),
    "seed": ("seed",),
}


def final_scalars(metrics: Mapping[str, Any], logged: Iterable[str] = ()) -> dict[str, float]:
    """The numeric final metrics not yet logged, under their TensorBoard tags."""
    done = set(logged)
    return {
        FINAL_TAGS.get(key, key): float(value)
        for key, value in metrics.items()
        if "/" in FINAL_TAGS.get(key, key)
        and isinstance(value, (int, float))
        and FINAL_TAGS.get(key, key) not in done
    }


def knob_value(value: Any) -> str | float | bool:
    """Whole numbers as text (``2``, not HParams' ``2.0000``), other numbers as numbers."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and value > 1):
        return str(int(value))
    if isinstance(value, float):
        return value
    return str(value)


def varied_knobs(varying_keys: Iterable[str]) -> list[str]:
    """The knob names a sweep over ``varying_keys`` changes, most telling first."""
    knobs: list[str] = []
    for key in varying_keys:
        for knob in KNOBS_OF_OVERRIDE.get(key, (key,)):
            if knob not in knobs:
                knobs.append(knob)
    return knobs


def _write(
    log_dir: Path | str, summaries: Iterable[tuple[Summary, int]], suffix: str = ".ae-lightning"
) -> None:
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    writer = EventFileWriter(str(log_dir), filename_suffix=suffix)
    try:
        for summary, step in summaries:
            writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
    finally:
        writer.close()


# Knobs that only describe others (`hidden` is in `architecture`, `recipe` puts `lr` and
# the scheduler in words): a column of their own only when they tell the runs apart further.
DESCRIPTIVE_KNOBS = ("hidden", "recipe", "family", "dataset")


def differing_knobs(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Knob -> its distinct values, for the knobs whose values differ across ``rows``.

    A knob some rows lack differs too. Listed in ``KNOBS`` order, then in the rows' order;
    a descriptive knob whose value a knob already listed fixes is left out, so the five
    columns TensorBoard ticks go to knobs that say something new.
    """
    rows = list(rows)
    names = list(dict.fromkeys([*KNOBS, *(name for row in rows for name in row)]))
    names.sort(key=lambda name: name in DESCRIPTIVE_KNOBS)  # stable: real knobs first
    differing, columns = {}, {}
    for name in names:
        values = [knob_value(row[name]) if name in row else None for row in rows]
        distinct = list(dict.fromkeys(values))
        if len(distinct) < 2:
            continue
        if name in DESCRIPTIVE_KNOBS and any(
            len(set(zip(values, other, strict=True))) == len(set(other))
            for other in columns.values()
        ):
            continue  # fixed by a listed knob (`family` by `model`): no new information
        columns[name] = values
        differing[name] = [v for v in distinct if v is not None]
    return differing


EXPERIMENT_SUFFIX = ".ae-hparams"


def write_experiment(log_dir: Path | str, knobs: Mapping[str, Iterable[Any]]) -> None:
    """One HParams experiment: a column per knob (with the values seen) and the metric columns.

    TensorBoard's HParams tab ticks the first five knobs it is given, so a sweep passes only
    the knobs that differ between its runs. TensorBoard uses the first experiment it finds:
    written once per sweep (in its ``comparison`` run, replacing an earlier one) or by a
    single run; jobs of a sweep write none of their own.
    """
    log_dir = Path(log_dir)
    for old in log_dir.glob(f"*{EXPERIMENT_SUFFIX}") if log_dir.is_dir() else ():
        old.unlink()
    hparams = []
    for name, values in knobs.items():
        values = list(dict.fromkeys(knob_value(v) for v in values))
        same_type = values and len({type(v) for v in values}) == 1
        hparams.append(hp.HParam(name, hp.Discrete(values) if same_type else None))
    metrics = [hp.Metric(tensorboard_tag(name), display_name=name) for name in HPARAMS_METRICS]
    summary = hp.hparams_config_pb(hparams=hparams, metrics=metrics)
    _write(log_dir, [(summary, 0)], suffix=EXPERIMENT_SUFFIX)


def write_session(
    log_dir: Path | str, hparams: Mapping[str, Any], step: int, trial: str = ""
) -> None:
    """This run's row of the HParams table: its knobs; metrics come from its own scalars.

    ``trial`` names the row: the job's folder, the name TensorBoard gives the run.
    """
    start = hp.hparams_pb(
        {name: knob_value(value) for name, value in hparams.items()}, trial_id=trial or None
    )
    # TensorBoard's own writer has no session end; torch's gives the finished status.
    end = torch_hparams({"trial": trial or "run"}, {})[2]
    _write(log_dir, [(start, step), (end, step)])


def write_curves_layout(log_dir: Path | str) -> None:
    """Custom Scalars tab: a train and a val curve of every run, time per epoch.

    A VAE trains on its objective, not on MSE: its train curve is ``train/loss`` beside
    ``val/nelbo``, on a chart of its own (nats per image, not MSE's scale).
    """
    layout = layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title="Training curves",
                chart=[
                    layout_pb2.Chart(
                        title="MSE per pixel: train and val of every run",
                        multiline=layout_pb2.MultilineChartContent(tag=[r"^(train|val)/mse$"]),
                    ),
                    layout_pb2.Chart(
                        title="Objective in nats per image (VAEs): train/loss and val/nelbo",
                        multiline=layout_pb2.MultilineChartContent(
                            tag=[r"^train/loss$", r"^val/nelbo$"]
                        ),
                    ),
                    layout_pb2.Chart(
                        title="Seconds per epoch",
                        multiline=layout_pb2.MultilineChartContent(
                            tag=[f"^{tensorboard_tag('time/epoch_s')}$"]
                        ),
                    ),
                ],
            )
        ]
    )
    summary = Summary()
    summary.value.add(
        tag=custom_scalar_metadata.CONFIG_SUMMARY_TAG,
        metadata=custom_scalar_metadata.create_summary_metadata(),
        tensor=TensorProto(dtype=DT_STRING, string_val=[layout.SerializeToString()]),
    )
    _write(log_dir, [(summary, 0)])


# The Text tab's metrics table opens on these, in this order; the rest (per-class MSEs,
# counts, words) follow by name.
MAIN_METRICS = (
    "test/mse", "test/nelbo", "val/best_mse", "test/knn_acc", "test/probe_acc", "time/train_s",
)  # fmt: skip


def main_first(tag: str) -> tuple[int, str]:
    """Sort key: the main metrics in ``MAIN_METRICS`` order, then every other tag by name."""
    return (MAIN_METRICS.index(tag) if tag in MAIN_METRICS else len(MAIN_METRICS), tag)


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """A two-column Markdown table of the final metrics, main ones first (cells escaped)."""
    rows = []
    tagged = [(FINAL_TAGS.get(k, k), v) for k, v in metrics.items()]
    for tag, value in sorted(tagged, key=lambda item: main_first(item[0])):
        if isinstance(value, float):
            value = f"{value:.5g}"
        elif isinstance(value, list):
            continue  # per-epoch lists belong in metrics.json, not a table cell
        rows.append([tag, value])
    return markdown.table(["metric", "value"], rows)


def monospace_table(
    text: str,
    drop_constant: bool = False,
    first: Iterable[str] = (),
    only: Iterable[str] | None = None,
) -> str:
    """A Markdown table as aligned plain text in a code block, for TensorBoard's Text tab.

    Its HTML tables squeeze columns to their cells and break headers mid-word (``statu|s``);
    a code block keeps every header whole and the columns aligned. ``drop_constant`` leaves
    out the columns every row agrees on (``dataset``, an empty ``error``), and the columns
    named in ``first`` follow the first column, so the main metrics fit the card; ``only``
    keeps the first column and those named (the rest stay in the file the table came from).
    """
    rows = [  # escaped cells hold no `|` of their own (markdown.escape)
        [markdown.unescape(cell.strip()) for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    ]
    if not rows:
        return text
    columns = len(rows[0])
    rows = [(row + [""] * columns)[:columns] for row in rows]
    if drop_constant and len(rows) > 2:
        kept = [i for i in range(columns) if len({row[i] for row in rows[1:]}) > 1 or i == 0]
        rows = [[row[i] for i in kept] for row in rows]
        columns = len(kept)
    if only is not None:
        wanted = set(only)
        kept = [i for i in range(columns) if i == 0 or rows[0][i] in wanted]
        rows = [[row[i] for i in kept] for row in rows]
        columns = len(kept)
    leading = [rows[0].index(name) for name in first if name in rows[0][1:]]
    order = [0, *leading, *(i for i in range(1, columns) if i not in leading)]
    rows = [[row[i] for i in order] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return markdown.code_block("\n".join(line.rstrip() for line in lines))


def padded_codes(codes: torch.Tensor, min_columns: int = 3) -> tuple[torch.Tensor, int]:
    """Codes with zero columns appended up to ``min_columns``, and how many were added.

    The Projector's PCA asks for more components than a 1-D or 2-D code has and shows
    nothing (``NaN%``); zero columns change no distance and let it draw.
    """
    missing = max(0, min_columns - codes.shape[1])
    if missing:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], missing)], dim=1)
    return codes, missing
