"""optimizer= and scheduler= recipes: each builds what it says and steps the lr on schedule."""

import csv
import json

import pytest
import torch
from hydra.utils import instantiate
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import CSVLogger

from ae_lightning.errors import UserError
from ae_lightning.train import train
from conftest import compose_cfg, tiny_overrides

# Tiny data: 500 training images in minibatches of 50 -> 10 optimizer steps per epoch.
STEPS_PER_EPOCH = 10


def fit(tiny_root, tmp_path, overrides):
    """Fit the composed model with the real Trainer; return (trainer, lr-monitor CSV rows)."""
    cfg = compose_cfg([*tiny_overrides(tiny_root), *overrides], run_dir=tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    trainer = instantiate(
        cfg.trainer, callbacks=[LearningRateMonitor(logging_interval=None)],
        logger=CSVLogger(tmp_path, name="csv", version=""), enable_progress_bar=False,
        enable_checkpointing=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(model, datamodule=instantiate(cfg.data))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return trainer, rows


def lr_of(trainer) -> float:
    return trainer.optimizers[0].param_groups[0]["lr"]


def logged(rows, name):
    return [float(r[name]) for r in rows if r.get(name)]


def test_sgd_with_a_step_schedule(tiny_root, tmp_path):
    trainer, rows = fit(tiny_root, tmp_path, [
        "optimizer=sgd", "scheduler=step", "model.scheduler.step_size=1", "trainer.max_epochs=2",
    ])  # fmt: skip
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    assert lr_of(trainer) == pytest.approx(0.1 * 0.5**2)  # halved after each of 2 epochs
    assert logged(rows, "lr-SGD")[:2] == pytest.approx([0.1, 0.05])  # one per epoch start


def test_adamw_with_cosine_keeps_the_models_lr(tiny_root, tmp_path):
    trainer, rows = fit(tiny_root, tmp_path, [
        "model=hidden1024", "optimizer=adamw", "scheduler=cosine", "model.scheduler.T_max=4",
        "trainer.max_epochs=2",
    ])  # fmt: skip
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.01
    assert lr_of(trainer) == pytest.approx(1e-3 * 0.5)  # halfway down a cosine over 4 epochs
    assert logged(rows, "lr-AdamW")[0] == pytest.approx(1e-3)


@pytest.mark.parametrize("steps_per_call", [1, 20])
def test_onecycle_steps_after_every_optimizer_step(tiny_root, tmp_path, steps_per_call):
    trainer, rows = fit(tiny_root, tmp_path, [
        "scheduler=onecycle", "trainer.max_epochs=2", f"engine.steps_per_call={steps_per_call}",
    ])  # fmt: skip
    steps = 2 * STEPS_PER_EPOCH
    reference_optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=3e-3)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, 3e-3, total_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        reference.step()
    assert trainer.global_step == steps
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert lr_of(trainer) == pytest.approx(reference_optimizer.param_groups[0]["lr"])
    if steps_per_call == 1:  # Lightning's loop: the monitor logs every step
        assert logged(rows, "lr-Adam") == pytest.approx(expected)


def test_onecycle_spans_the_optimizer_steps_of_an_accumulating_run(tiny_root, tmp_path):
    """Accumulating 2 minibatches a step halves the steps: the cycle must end with the run,
    not stop at half (its lr near the peak, as when its length counted minibatches)."""
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "scheduler=onecycle", "+trainer.accumulate_grad_batches=2",
         "trainer.max_epochs=2", "callbacks=minimal", "logger=none"],
        run_dir=tmp_path,
    )  # fmt: skip
    train(cfg)
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    steps = 2 * STEPS_PER_EPOCH // 2
    reference_optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=3e-3)
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, 3e-3, total_steps=steps)
    lrs = []
    for _ in range(steps):
        reference_optimizer.step()
        reference.step()
        lrs.append(reference_optimizer.param_groups[0]["lr"])
    assert [row["step"] for row in history] == [steps // 2, steps]
    assert [row["lr"] for row in history] == pytest.approx([lrs[steps // 2 - 1], lrs[-1]])


def test_a_one_cycle_shorter_than_the_run_is_refused_before_a_step(tiny_root, tmp_path):
    """torch raises at the first step past total_steps, mid-run; the run says so up front."""
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "scheduler=onecycle", "+model.scheduler.total_steps=5",
         "callbacks=minimal", "logger=none"],
        run_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(UserError) as refused:
        train(cfg)
    assert str(refused.value) == (
        f"model.scheduler.total_steps=5 is shorter than this run's {STEPS_PER_EPOCH} optimizer "
        f"steps, and torch stops a one-cycle at its end: raise it to {STEPS_PER_EPOCH}, or "
        "leave it out to have the run's length filled in."
    )
    assert not (tmp_path / "checkpoints").exists()  # refused before the first step


def test_plateau_watches_val_mse_every_epoch(tiny_root, tmp_path):
    # A relative threshold of 10 means no epoch ever counts as an improvement.
    trainer, _ = fit(tiny_root, tmp_path, [
        "scheduler=plateau", "model.scheduler.patience=0", "+model.scheduler.threshold=10",
        "trainer.max_epochs=2",
    ])  # fmt: skip
    description = trainer.lightning_module.configure_optimizers()["lr_scheduler"]
    assert trainer.lightning_module.scheduler_monitor == "val/mse"
    assert description["interval"] == "epoch"
    assert lr_of(trainer) == pytest.approx(3e-3 / 4)  # halved after each epoch's validation


def test_early_stopping_is_off_by_default_and_stops_on_val_mse(tiny_root, tmp_path):
    assert "early_stopping" not in (compose_cfg().get("callbacks") or {})
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "early_stopping=val", "callbacks.early_stopping.patience=0",
         "callbacks.early_stopping.min_delta=10", "trainer.max_epochs=5", "callbacks=minimal",
         "latent_metrics=false"],
        run_dir=tmp_path,
    )  # fmt: skip
    assert train(cfg)["epochs"] == 2  # the 2nd epoch fails to improve by 10: stop


@pytest.mark.parametrize(
    ("overrides", "key", "offered"),
    [
        (["early_stopping=val", "callbacks.early_stopping.monitor=val/nelbo"],
         "callbacks.early_stopping.monitor=val/nelbo", "val/mse."),
        (["scheduler=plateau", "model.scheduler_monitor=val/los"],
         "model.scheduler_monitor=val/los", "val/mse."),
        # A VAE logs val/loss only when beta != 1: the settings decide, not the family alone.
        (["model=vae", "callbacks.checkpoint.monitor=val/loss"],
         "callbacks.checkpoint.monitor=val/loss", "val/kl, val/mse, val/nelbo, val/recon."),
    ],
)  # fmt: skip
def test_a_monitor_the_model_never_logs_is_refused_before_training(
    tiny_root, tmp_path, overrides, key, offered
):
    # Before: early stopping and the checkpoint ended in Lightning's traceback after an
    # epoch; a plateau scheduler with a misspelt metric never stepped, and nothing said so.
    run = tmp_path / "run"
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), *overrides, "callbacks=minimal", "logger=none"], run_dir=run
    )
    with pytest.raises(UserError) as refused:
        train(cfg)
    assert str(refused.value).startswith(f"{key} is not a metric the ")
    assert str(refused.value).endswith(f"use one of {offered}")
    assert not (run / "checkpoints").exists()  # refused before the Trainer was built


def test_a_checkpoint_on_another_metric_keeps_best_val_mse_an_mse(tiny_root, tmp_path):
    # Before: best_val/mse held the monitored metric's score (a VAE's val/loss, in nats),
    # and sweeps and ae-compare ranked runs by it as if it were the MSE.
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "model=vae", "model.beta=2", "trainer.max_epochs=2",
         "callbacks=minimal", "callbacks.checkpoint.monitor=val/loss", "logger=none",
         "latent_metrics=false"],
        run_dir=tmp_path,
    )  # fmt: skip
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    history = metrics["history"]
    assert metrics["best_val/loss"] == pytest.approx(min(row["val/loss"] for row in history))
    assert metrics["best_val/mse"] == min(row["val/mse"] for row in history)
    assert metrics["best_val/mse"] < 1  # a per-pixel MSE, not the nats of val/loss


def test_a_run_that_max_steps_ends_mid_epoch_validates_its_last_steps(tiny_root, tmp_path):
    # Before: with one step per call, Lightning ended the epoch at step 15 without validating,
    # so the history's last row repeated epoch 1's val/mse and best.ckpt never saw steps 11-15.
    results = {}
    for k in (1, 20):
        cfg = compose_cfg(
            [*tiny_overrides(tiny_root), "trainer.max_epochs=5", "+trainer.max_steps=15",
             f"engine.steps_per_call={k}", "callbacks=minimal", "logger=none",
             "latent_metrics=false"],
            run_dir=tmp_path / f"k{k}",
        )  # fmt: skip
        results[k] = train(cfg)
    history = results[1]["history"]
    assert [row["step"] for row in history] == [10, 15]
    assert history[1]["val/mse"] != history[0]["val/mse"]  # validated after step 15
    validated = {
        k: [(row["step"], row["val/mse"]) for row in r["history"]] for k, r in results.items()
    }
    assert validated[1] == validated[20]  # the same maths whatever the steps per call
    assert results[1]["test/mse"] == results[20]["test/mse"]
