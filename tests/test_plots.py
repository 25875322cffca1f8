"""Each plot function returns a Figure with the expected axes and artists."""

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from ae_lightning.plots import (
    final_metrics_figure,
    grid_shape,
    interpolation_figure,
    manifold_figure,
    reconstructions_figure,
    render_rgb,
    samples_figure,
    scatter_figure,
    tile,
)

IMAGES = torch.rand(64, 1, 28, 28)


def images_on(ax):
    return [a.get_array() for a in ax.get_images()]


def test_scatter_has_ten_digit_groups_a_legend_and_equal_axes():
    points, labels = torch.randn(300, 2), torch.arange(300) % 10
    fig = scatter_figure(points, labels, "title", ("a", "b"))
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = fig.axes[0]
    groups = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(groups) == 10 and sum(len(c.get_offsets()) for c in groups) == 300
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [str(d) for d in range(10)]
    assert ax.get_aspect() == 1.0 and ax.get_xlabel() == "a"
    assert fig.legends[0].get_title().get_text() == "digit"  # the default names: digits
    named = scatter_figure(points, labels, "title", class_names="abcdefghij")
    assert named.legends[0].get_title().get_text() == "class"


def test_scatter_panels_side_by_side():
    fig = scatter_figure(torch.randn(3, 100, 2), torch.arange(100) % 10, "t", ax_titles="xyz")
    assert [ax.get_title() for ax in fig.axes] == ["x", "y", "z"]


def test_reconstructions_are_two_8x8_grids_on_a_fixed_grey_scale():
    fig = reconstructions_figure(IMAGES, IMAGES.flip(0), "t")
    assert [ax.get_title() for ax in fig.axes] == ["test images", "reconstructions"]
    for ax in fig.axes:
        (array,) = images_on(ax)
        assert array.shape == (8 * 30 + 2, 8 * 30 + 2)  # 8 tiles of 28 px + 2 px gutters
        assert ax.get_images()[0].get_clim() == (0.0, 1.0)


def test_interpolation_rows_are_labelled():
    rows = [torch.rand(11, 1, 28, 28), torch.rand(11, 1, 28, 28)]
    fig = interpolation_figure(rows, ["latent", "pixels"], "t")
    label_axes, image_axes = fig.axes[0::2], fig.axes[1::2]
    assert [ax.texts[0].get_text() for ax in label_axes] == ["latent", "pixels"]
    assert images_on(image_axes[0])[0].shape[1] == 11 * 30 + 2


def test_samples_grid_and_manifold_axes():
    assert len(samples_figure(IMAGES, "t").axes) == 1
    xs, ys = torch.linspace(-2, 2, 4), torch.linspace(3, -3, 4)
    fig = manifold_figure(torch.rand(16, 1, 28, 28), xs, ys, "t")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "z[0]" and ax.get_ylabel() == "z[1]"
    # the image spans the codes, each tile centred on its code (x: -2, -2/3, 2/3, 2)
    xs_step, ys_step = 4 / 3, 2.0
    assert ax.get_xlim() == pytest.approx((-2 - xs_step / 2, 2 + xs_step / 2))
    assert ax.get_ylim() == pytest.approx((-3 - ys_step / 2, 3 + ys_step / 2))
    assert ax.get_aspect() == pytest.approx(xs_step / ys_step)  # tiles stay square
    fig.canvas.draw()  # ticks are round code values inside the range, not tile indices
    shown = [t for t in ax.get_xticks() if -2.7 <= t <= 2.7]
    assert shown and all(float(t).is_integer() for t in shown)


def test_tiles_keep_pixel_values_and_render_to_rgb():
    white = torch.ones(4, 1, 28, 28)
    grid = tile(white, nrow=2)
    assert grid[2:30, 2:30].min() == 1.0  # a tile is copied untouched
    rgb = render_rgb(reconstructions_figure(white, white, "t"))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


def test_many_panels_wrap_into_rows_that_keep_their_size():
    assert grid_shape(1) == (1, 1) and grid_shape(4) == (1, 4) and grid_shape(7) == (2, 4)
    # Even rows: the reference sweep's four runs and their test images, at four a row, are
    # 3 + 2 (not 4 + 1); four scatter panels at three a row are 2 x 2.
    assert grid_shape(5) == (2, 3) and grid_shape(4, 3) == (2, 2) and grid_shape(10) == (3, 4)
    assert grid_shape(0) == (1, 1)
    one, seven = samples_figure([IMAGES], "t"), samples_figure([IMAGES] * 7, "t", names="abcdefg")
    shown = [ax for ax in seven.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == list("abcdefg")  # reading order, spares hidden
    assert seven.get_figwidth() <= 4 * one.get_figwidth()  # four a row, not seven
    scatter = scatter_figure(torch.randn(5, 50, 2), torch.arange(50) % 10, "t", ax_titles="abcde")
    assert len({round(ax.get_position().y0, 2) for ax in scatter.axes if ax.get_visible()}) == 2


def test_final_metrics_are_bars_per_run_with_the_best_marked_and_gaps_said():
    runs = ["linear,z=2", "hidden1024,z=2", "vae,z=2"]
    fig = final_metrics_figure(
        runs, {"test/mse": [0.05, 0.04, 0.045], "test/nelbo": [None, None, 150.0],
               "test/knn_acc": [0.4, 0.6, 0.65]}, "t", higher_is_better=["test/knn_acc"],
    )  # fmt: skip
    mse, nelbo, knn = fig.axes[:3]
    assert [t.get_text() for t in mse.get_yticklabels()] == runs
    widths = [bar.get_width() for bar in mse.patches]
    assert widths == [0.05, 0.04, 0.045]
    colours = [tuple(bar.get_facecolor()) for bar in mse.patches]
    assert colours[1] != colours[0] == colours[2]  # the lowest MSE stands out
    assert len(nelbo.patches) == 1 and [t.get_text() for t in nelbo.texts].count(" n/a") == 2
    knn_colours = [tuple(bar.get_facecolor()) for bar in knn.patches]
    assert knn_colours[2] != knn_colours[0]  # the highest accuracy stands out
    assert nelbo.get_ylim() == mse.get_ylim()  # every panel has every run's row


def test_scatter_axis_labels_stay_inside_the_figure():
    """Equal axes widen the y ticks at the first draw (`-10.0`): the label must still fit."""
    torch.manual_seed(0)
    points = torch.rand(1000, 2) * torch.tensor([24.0, 10.0]) + torch.tensor([-8.0, -6.0])
    title = "8-D test codes, PCA\nMLP 768-256-8 · 5 epochs (best checkpoint, val/mse 0.0194)"
    axis_labels = ("PC1 (76% var.)", "PC2 (17% var.)")
    fig = scatter_figure(points, torch.arange(1000) % 10, title, axis_labels)
    render_rgb(fig)
    renderer = fig.canvas.get_renderer()
    for label in (fig.axes[0].yaxis.label, *fig.axes[0].get_yticklabels()):
        assert label.get_window_extent(renderer).x0 >= 0, label.get_text()
