"""End-to-end `train(cfg)` on tiny IDX data with the real Trainer and loggers."""

import json
import traceback

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ae_lightning.models.ae import Autoencoder
from ae_lightning.train import train
from conftest import compose_cfg, tiny_overrides


def test_train_writes_the_run_contract_and_returns_metrics(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "model=hidden1024", "bottleneck=3", "trainer.max_epochs=2"],
        run_dir=run_dir,
    )
    metrics = train(cfg)

    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert 0 < metrics["test/mse"] < 0.2 and metrics["epochs"] == 2 and metrics["bottleneck"] == 3
    assert metrics["test_checkpoint"].endswith("best.ckpt")
    assert 0.1 < metrics["test/knn_acc"] <= 1 and 0.1 < metrics["test/probe_acc"] <= 1
    per_digit = [metrics[f"test/mse_digit{d}"] for d in range(10)]
    assert min(per_digit) < metrics["test/mse"] < max(per_digit)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    best = run_dir / "checkpoints" / "best.ckpt"
    restored = Autoencoder.load_from_checkpoint(best, map_location="cpu")
    assert restored.bottleneck == 3 and restored.hparams["hidden"] == [1024]

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/mse", "val/mse", "train/lr", "train/epoch_s"} <= set(scalars)
    val = [e.value for e in events.Scalars("val/mse")]
    assert len(val) == 2 and val[-1] < val[0]  # it learned something
    # Final metrics: once each, at the run's last step (never also at step 0), in the group
    # that sorts after the curves and the figures.
    final = ["test/mse", "test/knn_acc", "test/mse_digit3", "val/best_mse", "time/train_s"]
    for tag in final:
        points = events.Scalars(f"zfinal/{tag}")
        assert [e.step for e in points] == [metrics["global_step"]], tag
    # TensorBoard's Time Series expands the first two tag groups by name: train/ and val/.
    groups = sorted({tag.split("/")[0] for tag in scalars + events.Tags()["images"]})
    assert groups[:2] == ["train", "val"], groups


def test_training_is_reproducible_with_a_seed(tiny_root, tmp_path):
    runs = [
        train(
            compose_cfg(
                [*tiny_overrides(tiny_root), "seed=3", "logger=none", "callbacks=none"],
                run_dir=tmp_path / name,
            )
        )
        for name in ("a", "b")
    ]
    assert runs[0]["test/mse"] == runs[1]["test/mse"]


def test_csv_logger_option(tiny_root, tmp_path):
    train(compose_cfg([*tiny_overrides(tiny_root), "logger=csv"], run_dir=tmp_path))
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/mse" in header and "val/mse" in header


def test_runs_on_the_gpu_when_there_is_one(tiny_root, tmp_path):
    if not torch.cuda.is_available():
        import pytest

        pytest.skip("no CUDA device here")
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "trainer.accelerator=gpu", "model=hidden1024",
         "trainer.max_epochs=3", "figures.every_n_epochs=1"],
        run_dir=tmp_path,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["test/mse"] < 0.1  # learned on the GPU (1 epoch on the CPU: ~0.09)
    assert len(list((tmp_path / "figures").glob("*.png"))) == 5  # every figure drawn on CUDA


def test_training_steps_never_wait_for_the_device(tiny_root, tmp_path, monkeypatch):
    """No `.item()` per step: each is a host-device sync that stalls a GPU pipeline."""
    calls = []
    original = torch.Tensor.item

    def counting_item(self):
        # Adam's CPU path reads its own CPU step counter: no device involved, not counted.
        if not any("torch/optim" in frame.filename for frame in traceback.extract_stack()):
            calls.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "data.batch_size=5", "callbacks=none", "logger=none",
         "latent_metrics=false"],
        run_dir=tmp_path,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["global_step"] == 100
    assert len(calls) < 20, f"{len(calls)} .item() calls in 100 steps"


def test_the_dataloader_path_trains_one_minibatch_per_step(tiny_root, tmp_path):
    """``data.loader=dataloader`` (data that does not fit in memory) trains like the default:
    the same minibatches in the same order, so the same model."""
    args = [*tiny_overrides(tiny_root), "callbacks=minimal", "latent_metrics=false",
            "trainer.max_epochs=2"]  # fmt: skip
    metrics = train(compose_cfg([*args, "data.loader=dataloader"], run_dir=tmp_path / "torch"))
    assert metrics["global_step"] == 20  # 500 training images in batches of 50, twice
    assert metrics["epochs"] == 2 and 0 < metrics["test/mse"] < 0.3
    in_memory = train(compose_cfg(args, run_dir=tmp_path / "memory"))
    assert metrics["test/mse"] == pytest.approx(in_memory["test/mse"], rel=1e-6)


def test_logger_none_trains_with_the_default_callbacks(tiny_root, tmp_path):
    """No logger: the learning-rate monitor steps aside; metrics.json and PNGs still come."""
    cfg = compose_cfg([*tiny_overrides(tiny_root), "logger=none"], run_dir=tmp_path)
    metrics = train(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text())["test/mse"] == metrics["test/mse"]
    assert (tmp_path / "figures" / "scatter.png").is_file()
