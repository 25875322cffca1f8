"""Side-by-side figures and a summary table across runs: ``ae-compare RUN_OR_SWEEP [...]``.

Every run is evaluated on the same test images and pair, so differences in the figures are
the models' differences; each draws its samples as its own run did. Writes into ``<out>/``:
scatter.png, reconstructions.png, interpolation.png, samples.png, final_metrics.png,
summary.csv, summary.md and a TensorBoard event file with the same figures.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from ae_lightning import markdown, runfolder
from ae_lightning.atomic import check_no_links_out, write_atomic
from ae_lightning.callbacks import save_png
from ae_lightning.data import MNISTDataModule, to_unit_float
from ae_lightning.errors import UserError
from ae_lightning.latent import (
    SAMPLERS,
    CodeSampler,
    check_sampler,
    crossfade,
    decode_codes,
    default_codes,
    encode_images,
    fit_projection,
    interpolate,
    pick_pair,
)
from ae_lightning.models.ae import Autoencoder
from ae_lightning.naming import LOCATION_KEYS, display_name, named_pairs
from ae_lightning.plots import (
    final_metrics_figure,
    interpolation_figure,
    reconstructions_figure,
    render_rgb,
    samples_figure,
    scatter_figure,
)
from ae_lightning.runfolder import RunRecord, find_runs, is_run, read_run
from ae_lightning.tb import COMPARISON_GROUP, monospace_table

log = logging.getLogger(__name__)
# What each run is (read from its metrics.json), then how it did; test/nelbo and test/nll
# (importance-sampled, nats per image) for the families with a likelihood only.
DESCRIPTION_COLUMNS = ["family", "dataset", "recipe"]
METRIC_COLUMNS = [
    "num_parameters", "epochs", "train_time_s", "test/mse", "test/nelbo", "test/nll",
    "best_val/mse",
    "test/knn_acc", "test/probe_acc",
    "test/fd_samples", "test/fd_recon", "test/sample_class_entropy", "test/active_units",
]  # fmt: skip
# A seed group's row holds each metric's mean; its spread is in `<metric> std` (CSV only).
SEED_STD_COLUMNS = [f"{m} std" for m in METRIC_COLUMNS]
SUMMARY_COLUMNS = [
    "run",
    "status",
    "n",
    *DESCRIPTION_COLUMNS,
    "overrides",
    *METRIC_COLUMNS,
    "error",
    "path",
    *SEED_STD_COLUMNS,
]
COUNT_COLUMNS = ("num_parameters", "epochs")  # shown as one whole number when seeds agree
SEED_GROUP_STATUS = "mean"  # the status cell of a row that averages a run's seeds
# The final metrics drawn as bars (final_metrics.png), and those where higher is better.
BAR_METRICS = [
    "test/mse", "best_val/mse", "test/nelbo", "test/nll", "test/knn_acc", "test/probe_acc",
    "test/fd_samples", "train_time_s",
]  # fmt: skip
HIGHER_IS_BETTER = ("test/knn_acc", "test/probe_acc")
# The Text tab's summary opens on these after the run's name: what a reader compares first;
# it shows the final metrics only, so it fits its card.
TEXT_TAB_FIRST = ["test/mse", "test/nelbo", "best_val/mse", "test/knn_acc", "test/probe_acc", "n"]


SAMPLER_AUTO = "auto"


def label_runs(runs: list[RunRecord]) -> None:
    """Name each run by the overrides that differ between the runs (its folder otherwise),
    in the words its sweep folder uses (``linear,z=2``): one name in every table and figure."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    for run in runs:
        distinct = [o for o in run.overrides if o not in common]
        # (an `experiment=` that differs names the run too: only locations are left out)
        run.label = display_name(named_pairs(distinct, left_out=LOCATION_KEYS)) or run.path.name


def _data_for(run: RunRecord, data_root: str | None) -> MNISTDataModule:
    datamodule = runfolder.data_module(run.path, data_root)
    datamodule.setup()
    return datamodule


def _figures(
    models: list[tuple[RunRecord, Autoencoder]],
    datamodule: MNISTDataModule,
    sampler: str,
    seed: int,
) -> dict[str, Any]:
    """The four comparison figures, every model on the same images, pair and sampler."""
    test_images, test_labels = datamodule.split("test")
    train_images = datamodule.split("train")[0][:10_000]
    names = [run.label for run, _ in models]
    figures = {}

    panels, titles, axis_labels = [], [], []
    for (run, model), name in zip(models, names, strict=True):
        codes = encode_images(model.encode, test_images)
        projection = fit_projection(codes)
        panels.append(projection(codes))
        axis_labels.append(projection.axis_labels)  # "PC1 (22% var.)": each run its own
        dims = f"{codes.shape[1]}-D" + (", PCA" if projection.method == "pca" else "")
        titles.append(f"{name}\n({dims}, test MSE {run.metrics.get('test/mse', float('nan')):.4f})")
    labelled = datamodule.has_labels
    coloured = f"coloured by {datamodule.label_word}"
    figures["scatter"] = scatter_figure(
        torch.stack(panels), test_labels if labelled else None,
        f"{datamodule.display_name} test codes "
        + (coloured if labelled else "(not coloured: the data has no labels)"),
        axis_labels, ax_titles=titles, class_names=datamodule.class_names,
        label_word=datamodule.label_word,
    )  # fmt: skip

    originals, _ = datamodule.probe_images(64)
    with torch.no_grad():
        reconstructions = [model(originals) for _, model in models]
    shown = len(originals)  # the run's test/mse is over the whole test set; this, over these
    headers = [
        f"{_wrap(name, 28)}\nMSE {float(((r - originals) ** 2).mean()):.4f} on these {shown}"
        for name, r in zip(names, reconstructions, strict=True)
    ]
    figures["reconstructions"] = reconstructions_figure(
        originals, reconstructions,
        f"First {shown} test images and each model's reconstructions",
        names=headers,
    )  # fmt: skip

    first, second = pick_pair(test_labels, seed)
    classes = datamodule.class_names
    ends = to_unit_float(test_images[[first, second]])
    rows = []
    with torch.no_grad():
        for _, model in models:
            z = model.encode(ends)
            rows.append(model.decode(interpolate(z[0], z[1], 11)))
    rows.append(crossfade(ends[0], ends[1], 11))
    ends_named = (
        f"#{first} (a {classes[int(test_labels[first])]}) and "
        f"#{second} (a {classes[int(test_labels[second])]})"
        if labelled
        else f"#{first} and #{second}"
    )
    figures["interpolation"] = interpolation_figure(
        rows,
        [_wrap(name) for name in names] + ["pixel\ncross-fade"],
        f"Interpolation between test {ends_named}",
    )

    samples, drawn_by = [], []
    for _, model in models:

        def train_codes(model: Autoencoder = model) -> torch.Tensor:
            return encode_images(model.encode, train_images)

        if sampler == SAMPLER_AUTO:  # each model's own default, as its samples.png and FD
            codes, what = default_codes(model, 64, seed, train_codes)
        else:
            code_sampler = CodeSampler(sampler, train_codes(), seed=seed)
            codes, what = code_sampler.sample(64), code_sampler.description
        samples.append(decode_codes(model.decode, codes))
        drawn_by.append(what)
    if len(set(drawn_by)) == 1:  # one sampler for all: said once, in the title
        title, panel_names = f"Decoded samples: {drawn_by[0]}", names
    else:
        title = "Decoded samples: each model's own prior, or a sampler fitted to its codes"
        panel_names = [
            f"{_wrap(name, 28)}\n{_wrap(what, 34)}"
            for name, what in zip(names, drawn_by, strict=True)
        ]
    figures["samples"] = samples_figure(samples, title, names=panel_names)
    figures["final_metrics"] = final_metrics_figure(
        names,
        {
            name: [run.metrics.get(name) for run, _ in models]
            for name in BAR_METRICS
            if any(isinstance(run.metrics.get(name), (int, float)) for run, _ in models)
        },
        "Final metrics of each run: the test set's, the best checkpoint's val MSE, train time",
        higher_is_better=HIGHER_IS_BETTER,
    )
    return figures


def _wrap(text: str, width: int = 16) -> str:
    """Lines of at most ``width`` characters, broken at spaces and after a long name's commas
    (``hidden1024,z=10,`` / ``seed=1``)."""
    pieces = []  # (piece, whether it joins the previous piece without a space)
    for word in text.split():
        parts = word.split(",") if len(word) > width else [word]
        pieces += [
            (part + ("," if i < len(parts) - 1 else ""), i > 0) for i, part in enumerate(parts)
        ]
    lines = [""]
    for piece, glued in pieces:
        joined = lines[-1] + ("" if glued or not lines[-1] else " ") + piece
        if lines[-1] and len(joined) > width:
            lines.append(piece)
        else:
            lines[-1] = joined
    return "\n".join(lines)


def summary_rows(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """One row per run, and a mean +- std row above the runs that differ only in ``seed``.

    Groups sort by their mean test MSE (a lone run is a group of one), failed runs last.
    """
    rows = []
    for run in runs:
        row = {
            "run": run.label,
            "status": "ok" if run.ok and "test/mse" in run.metrics else run.status or "failed",
            "n": 1,
            "overrides": " ".join(run.overrides),
            "error": run.error,
            "path": str(run.path),
            **dict.fromkeys(SEED_STD_COLUMNS, ""),
        }
        for key in DESCRIPTION_COLUMNS + METRIC_COLUMNS:
            row[key] = run.metrics.get(key, "")
        rows.append(row)
    ok = [(run, row) for run, row in zip(runs, rows, strict=True) if row["status"] == "ok"]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for run, row in ok:
        groups.setdefault(seedless(run.overrides), []).append(row)
    ordered = []
    for members in groups.values():
        members.sort(key=lambda r: r["test/mse"])
        if len(members) > 1:
            ordered.append([seed_group_row(members), *members])
        else:
            ordered.append(members)
    ordered.sort(key=lambda block: block[0]["test/mse"])
    failed = [row for row in rows if row["status"] != "ok"]
    return [row for block in ordered for row in block] + failed


def seedless(overrides: list[str]) -> tuple[str, ...]:
    """What a run is apart from its seed (and where its files were): runs alike but for it."""
    return tuple(
        sorted(
            o for o in overrides
            if not o.lstrip("+").startswith(("seed=", *LOCATION_KEYS))
        )
    )  # fmt: skip


def seed_label(label: str) -> str:
    """``linear,seed=1`` -> ``linear``: the name the seeds' mean row goes by."""
    kept = [part for part in label.split(",") if not part.startswith("seed=")]
    return ",".join(kept) or "all seeds"


def seed_group_row(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each metric over runs that differ only in seed, its sample std, and n."""
    first = members[0]
    row = {
        "run": f"{seed_label(first['run'])} (mean ± std)",
        "status": SEED_GROUP_STATUS,
        "n": len(members),
        **{key: first[key] for key in DESCRIPTION_COLUMNS},
        "overrides": " ".join(o for o in first["overrides"].split() if not o.startswith("seed=")),
        "error": "",
        "path": "",
    }
    for key in METRIC_COLUMNS:
        values = [m[key] for m in members if isinstance(m[key], (int, float))]
        if len(values) == len(members) and key in COUNT_COLUMNS and len(set(values)) == 1:
            row[key] = values[0]  # the same count for every seed: no spread to show
        elif len(values) == len(members):
            row[key] = statistics.fmean(values)
            row[f"{key} std"] = statistics.stdev(values)
        else:  # a metric not every seed has (an old run): no mean that hides it
            row[key] = row[f"{key} std"] = ""
    return row


def write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    """``summary.csv`` and ``summary.md``, each by ``write_atomic``: a planted link is replaced."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "summary.csv", text.getvalue().encode())
    shown = [c for c in SUMMARY_COLUMNS if c not in ("overrides", "path", *SEED_STD_COLUMNS)]
    cells = []
    for row in rows:
        cells.append([])
        for column in shown:
            value = row[column]
            if isinstance(value, float):
                digits = 4 if column.startswith(("test/", "best_")) else 1
                value = f"{value:.{digits}f}"
                std = row.get(f"{column} std")
                if isinstance(std, float):
                    value += f" ± {std:.{digits}f}"
            cells[-1].append(value)
    write_atomic(out / "summary.md", (markdown.table(shown, cells) + "\n").encode())  # escaped


def compare(
    paths: list[Path | str],
    out: Path | str | None = None,
    data_root: str | None = None,
    sampler: str = "auto",
    seed: int = 0,
) -> Path:
    """Compare runs (or sweeps); return the folder the figures and tables were written to.

    ``sampler`` ``auto`` draws each model's samples as its own ``samples.png`` does (its
    prior, or the sampler its family fits to the codes); a name from ``latent.SAMPLERS``
    draws every model's the same way.
    """
    try:
        if sampler != SAMPLER_AUTO:
            check_sampler(sampler)  # before any work: a typo costs nothing
    except ValueError:
        raise UserError(
            f"--sampler {sampler} is not a sampler: choose one of "
            f"{', '.join((SAMPLER_AUTO, *SAMPLERS))} ({SAMPLER_AUTO}: each model's own)."
        ) from None
    paths = [Path(p) for p in paths]
    runs = [read_run(p) for p in find_runs(paths)]
    label_runs(runs)
    if out is None:  # inside a received folder: the name itself may be a planted link
        out = (paths[0] if not is_run(paths[0]) else paths[0].parent) / "comparison"
        if out.is_symlink():
            raise UserError(
                f"{out} is a link to {os.path.realpath(out)}, so the comparison would be "
                "written there: delete the link, or pass --out /a/folder."
            )
    out = Path(out)
    if out.is_dir():
        check_no_links_out(out, f"ae-compare (writing into {out})")
    _check_writable(out)

    models = []
    for run in runs:
        if not run.ok:
            continue
        try:
            model = runfolder.load_autoencoder(run.checkpoint)
        except runfolder.UnsafeCheckpointError:
            raise  # a file that tries to run code stops the comparison
        except UserError as err:  # a corrupt, foreign or diverged checkpoint: a failed row
            run.error = f"cannot load {run.checkpoint.name}: {err}"
            continue
        models.append((run, model))
    write_summary(summary_rows(runs), out)
    if not models:
        log.warning("No run has a loadable checkpoint: only the summary was written.")
        return out
    datamodule = _data_for(models[0][0], data_root)
    for run, model in models:  # every model, the first one's too, is shown these images
        if tuple(model.image_shape) != datamodule.image_shape:
            raise UserError(
                f"{run.path} was trained on images of shape {tuple(model.image_shape)} but the "
                f"data of {models[0][0].path} has images of shape {datamodule.image_shape}: "
                "compare runs of one dataset (a run's .hydra/config.yaml must name the data "
                "it was trained on)."
            )
    figures = _figures(models, datamodule, sampler, seed)

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out)) as writer:  # the TensorBoard run `comparison`
        for name, fig in figures.items():
            rgb = render_rgb(fig)
            save_png(rgb, out / f"{name}.png")
            writer.add_image(f"{COMPARISON_GROUP}/{name}", rgb, 0, dataformats="HWC")
        # `comparison/` sorts before the jobs' `run/` cards in the Text tab.
        summary = monospace_table(
            (out / "summary.md").read_text(),
            drop_constant=True,
            first=TEXT_TAB_FIRST,
            only=[*TEXT_TAB_FIRST, *BAR_METRICS, "status"],
        )
        summary += "\nEvery column (family, recipe, size, errors, paths): summary.md, summary.csv."
        writer.add_text("comparison/summary", summary, 0)
    return out


def _check_writable(out: Path) -> None:
    """One sentence, before any work, when the output folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UserError(
            f"The comparison cannot be written to {out} ({err.strerror or type(err).__name__}): "
            "pass --out /a/writable/folder."
        ) from None


if __name__ == "__main__":  # the CLI lives above this module, in cli/: say where, run nothing
    raise SystemExit(
        "error: `python -m ae_lightning.compare` is now `python -m ae_lightning.cli.compare` "
        "(or `ae-compare`): run that with the same arguments."
    )
