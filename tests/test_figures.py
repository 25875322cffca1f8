"""The figure callbacks in a real run: PNG files, TensorBoard images, the projector."""

import logging

import matplotlib.image
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ae_lightning.callbacks import observing
from ae_lightning.models.ae import Autoencoder
from ae_lightning.train import train
from conftest import compose_cfg, tiny_overrides

FIGURES = ["scatter", "reconstructions", "interpolation", "samples", "manifold"]


def test_two_dimensional_run_writes_every_figure(tiny_root, tmp_path):
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "trainer.max_epochs=3", "figures.every_n_epochs=1",
         "figures.save_epoch_pngs=true"],
        run_dir=tmp_path,
    )  # fmt: skip
    train(cfg)
    for name in FIGURES:
        png = matplotlib.image.imread(tmp_path / "figures" / f"{name}.png")
        assert png.shape[0] > 200 and png.shape[1] > 200
    epochs = sorted(p.name for p in (tmp_path / "figures" / "epochs").iterdir())
    assert "scatter_epoch001.png" in epochs and "scatter_epoch002.png" in epochs
    assert "scatter_epoch003.png" not in epochs  # the last epoch's figure is the final one

    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    assert {f"views/{name}" for name in FIGURES} <= images
    # Time Series opens on the first tag group by name: the curves, then the figures.
    curves = [t for t in events.Tags()["scalars"] if t.startswith(("train/", "val/"))]
    assert curves and max(curves) < min(images) and min(images) > "versus/scatter"
    steps = [e.step for e in events.Images("views/scatter")]
    assert len(steps) == 3 and steps == sorted(steps)  # epochs 1, 2 and the final one
    assert "train/lr" in events.Tags()["scalars"]  # LearningRateMonitor, in train/
    projector = (tmp_path / "projector_config.pbtxt").read_text()
    assert "test_codes" in projector and "sprite" in projector


def test_higher_dimensional_run_skips_the_manifold_and_projects(tiny_root, tmp_path):
    train(compose_cfg([*tiny_overrides(tiny_root), "bottleneck=5"], run_dir=tmp_path))
    written = {p.stem for p in (tmp_path / "figures").glob("*.png")}
    assert written == set(FIGURES) - {"manifold"} | {"curves"}  # curves: a training run's


def test_without_tensorboard_pngs_are_written_and_one_warning_says_so(tiny_root, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ae_lightning.callbacks"):
        train(compose_cfg([*tiny_overrides(tiny_root), "logger=csv"], run_dir=tmp_path))
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} == {*FIGURES, "curves"}
    warnings = [r for r in caplog.records if "No TensorBoard logger" in r.getMessage()]
    assert len(warnings) == 1


def test_observing_restores_the_training_mode():
    model = Autoencoder(bottleneck=2)
    model.train()
    with observing(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()


def test_a_failed_png_write_warns_and_training_goes_on(tiny_root, tmp_path, caplog):
    (tmp_path / "figures").write_text("a file where the figures folder should be")
    with caplog.at_level(logging.WARNING, logger="ae_lightning.callbacks"):
        metrics = train(compose_cfg([*tiny_overrides(tiny_root)], run_dir=tmp_path))
    assert metrics["test/mse"] > 0
    assert any("Could not write figure" in r.getMessage() for r in caplog.records)
