"""Side-by-side figures and a summary table across runs: ``ae-compare RUN_OR_SWEEP [...]``.

Every run is evaluated on the same test images, pair and sampler, so differences in the
figures are the models' differences. Writes into ``<out>/``: scatter.png,
reconstructions.png, interpolation.png, samples.png, summary.csv, summary.md and a
TensorBoard event file with the same figures.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ae_lightning import runfolder
from ae_lightning.callbacks import save_png
from ae_lightning.data import MNISTDataModule, to_unit_float
from ae_lightning.errors import UserError
from ae_lightning.latent import (
    CodeSampler,
    check_sampler,
    crossfade,
    decode_codes,
    encode_images,
    fit_projection,
    interpolate,
    pick_pair,
)
from ae_lightning.models.ae import Autoencoder
from ae_lightning.plots import (
    interpolation_figure,
    reconstructions_figure,
    render_rgb,
    samples_figure,
    scatter_figure,
)
from ae_lightning.tb import COMPARISON_GROUP, monospace_table

log = logging.getLogger(__name__)
# What each run is (read from its metrics.json), then how it did; test/nelbo for VAEs only.
DESCRIPTION_COLUMNS = ["family", "dataset", "recipe"]
METRIC_COLUMNS = [
    "num_parameters", "epochs", "train_time_s", "test/mse", "test/nelbo", "best_val/mse",
    "test/knn_acc", "test/probe_acc",
    "test/fd_samples", "test/fd_recon", "test/sample_class_entropy", "test/active_units",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "run",
    "status",
    *DESCRIPTION_COLUMNS,
    "overrides",
    *METRIC_COLUMNS,
    "error",
    "path",
]


@dataclass
class Run:
    """One run folder as the comparison sees it."""

    path: Path
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    error: str = ""
    label: str = ""
    status: str = ""  # "interrupted" or "failed" from the folder's own files

    @property
    def ok(self) -> bool:
        return self.checkpoint is not None and not self.error


def is_run(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file()


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders among ``paths``: each one itself, or a sweep's job folders in job order."""
    runs = []
    for path in paths:
        if is_run(path):
            runs.append(path)
            continue
        jobs = [p for p in path.iterdir() if p.is_dir() and is_run(p)] if path.is_dir() else []
        runs.extend(sorted(jobs, key=lambda p: (_job_number(p), p.name)))
    if not runs:
        shown = ", ".join(str(p) for p in paths)
        raise UserError(
            f"No run folders (with .hydra/config.yaml) in {shown}: pass run folders from "
            "logs/runs/ or a sweep folder from logs/multiruns/."
        )
    return runs


def _job_number(path: Path) -> int:
    """The job's number in its sweep (folders are named by what varies, not by number)."""
    try:
        saved = yaml.safe_load((path / ".hydra" / "hydra.yaml").read_text())  # data, not code
        return int(saved["hydra"]["job"]["num"])
    except Exception:  # a hand-made or older run folder: after the numbered ones
        head = path.name.split("_", 1)[0]
        return int(head) if head.isdigit() else 1 << 30


def load_run(path: Path) -> Run:
    """Overrides, metrics and best checkpoint of a run, read as data; problems become ``error``.

    A run folder whose saved config asks to build code is refused (``UserError``).
    """
    run = Run(path)
    runfolder.data_settings(path)  # refuses a data section that names code to build
    overrides_file = path / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        try:
            overrides = yaml.safe_load(overrides_file.read_text()) or []
        except yaml.YAMLError:
            overrides = []
        run.overrides = [str(o) for o in overrides] if isinstance(overrides, list) else []
    run.metrics = runfolder.metrics(path)
    run.status, run.error = runfolder.status(path)
    run.checkpoint = runfolder.choose_checkpoint(path)
    if run.checkpoint is None:
        run.error = run.error or "no checkpoint (the run did not finish an epoch)"
    return run


IGNORED_IN_LABELS = ("data.root", "data.download", "trainer.accelerator", "resume", "ckpt_path")


def label_runs(runs: list[Run]) -> None:
    """Name each run by the overrides that differ between the runs (its folder otherwise)."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    for run in runs:
        distinct = [
            o for o in run.overrides if o not in common and not o.startswith(IGNORED_IN_LABELS)
        ]
        run.label = " ".join(distinct) or run.path.name


def _data_for(run: Run, data_root: str | None) -> MNISTDataModule:
    datamodule = runfolder.data_module(run.path, data_root)
    datamodule.setup()
    return datamodule


def _figures(
    models: list[tuple[Run, Autoencoder]], datamodule: MNISTDataModule, sampler: str, seed: int
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
    figures["scatter"] = scatter_figure(
        torch.stack(panels), test_labels,
        f"{datamodule.display_name} test codes coloured by "
        + ("digit" if datamodule.dataset == "mnist" else "class"),
        axis_labels, ax_titles=titles, class_names=datamodule.class_names,
    )  # fmt: skip

    originals, _ = datamodule.probe_images(64)
    with torch.no_grad():
        reconstructions = [model(originals) for _, model in models]
    headers = [
        f"{_wrap(name, 28)}\nMSE {float(((r - originals) ** 2).mean()):.4f}"
        for name, r in zip(names, reconstructions, strict=True)
    ]
    figures["reconstructions"] = reconstructions_figure(
        originals, reconstructions, "First 64 test images and each model's reconstructions",
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
    figures["interpolation"] = interpolation_figure(
        rows,
        [_wrap(_short(name)) for name in names] + ["pixel\ncross-fade"],
        f"Interpolation between test #{first} (a {classes[int(test_labels[first])]}) and "
        f"#{second} (a {classes[int(test_labels[second])]})",
    )

    samples = []
    for _, model in models:
        code_sampler = CodeSampler(sampler, encode_images(model.encode, train_images), seed=seed)
        samples.append(decode_codes(model.decode, code_sampler.sample(64)))
    figures["samples"] = samples_figure(
        samples, f"Decoded samples: {code_sampler.description}", names=names
    )
    return figures


def _short(label: str) -> str:
    """``model=hidden1024 bottleneck=10`` -> ``hidden1024 z=10``, for narrow row labels."""
    return label.replace("model=", "").replace("bottleneck=", "z=")


def _wrap(text: str, width: int = 14) -> str:
    words, lines = text.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + len(word) + 1 > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return "\n".join(lines)


def summary_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run, finished runs by test MSE, failed ones after them."""
    rows = []
    for run in runs:
        row = {
            "run": run.label,
            "status": "ok" if run.ok and "test/mse" in run.metrics else run.status or "failed",
            "overrides": " ".join(run.overrides),
            "error": run.error,
            "path": str(run.path),
        }
        for key in DESCRIPTION_COLUMNS + METRIC_COLUMNS:
            row[key] = run.metrics.get(key, "")
        rows.append(row)
    return sorted(rows, key=lambda r: (r["status"] != "ok", r["test/mse"] or float("inf")))


def write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in SUMMARY_COLUMNS if c not in ("overrides", "path")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = []
        for column in shown:
            value = row[column]
            if isinstance(value, float):
                value = f"{value:.4f}" if column.startswith(("test/", "best_")) else f"{value:.1f}"
            cells.append(str(value).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def compare(
    paths: list[Path | str],
    out: Path | str | None = None,
    data_root: str | None = None,
    sampler: str = "gaussian",
    seed: int = 0,
) -> Path:
    """Compare runs (or sweeps); return the folder the figures and tables were written to."""
    try:
        check_sampler(sampler)  # before any work: a typo costs nothing
    except ValueError as err:
        raise UserError(f"--sampler {sampler}: {err}") from None
    paths = [Path(p) for p in paths]
    runs = [load_run(p) for p in find_runs(paths)]
    label_runs(runs)
    if out is None:
        out = (paths[0] if not is_run(paths[0]) else paths[0].parent) / "comparison"
    out = Path(out)
    _check_writable(out)

    models = []
    for run in runs:
        if not run.ok:
            continue
        try:
            model = runfolder.load_autoencoder(run.checkpoint)
        except runfolder.UnsafeCheckpointError:
            raise  # a file that tries to run code stops the comparison
        except UserError:  # a corrupt or foreign checkpoint: a failed row, not a crash
            run.error = f"cannot load {run.checkpoint.name}: not a readable checkpoint"
            continue
        models.append((run, model))
    write_summary(summary_rows(runs), out)
    if not models:
        log.warning("No run has a loadable checkpoint: only the summary was written.")
        return out
    datamodule = _data_for(models[0][0], data_root)
    figures = _figures(models, datamodule, sampler, seed)

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out)) as writer:  # the TensorBoard run `comparison`
        for name, fig in figures.items():
            rgb = render_rgb(fig)
            save_png(rgb, out / f"{name}.png")
            writer.add_image(f"{COMPARISON_GROUP}/{name}", rgb, 0, dataformats="HWC")
        # `comparison/` sorts before the jobs' `run/` cards in the Text tab.
        writer.add_text("comparison/summary", monospace_table((out / "summary.md").read_text()), 0)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ae-compare", description="Compare autoencoder runs side by side."
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders and/or sweep folders")
    parser.add_argument("--out", type=Path, default=None, help="default: <sweep>/comparison")
    parser.add_argument("--data-root", default=None, help="MNIST root (default: the runs')")
    parser.add_argument("--sampler", default="gaussian", help="gaussian, normal, gmm or box")
    parser.add_argument("--seed", type=int, default=0, help="the interpolation pair and samples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = compare(args.runs, args.out, args.data_root, args.sampler, args.seed)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"comparison written to {out}")
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
