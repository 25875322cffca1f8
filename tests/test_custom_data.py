"""data=npz and data=image_folder: the user's own images, their shape flowing from the data.

Each dataset trains through ``python train.py`` as a user runs it, draws every figure, exports
and reloads through ``load_run``; bad npz files are refused in one sentence, exit 2.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ae_lightning import data
from ae_lightning.api import load_run
from ae_lightning.data import ImageFolderDataModule, image_folder_files
from ae_lightning.errors import UserError
from conftest import PROJECT, run_train_cli

FIGURES = {"curves", "interpolation", "manifold", "reconstructions", "samples", "scatter"}
SMALL = [
    "data.val_size=24",
    "data.test_size=24",
    "data.batch_size=24",
    "data.eval_batch_size=48",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=1",
    "engine.threads=1",
    "logger=csv",
]


def grey_images(n: int = 144, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four 16x16 bar patterns, one per class, at random brightness."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    yy, xx = np.mgrid[0:16, 0:16]
    patterns = [(np.abs(xx - 3 - 3 * c) < 2) | (np.abs(yy - 3 - 3 * c) < 2) for c in range(4)]
    images = np.stack([patterns[c] for c in labels]) * rng.uniform(0.6, 1.0, (n, 1, 1))
    return (images * 255).astype(np.uint8), labels


def only_run(logs: Path) -> Path:
    (run,) = (logs / "runs").iterdir()
    return run


def train_cli(args: list[str], logs: Path) -> Path:
    result = run_train_cli([*args, *SMALL], logs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return only_run(logs)


def export(run: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "ae_lightning.cli.export", str(run), "--format", "torchscript"],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run / "export" / "model.json").read_text())


def png_shape(path: Path) -> tuple[int, ...]:
    with Image.open(path) as image:
        return np.asarray(image).shape


def is_grey(path: Path) -> bool:
    """Every pixel of the figure has R = G = B (matplotlib writes grey images as RGB)."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("npz_grey")
    images, labels = grey_images()
    np.savez(folder / "bars.npz", images=images, labels=labels)
    return train_cli(
        ["data=npz", f"data.path={folder / 'bars.npz'}", "model=hidden1024", "model.hidden=[32]"],
        folder / "logs",
    )


def test_grey_npz_trains_draws_exports_and_reloads_at_its_shape(grey_run):
    assert {p.stem for p in (grey_run / "figures").glob("*.png")} == FIGURES
    metrics = json.loads((grey_run / "metrics.json").read_text())
    assert {"test/knn_acc", "test/probe_acc", "test/mse_class3"} <= set(metrics)
    manifest = export(grey_run)
    assert manifest["encoder"]["input"]["shape"] == ["N", 1, 16, 16]
    assert manifest["decoder"]["output"]["shape"] == ["N", 1, 16, 16]

    run = load_run(grey_run, device="cpu")
    assert run.image_shape == (1, 16, 16)
    images, _ = grey_images(5, seed=1)
    for given in (images, images[:, None], images.reshape(5, 256)):  # (N,H,W), (N,C,H,W), flat
        assert tuple(run.encode(given).shape) == (5, 2)
    assert tuple(run.reconstruct(images).shape) == (5, 1, 16, 16)
    assert tuple(run.decode(torch.zeros(3, 2)).shape) == (3, 1, 16, 16)
    with pytest.raises(UserError, match=r"pass \(N, 16, 16\), \(N, 1, 16, 16\) or \(N, 256\)"):
        run.encode(np.zeros((2, 28, 28), np.uint8))


def test_numbered_classes_of_ones_own_data_are_classes_not_digits(tmp_path):
    """Labels 0-9 in an .npz say nothing about digits: the scatter's legend says "class"."""
    from ae_lightning.data import NpzDataModule
    from ae_lightning.plots import scatter_figure

    images, _ = grey_images(n=100)
    np.savez(tmp_path / "x.npz", images=images, labels=np.arange(100) % 10)
    data = NpzDataModule(path=str(tmp_path / "x.npz"), test_size=20, val_size=20)
    assert data.class_names == tuple(str(c) for c in range(10))
    labels = torch.arange(30) % 10
    fig = scatter_figure(torch.randn(30, 2), labels, "codes", class_names=data.class_names,
                         label_word=data.label_word)  # fmt: skip
    assert fig.legends[0].get_title().get_text() == "class"


def test_label_free_npz_skips_the_label_metrics_and_says_so(tmp_path):
    images, _ = grey_images()
    np.savez(tmp_path / "bars.npz", images=images)
    result = run_train_cli(
        ["data=npz", f"data.path={tmp_path / 'bars.npz'}", "callbacks=minimal", *SMALL],
        tmp_path / "logs",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    said = (result.stdout + result.stderr).count("The data has no labels")
    assert said == 1
    metrics = json.loads((only_run(tmp_path / "logs") / "metrics.json").read_text())
    assert "test/mse" in metrics
    assert not [k for k in metrics if "knn" in k or "probe" in k or k.startswith("test/mse_")]


def test_given_test_split_is_the_test_set(tmp_path):
    images, labels = grey_images()
    test_images, test_labels = grey_images(30, seed=3)
    path = tmp_path / "split.npz"
    np.savez(path, images=images, labels=labels, test_images=test_images, test_labels=test_labels)
    run_dir = train_cli(["data=npz", f"data.path={path}", "callbacks=none"], tmp_path / "logs")
    test, _ = load_run(run_dir, device="cpu", data_root=tmp_path).test_images()
    assert torch.equal(test, torch.from_numpy(test_images)[:, None])


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 20 RGB PNGs at 20x24, each class its own colour."""
    root = tmp_path_factory.mktemp("image_folder")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["apple", "leaf", "sky"]):
        (root / "pictures" / name).mkdir(parents=True)
        for i in range(20):
            pixels = np.zeros((20, 24, 3), np.uint8)
            pixels[..., c] = rng.integers(140, 255)
            pixels[5:15, 6:18, (c + 1) % 3] = 220
            Image.fromarray(pixels).save(root / "pictures" / name / f"{i}.png")
    overrides = [
        "data=image_folder", f"data.path={root / 'pictures'}", "data.image_size=[16,16]",
        "data.channels=3", "data.val_size=12", "data.test_size=12", "data.batch_size=12",
    ]  # fmt: skip
    result = run_train_cli([*SMALL, *overrides], root / "logs")
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run(root / "logs")


def test_image_folder_trains_in_colour_exports_and_reloads(folder_run):
    assert {p.stem for p in (folder_run / "figures").glob("*.png")} == FIGURES
    reconstructions = folder_run / "figures" / "reconstructions.png"
    assert png_shape(reconstructions)[-1] in (3, 4) and not is_grey(reconstructions)
    metrics = json.loads((folder_run / "metrics.json").read_text())
    assert {"test/mse_apple", "test/mse_leaf", "test/mse_sky"} <= set(metrics)
    assert export(folder_run)["encoder"]["input"]["shape"] == ["N", 3, 16, 16]
    run = load_run(folder_run, device="cpu")
    codes = run.encode(torch.rand(4, 3, 16, 16))
    assert tuple(codes.shape) == (4, 2)
    assert tuple(run.decode(codes).shape) == (4, 3, 16, 16)


def test_a_sweep_on_ones_own_npz_ends_with_its_comparison(tmp_path):
    """The sweep's summary finds the npz where the sweep itself read it (the jobs' saved
    data.path is never followed on its own), so its figures are drawn, not just logged."""
    images, labels = grey_images()
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "bars.npz", images=images, labels=labels)
    result = run_train_cli(
        ["-m", "data=npz", f"data.path={data / 'bars.npz'}", "bottleneck=2,3",
         "callbacks=minimal", *SMALL],
        tmp_path / "logs",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    assert "The sweep summary failed" not in result.stderr
    assert {"reconstructions.png", "samples.png"} <= {
        p.name for p in (sweep / "comparison").iterdir()
    }
    assert png_shape(sweep / "comparison" / "reconstructions.png")


def test_compare_reads_runs_of_these_datasets(grey_run, tmp_path):
    from ae_lightning.cli.compare import main as compare_main

    data = grey_run.parents[2]  # where the user keeps bars.npz: named here, not by the run
    compare_main(
        [str(grey_run), str(grey_run), "--out", str(tmp_path / "cmp"), "--data-root", str(data)]
    )
    assert {"scatter.png", "reconstructions.png", "summary.md"} <= {
        p.name for p in (tmp_path / "cmp").iterdir()
    }


def object_npz(path: Path) -> None:
    np.savez(path, images=np.array([np.zeros(3), "x"], dtype=object), allow_pickle=True)


def promising_npz(path: Path) -> None:
    """An images.npy whose header promises 9 GB over a few bytes: refused before any read."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (100_000, 300, 300)}
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(100))


def labelled_npz(labels: np.ndarray, key: str = "labels") -> Callable[[Path], None]:
    """Good bar images with ``labels`` saved as ``key`` (``labels`` or ``test_labels``)."""

    def write(path: Path) -> None:
        images, good = grey_images(len(labels) if key == "labels" else 144)
        arrays = {"images": images, "labels": good}
        if key == "test_labels":
            arrays |= {"test_images": images[: len(labels)], "test_labels": labels}
        else:
            arrays[key] = labels
        np.savez(path, **arrays)

    return write


HUGE = np.zeros(144, np.int64)
HUGE[7] = 10**12  # one stray label: trained on, then range(10**12 + 1) class names
WRAPS = np.zeros(48, np.uint64)
WRAPS[0] = 2**64 - 1  # -1 once cast to int64


@pytest.mark.parametrize(
    ("write", "said"),
    [
        (lambda p: np.savez(p, images=np.zeros((50, 8, 8), np.float32)), "not uint8"),
        (lambda p: np.savez(p, images=np.zeros((50, 64), np.uint8)), "not (N, H, W)"),
        (object_npz, "array of Python objects"),
        (promising_npz, "more than the"),
        (labelled_npz(HUGE), "the label 1000000000000 in 'labels', not a class number"),
        (labelled_npz(WRAPS, "test_labels"), f"the label {2**64 - 1} in 'test_labels'"),
        (labelled_npz(-HUGE), "the label -1000000000000 in 'labels'"),
    ],
    ids=["dtype", "ndim", "pickled", "too_large", "huge_label", "uint64_label", "negative"],
)
def test_bad_npz_is_refused_in_one_sentence(tmp_path, write, said):
    path = tmp_path / "bad.npz"
    write(path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run_train_cli(["data=npz", f"data.path={path}", *SMALL], tmp_path / "logs")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and said in errors[0] and str(path) in errors[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a run refused with exit 2 and no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


def test_sizes_are_checked_against_the_images_of_the_file(tmp_path):
    images, labels = grey_images(60)
    path = tmp_path / "few.npz"
    np.savez(path, images=images, labels=labels)
    args = ["data=npz", f"data.path={path}", *SMALL]
    line = refusal(run_train_cli([*args, "data.batch_size=50"], tmp_path / "logs"))
    assert "data.batch_size=50" in line and "36 training images" in line and str(path) in line
    line = refusal(run_train_cli([*args, "data.test_size=60"], tmp_path / "logs"))
    assert "data.test_size=60" in line and "60 images" in line


def test_image_folder_without_class_folders_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    args = ["data=image_folder", f"data.path={tmp_path / 'empty'}", *SMALL]
    line = refusal(run_train_cli(args, tmp_path / "logs"))
    assert f"data.path={tmp_path / 'empty'}" in line and "<class name>" in line
    line = refusal(run_train_cli([*args, "data.channels=2"], tmp_path / "logs"))
    assert "data.channels=2" in line


def test_evaluating_on_data_of_another_shape_is_refused(grey_run, tiny_root, tmp_path):
    checkpoint = grey_run / "checkpoints" / "best.ckpt"
    args = [f"ckpt_path={checkpoint}", f"data.root={tiny_root}", "data.download=false",
            "trainer.accelerator=cpu", "engine.threads=1"]  # fmt: skip
    line = refusal(run_train_cli(args, tmp_path / "logs", script="eval.py"))
    assert "(1, 16, 16)" in line and "(1, 28, 28)" in line and str(checkpoint) in line


def test_interpolation_pair_beyond_this_test_set_is_refused_before_training(tmp_path):
    images, labels = grey_images()
    np.savez(tmp_path / "bars.npz", images=images, labels=labels)
    args = ["data=npz", f"data.path={tmp_path / 'bars.npz'}", *SMALL,
            "callbacks.interpolation.pair=[0,30]"]  # fmt: skip
    line = refusal(run_train_cli(args, tmp_path / "logs"))
    assert "callbacks.interpolation.pair=[0, 30]" in line and "from 0 to 23" in line
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def small_folder(root: Path, files: list[str]) -> Path:
    """8x8 PNGs at ``root/<file>`` (one folder per class), each of its own grey level."""
    for index, file in enumerate(files):
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        pixels = np.full((8, 8, 3), index * 4 % 256, np.uint8)
        Image.fromarray(pixels).save(root / file, format="PNG")
    return root


def folder_refusal(path: Path) -> str:
    """The sentence reading ``path`` as data=image_folder raises (``UserError``)."""
    with pytest.raises(UserError) as err:
        ImageFolderDataModule(path=str(path), image_size=[8, 8]).arrays()
    assert "\n" not in str(err.value) and str(err.value).endswith(".")
    return str(err.value)


def test_image_folder_lists_its_images_in_torchvisions_order(tmp_path):
    """The same samples in the same order as torchvision's ImageFolder: splits stay as they
    were before our own walk replaced its."""
    from torchvision.datasets import ImageFolder

    files = ["b/x/1.png", "b/2.PNG", "b/a.jpg", "a/z/y/3.png", "a/0.png", "b/x-y/5.png"]
    root = small_folder(tmp_path / "pictures", [*files, "b/x.y/6.png", "c/7.bmp"])
    (root / "b" / "notes.txt").write_text("not an image")
    classes, samples = image_folder_files(str(root))
    reference = ImageFolder(str(root))
    assert list(classes) == reference.classes and samples == reference.samples


def test_a_link_loop_in_an_image_folder_is_one_sentence_not_a_hang(tmp_path):
    """The reviewer's folder: two links from a class folder to itself, which torchvision's
    walk (followlinks=True) descends forever, doubling at each level."""
    root = small_folder(tmp_path / "pictures", [f"{c}/{i}.png" for c in "ab" for i in range(30)])
    (root / "a" / "loop").symlink_to(".")
    (root / "a" / "again").symlink_to(".")
    args = ["data=image_folder", f"data.path={root}", "data.image_size=[8,8]", *SMALL]
    line = refusal(run_train_cli(args, tmp_path / "logs", timeout=120))
    assert f"{root / 'a'}/" in line and "a link to the folder" in line and "not followed" in line
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def test_links_out_of_an_image_folder_and_non_files_are_refused(tmp_path):
    secret = tmp_path / "elsewhere" / "private.png"
    small_folder(secret.parent, [secret.name])
    root = small_folder(tmp_path / "pictures", ["a/0.png", "b/0.png"])
    (root / "a" / "1.png").symlink_to(secret)
    assert f"{root / 'a' / '1.png'}, a link to {secret} outside it" in folder_refusal(root)
    (root / "a" / "1.png").unlink()
    (root / "a" / "1.png").symlink_to(root / "b" / "0.png")  # a link inside is read
    assert len(ImageFolderDataModule(path=str(root), image_size=[8, 8]).arrays()["images"]) == 3
    os.mkfifo(root / "b" / "1.png")  # opening it would block until a writer comes
    assert f"{root / 'b' / '1.png'}, which is not a regular file" in folder_refusal(root)


def test_an_image_folder_walk_is_bounded_in_files_and_depth(tmp_path, monkeypatch):
    """``data.path=/`` or a machine-made tree: the walk stops with one sentence."""
    root = small_folder(tmp_path / "pictures", ["a/0.png", "a/1/2/3/4/5.png", "b/0.png"])
    monkeypatch.setattr(data, "MAX_FOLDER_DEPTH", 4)
    assert "more than 4 levels deep" in folder_refusal(root)
    monkeypatch.setattr(data, "MAX_FOLDER_DEPTH", 32)
    for index in range(20):
        (root / "b" / f"{index}.txt").write_text("")
    monkeypatch.setattr(data, "MAX_FOLDER_ENTRIES", 20)
    assert "more than 20 files and folders" in folder_refusal(root)
