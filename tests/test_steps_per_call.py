"""steps_per_call=K: K optimizer steps per Lightning step, and the very same training as K=1."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ae_lightning.config import validate_config
from ae_lightning.data import EpochPermutation, InMemoryBatches, MNISTDataModule
from ae_lightning.errors import UserError
from ae_lightning.train import train
from conftest import compose_cfg, tiny_overrides

STEP_LR = [
    "+model.scheduler._target_=torch.optim.lr_scheduler.StepLR",
    "+model.scheduler._partial_=true",
    "+model.scheduler.step_size=1",
    "+model.scheduler.gamma=0.5",
]


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_lists_of_k_minibatches_hold_the_same_minibatches_in_order():
    images = torch.arange(23 * 28 * 28, dtype=torch.int32).to(torch.uint8).reshape(23, 28, 28)
    labels = torch.arange(23)

    def loader(k, drop_last):
        sampler = EpochPermutation(23, seed=0, shuffle=True)
        return InMemoryBatches(images, labels, 5, sampler, drop_last, steps_per_call=k)

    for drop_last, minibatches in ((False, 5), (True, 4)):
        single = list(loader(1, drop_last))
        chunked = list(loader(2, drop_last))
        assert len(single) == minibatches and len(chunked) == len(loader(2, drop_last))
        assert [len(chunk) for chunk in chunked] == [2] * (minibatches // 2) + [1] * (
            minibatches % 2
        )
        flat = [minibatch for chunk in chunked for minibatch in chunk]
        assert all(torch.equal(a[1], b[1]) for a, b in zip(single, flat, strict=True))


def test_a_list_batch_becomes_unit_floats(tiny_root):
    dm = MNISTDataModule(root=str(tiny_root), val_size=100, batch_size=64, steps_per_call=3,
                         download=False)  # fmt: skip
    dm.setup()
    chunk = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert len(chunk) == 3
    assert all(x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 for x, _ in chunk)


def test_k_steps_per_call_train_exactly_like_one(tiny_root, tmp_path):
    """Same weights, step count, learning-rate schedule and TensorBoard curves as K=1."""
    runs = {}
    for k in (1, 3, 10):
        run_dir = tmp_path / f"k{k}"
        cfg = compose_cfg(
            [*tiny_overrides(tiny_root), f"engine.steps_per_call={k}", "callbacks=minimal",
             "trainer.max_epochs=2", "latent_metrics=false", *STEP_LR],
            run_dir=run_dir,
        )  # fmt: skip
        metrics = train(cfg)
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        runs[k] = metrics, checkpoint, run_dir
    (m1, c1, d1), (m3, c3, d3), (m10, _, _) = runs[1], runs[3], runs[10]
    assert m1["global_step"] == m3["global_step"] == c3["global_step"] == 20  # 2 x 500/50
    for name, weight in c1["state_dict"].items():
        assert torch.equal(weight, c3["state_dict"][name]), name
    lrs = [c["optimizer_states"][0]["param_groups"][0]["lr"] for c in (c1, c3)]
    assert lrs == [7.5e-4, 7.5e-4]  # 3e-3 halved after each of the 2 epochs
    assert m1["test/mse"] == m3["test/mse"]
    for tag in ("train/mse", "val/mse"):
        one, three = scalars(d1, tag), scalars(d3, tag)
        assert [s for s, _ in one] == [s for s, _ in three], tag
        assert [v for _, v in one] == pytest.approx([v for _, v in three], rel=1e-6), tag
    assert [s for s, _ in scalars(d3, "train/mse")] == [4, 9, 14, 19]  # every 5 steps
    # metrics.json's history: each epoch's mean of its logging steps' terms, also where one
    # call of 10 steps holds both of an epoch's logging steps
    columns = [[row["train/mse"] for row in m["history"]] for m in (m1, m3, m10)]
    logged = [v for _, v in scalars(d1, "train/mse")]
    assert columns[0] == pytest.approx([sum(logged[:2]) / 2, sum(logged[2:]) / 2], rel=1e-6)
    assert columns[1] == pytest.approx(columns[0], rel=1e-6)
    assert columns[2] == pytest.approx(columns[0], rel=1e-6)


def test_max_steps_stops_inside_a_call(tiny_root, tmp_path):
    """10 steps an epoch in calls of 4, 4, 2: step 17 falls inside epoch 2's second call."""
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "engine.steps_per_call=4", "callbacks=none", "logger=none",
         "latent_metrics=false", "trainer.max_epochs=3", "+trainer.max_steps=17"],
        run_dir=tmp_path,
    )  # fmt: skip
    assert train(cfg)["global_step"] == 17


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [(["trainer.gradient_clip_val=1e-4"], 20), (["+trainer.accumulate_grad_batches=3"], 8),
     (["trainer.precision=bf16-mixed"], 20)],
)  # fmt: skip
def test_options_of_lightnings_own_loop_run_in_the_one_path(overrides, steps, tiny_root, tmp_path):
    """Clipping, accumulation and mixed precision work with K steps per call, as with one."""
    runs = {}
    for k in (1, 4):
        cfg = compose_cfg(
            [*tiny_overrides(tiny_root), f"engine.steps_per_call={k}", "callbacks=minimal",
             "logger=none", "latent_metrics=false", "trainer.max_epochs=2", *overrides],
            run_dir=tmp_path / f"k{k}",
        )  # fmt: skip
        metrics = train(cfg)
        checkpoint = torch.load(tmp_path / f"k{k}" / "checkpoints" / "last.ckpt", weights_only=True)
        runs[k] = metrics, checkpoint["state_dict"]
    (m1, w1), (m4, w4) = runs[1], runs[4]
    # 10 minibatches an epoch; accumulating 3: steps after minibatches 3, 6, 9 and 10
    assert m1["global_step"] == m4["global_step"] == steps
    assert all(torch.equal(w1[name], w4[name]) for name in w1)


def test_clipping_changes_the_training(tiny_root, tmp_path):
    weights = []
    for clip in ("null", "1e-4"):
        cfg = compose_cfg(
            [*tiny_overrides(tiny_root), "callbacks=minimal", "logger=none",
             "latent_metrics=false", f"trainer.gradient_clip_val={clip}"],
            run_dir=tmp_path / clip,
        )  # fmt: skip
        train(cfg)
        ckpt = torch.load(tmp_path / clip / "checkpoints" / "last.ckpt", weights_only=True)
        weights.append(ckpt["state_dict"]["encoder.to_latent.0.weight"])
    assert not torch.equal(*weights)


def test_bad_engine_values_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match=r"^engine.cuda_graphs='sometimes' is not a choice"):
        validate_config(compose_cfg(["engine.cuda_graphs=sometimes"], run_dir=tmp_path))
    with pytest.raises(UserError, match=r"^trainer.gradient_clip_val=-1.0 is not"):
        validate_config(compose_cfg(["trainer.gradient_clip_val=-1.0"], run_dir=tmp_path))
