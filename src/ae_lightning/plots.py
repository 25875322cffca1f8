"""Figures: tensors in, ``matplotlib.figure.Figure`` out. No file or logger I/O, no pyplot.

Images are pixels in [0, 1] drawn white on black on a fixed grey scale (vmin 0, vmax 1),
so brightness means the same in every figure. The caller closes (drops) the figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # matplotlib is imported by the first figure, not by a run without any
    from matplotlib.figure import Figure

DIGIT_COLOURS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]  # fmt: skip  (matplotlib's tab10: ten distinct hues, one per digit)
PAD_VALUE = 0.35  # grey gutters between tiles: visible against black and white alike
# Panels per row of a side-by-side figure: a comparison of many runs wraps into rows, so
# each panel keeps its size when TensorBoard shrinks the figure to a card's width.
MAX_COLUMNS = 4


def grid_shape(panels: int, max_columns: int = MAX_COLUMNS) -> tuple[int, int]:
    """``(rows, columns)`` for ``panels`` side by side, at most ``max_columns`` a row.

    The rows are as even as the count allows (five panels are 3 + 2, four at three a row
    are 2 + 2), so no row ends in one panel beside an empty stretch.
    """
    rows = max(1, -(-panels // max(1, max_columns)))
    return rows, max(1, -(-panels // rows))


def _panel_axes(fig: Figure, panels: int, max_columns: int = MAX_COLUMNS) -> list:
    """``panels`` axes in reading order on a grid; the grid's spare cells are hidden."""
    rows, columns = grid_shape(panels, max_columns)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return list(axes[:panels])


def tile(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """``(N, C, H, W)`` pixels -> one array, tiles in reading order: ``(rows*H, nrow*W)`` for
    grey images (C=1), ``(rows*H, nrow*W, 3)`` for colour ones (C=3)."""
    from torchvision.utils import make_grid

    grid = make_grid(
        images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=PAD_VALUE
    )  # make_grid repeats a grey channel three times
    return grid[0].numpy() if images.shape[1] == 1 else grid.permute(1, 2, 0).numpy()


def _show(ax, array: np.ndarray, title: str | None = None, **kwargs) -> None:
    # (the colour map applies to grey arrays only; colour ones are shown as they are)
    ax.imshow(array, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)


SCATTER_COLUMNS = 3  # scatter panels are larger than image grids: fewer a row


def scatter_figure(
    points: torch.Tensor,
    labels: torch.Tensor | None,
    title: str,
    axis_labels: Sequence[str] | Sequence[Sequence[str]] = ("z[0]", "z[1]"),
    ax_titles: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    label_word: str | None = None,
) -> Figure:
    """2-D codes coloured by class, with a legend of the classes and equal axes.

    ``points`` is ``(N, 2)`` or, for several panels side by side, ``(P, N, 2)``;
    ``class_names`` name the labels 0, 1, ... in the legend (the digits 0-9 by default), and
    ``label_word`` titles it (the data module's ``digit`` or ``class``; by default ``digit``
    for the default names, else ``class``).
    ``axis_labels`` one (x, y) pair for all panels or one pair per panel. ``labels`` None
    (label-free data): one colour, no legend.
    """
    from matplotlib.figure import Figure

    names = [str(d) for d in range(10)] if class_names is None else list(class_names)
    panels = points.unsqueeze(0) if points.dim() == 2 else points
    if isinstance(axis_labels[0], str):
        axis_labels = [axis_labels] * len(panels)
    rows, columns = grid_shape(len(panels), SCATTER_COLUMNS)
    fig = Figure(figsize=(5.6 * columns + 1.2, 5.6 * rows), layout="constrained")
    axes = _panel_axes(fig, len(panels), SCATTER_COLUMNS)
    labelled = labels is not None
    labels = labels.cpu().numpy() if labelled else np.zeros(panels.shape[1], dtype=np.int64)
    marker_size = 2.0 if len(labels) > 2000 else 8.0
    for i, (ax, xy) in enumerate(zip(axes, panels, strict=True)):
        xy = xy.detach().cpu().numpy()
        for digit in range(len(names) if labelled else 1):
            mask = labels == digit
            ax.scatter(
                xy[mask, 0], xy[mask, 1], s=marker_size, alpha=0.5,
                color=DIGIT_COLOURS[digit % len(DIGIT_COLOURS)],
                linewidths=0, rasterized=True, label=names[digit] if labelled else None,
            )  # fmt: skip
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel(axis_labels[i][0])
        ax.set_ylabel(axis_labels[i][1])
        ax.grid(alpha=0.25)
        if ax_titles is not None:
            ax.set_title(ax_titles[i], fontsize=10)
    if labelled:
        handles, shown = axes[-1].get_legend_handles_labels()
        fig.legend(
            handles, shown, title=label_word or ("digit" if class_names is None else "class"),
            loc="outside right center", frameon=False, markerscale=12 / marker_size**0.5,
        )  # fmt: skip
        for handle in fig.legends[0].legend_handles:
            handle.set_alpha(1.0)
    fig.suptitle(title, fontsize=11)
    # Equal axes widen the data limits at the first draw, and with them the tick labels
    # (`-7.5` -> `-10.0`); a layout pass after that makes room for them and the axis label.
    fig.draw_without_rendering()
    return fig


def reconstructions_figure(
    originals: torch.Tensor,
    reconstructions: torch.Tensor | Sequence[torch.Tensor],
    title: str,
    names: Sequence[str] = ("reconstructions",),
    nrow: int = 8,
) -> Figure:
    """Originals as an 8x8 grid, then each model's reconstructions of them beside it."""
    from matplotlib.figure import Figure

    if isinstance(reconstructions, torch.Tensor):
        reconstructions = [reconstructions]
    grids = [originals, *reconstructions]
    rows, columns = grid_shape(len(grids))
    fig = Figure(figsize=(max(3.6 * columns, 6.4), 4.2 * rows), layout="constrained")
    axes = _panel_axes(fig, len(grids))
    for ax, images, name in zip(axes, grids, ["test images", *names], strict=True):
        _show(ax, tile(images, nrow), name)
    fig.suptitle(title, fontsize=11)
    return fig


def interpolation_figure(
    rows: Sequence[torch.Tensor], row_names: Sequence[str], title: str
) -> Figure:
    """One row of images per interpolation (latent rows first, the pixel cross-fade last)."""
    from matplotlib.figure import Figure

    steps = len(rows[0])
    fig = Figure(figsize=(0.85 * steps + 1.6, 1.0 * len(rows) + 0.7), layout="constrained")
    # A label column of its own: the layout engine sizes it, so long names are never cut.
    grid = fig.subplots(len(rows), 2, squeeze=False, width_ratios=[1.4, 0.85 * steps])
    for (label_ax, ax), images, name in zip(grid, rows, row_names, strict=True):
        label_ax.axis("off")
        label_ax.text(1.0, 0.5, name, ha="right", va="center", fontsize=9,
                      transform=label_ax.transAxes)  # fmt: skip
        _show(ax, tile(images, nrow=steps))
    axes = grid[:, 1]
    axes[-1].set_xlabel("start  →  end  (interpolation weight 0 … 1)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def samples_figure(
    samples: torch.Tensor | Sequence[torch.Tensor], title: str, names: Sequence[str] = ("",)
) -> Figure:
    """Decoded random codes: one 8x8 grid per model."""
    from matplotlib.figure import Figure

    if isinstance(samples, torch.Tensor):
        samples = [samples]
    rows, columns = grid_shape(len(samples))
    fig = Figure(figsize=(max(3.6 * columns, 5.6), 4.2 * rows + 0.4), layout="constrained")
    axes = _panel_axes(fig, len(samples))
    for ax, images, name in zip(axes, samples, names, strict=True):
        _show(ax, tile(images, 8), name or None)
    fig.suptitle(title, fontsize=11)
    return fig


def manifold_figure(images: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, title: str) -> Figure:
    """Decoded ``n x n`` grid of 2-D codes as one image, axes in code coordinates.

    ``images`` is in the row order of :func:`ae_lightning.latent.manifold_grid` (top row =
    highest y). The image spans the codes (each tile centred on its code), so the ticks
    are round code values where matplotlib puts them, and every tile stays square.
    """
    from matplotlib.figure import Figure

    n = len(xs)
    canvas = tile(images, nrow=n, padding=0)
    fig = Figure(figsize=(7.4, 7.4), layout="constrained")
    ax = fig.subplots()
    x_lo, x_hi, y_lo, y_hi = (float(v) for v in (xs[0], xs[-1], ys[-1], ys[0]))
    dx = (x_hi - x_lo) / (n - 1) if n > 1 and x_hi > x_lo else 1.0
    dy = (y_hi - y_lo) / (n - 1) if n > 1 and y_hi > y_lo else 1.0
    extent = (x_lo - dx / 2, x_hi + dx / 2, y_lo - dy / 2, y_hi + dy / 2)
    ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", extent=extent)
    ax.set_aspect(dx / dy)  # one tile as tall as it is wide, whatever the two ranges
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    fig.suptitle(title, fontsize=11)
    return fig


def curves_figure(history: Sequence[dict[str, float]], title: str) -> Figure | None:
    """Training curves from ``metrics.json``'s history: every train/val term per epoch, the
    learning rate and the epoch time, each on its own panel (None with no epoch yet).

    Terms share a panel when they share a name after the stage (``train/mse`` with
    ``val/mse``); a term that falls by more than a factor of 10 gets a log scale.
    """
    if not history:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    names = {key.split("/", 1)[1] for row in history for key in row if "/" in key}
    first = [name for name in ("mse", "loss") if name in names]  # what every model reports
    terms = first + sorted(names - set(first))
    panels = [(term, [f"train/{term}", f"val/{term}"]) for term in terms]
    panels += [(key, [key]) for key in ("lr", "epoch_s") if any(key in row for row in history)]
    rows, columns = grid_shape(len(panels), 3)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = _panel_axes(fig, len(panels), 3)
    for ax, (name, keys) in zip(axes, panels, strict=True):
        for key, style in zip(keys, ("-o", "--s"), strict=False):
            points = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if key in row]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, style, markersize=3, label=key)
        values = [v for row in history for k, v in row.items() if k in keys]
        if name not in ("lr", "epoch_s") and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")  # a loss falling by orders of magnitude
        elif name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_title({"lr": "learning rate", "epoch_s": "seconds per epoch"}.get(name, name))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def render_rgb(fig: Figure, dpi: int = 100) -> np.ndarray:
    """Rasterise a figure once to an ``(H, W, 3)`` uint8 array (for PNG files and TensorBoard)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def final_metrics_figure(
    run_names: Sequence[str],
    metrics: dict[str, Sequence[float | None]],
    title: str,
    higher_is_better: Sequence[str] = (),
) -> Figure:
    """One horizontal bar chart per final metric, a bar per run, each bar's value written.

    TensorBoard draws a final metric as one point per run, which its outlier clipping can
    hide; bars read at card size. A run without a metric (a failed job, a family without a
    likelihood) gets no bar; ``metrics`` maps a name to one value (or None) per run.
    """
    from matplotlib.figure import Figure

    rows, columns = grid_shape(len(metrics), 3)
    height = 0.45 + 0.28 * len(run_names)
    fig = Figure(figsize=(4.6 * columns + 1.6, (height + 0.6) * rows), layout="constrained")
    axes = _panel_axes(fig, len(metrics), 3)
    places = np.arange(len(run_names))
    for i, (ax, (name, values)) in enumerate(zip(axes, metrics.items(), strict=True)):
        shown = [(p, v) for p, v in zip(places, values, strict=True) if v is not None]
        if shown:
            ys, xs = zip(*shown, strict=True)
            best = max(xs) if name in higher_is_better else min(xs)
            colours = ["#2ca02c" if x == best else "#1f77b4" for x in xs]
            ax.barh(ys, xs, color=colours, height=0.7)
            for y, x in shown:
                ax.text(x, y, f" {x:.4g}", va="center", fontsize=8)
            ax.set_xlim(0, max(xs) * 1.3 if max(xs) > 0 else 1)
        for y, value in zip(places, values, strict=True):
            if value is None:  # said, not left blank: the run has no such number
                ax.text(0, y, " n/a", va="center", fontsize=8, color="0.45", style="italic")
        ax.set_yticks(places, run_names if i % columns == 0 else [""] * len(run_names))
        ax.set_ylim(len(run_names) - 0.5, -0.5)  # every run's row, the first on top
        better = "higher" if name in higher_is_better else "lower"
        ax.set_title(f"{name} ({better} is better)", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return fig
