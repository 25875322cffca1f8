"""The step engine: which mode a run gets and why, and that every mode trains alike."""

import logging
import re
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer import call as pl_call
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ae_lightning.system
from ae_lightning.engine import (
    EngineOptimizer,
    EngineOptions,
    StepMode,
    choose_step_mode,
    lr_as_device_tensor,
    scheduler_blocker,
    steps_without_closure,
)
from ae_lightning.train import train
from conftest import PROJECT, compose_cfg, tiny_overrides

ADAM = torch.optim.Adam
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("options", "device", "optimizer", "precision", "world", "reason"),
    [
        ({}, "cuda", ADAM, "32-true", 1, None),
        ({"cuda_graphs": True}, "cuda", torch.optim.AdamW, "32-true", 1, None),
        ({"cuda_graphs": False}, "cuda", ADAM, "32-true", 1, "engine.cuda_graphs=false"),
        ({}, "cpu", ADAM, "32-true", 1, "the device is cpu, not CUDA"),
        ({}, "cuda", ADAM, "32-true", 2, "DDP over 2 processes"),
        ({}, "cuda", ADAM, "16-mixed", 1, "precision=16-mixed is not 32-true"),
        ({"gradient_clip_val": 1.0}, "cuda", ADAM, "32-true", 1, "gradient clipping"),
        ({"accumulate_grad_batches": 2}, "cuda", ADAM, "32-true", 1, "gradient accumulation"),
        ({}, "cuda", torch.optim.LBFGS, "32-true", 1, "LBFGS has no capturable state"),
    ],
)
def test_the_engine_graphs_where_it_can_and_says_why_not(
    options, device, optimizer, precision, world, reason
):
    mode = choose_step_mode(EngineOptions(**options), device, optimizer, precision, world)
    assert mode.graphed == (reason is None)
    if reason is not None:
        assert reason in mode.reason and mode.describe().startswith("eager training steps: ")
    else:
        assert mode.describe().startswith("CUDA-graph training steps: ")


def test_a_vae_with_kl_warmup_steps_eagerly_and_says_why():
    """A graph would freeze the warm-up's beta at its value on the capture step."""
    from ae_lightning.models.vae import VariationalAutoencoder

    assert VariationalAutoencoder(bottleneck=2).graph_blocker is None
    warming = VariationalAutoencoder(bottleneck=2, kl_warmup_steps=100)
    mode = choose_step_mode(EngineOptions(), "cuda", ADAM, model_reason=warming.graph_blocker)
    assert not mode.graphed and "model.kl_warmup_steps" in mode.describe()


@pytest.mark.parametrize(
    ("scheduler", "blocked"),
    [
        (None, False),
        (partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=10), False),
        (partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3), True),
        (partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3, cycle_momentum=False), False),
    ],
)
def test_a_scheduler_that_cycles_momentum_steps_eagerly(scheduler, blocked):
    """Adam's betas are numbers in the captured kernels; only the lr is read from memory."""
    reason = scheduler_blocker(scheduler)
    assert (reason is not None) == blocked
    mode = choose_step_mode(EngineOptions(), "cuda", ADAM, model_reason=reason)
    assert mode.graphed != blocked
    if blocked:
        assert "OneCycleLR cycles the optimizer's momentum" in mode.describe()
        assert "cycle_momentum=false" in mode.describe()


def test_clipping_zero_means_no_clipping():
    assert choose_step_mode(EngineOptions(gradient_clip_val=0.0), "cuda", ADAM).graphed


def test_the_wrapper_lightning_holds_steps_unless_a_replay_did():
    weight = torch.nn.Parameter(torch.ones(3))
    inner = ADAM([weight], lr=0.1)
    wrapper = EngineOptimizer.around(inner)
    assert type(wrapper).__name__ == "Adam"  # the learning-rate monitor's tag stays lr-Adam
    scheduler = torch.optim.lr_scheduler.StepLR(wrapper, step_size=1, gamma=0.5)

    weight.grad = torch.ones(3)
    assert wrapper.step(lambda: "closure ran") == "closure ran"
    after_one = weight.detach().clone()
    assert not torch.equal(after_one, torch.ones(3))
    wrapper.update_applied = True  # as after a graph replay: count, do not update again
    wrapper.step()
    assert torch.equal(weight.detach(), after_one) and not wrapper.update_applied

    scheduler.step()
    assert inner.param_groups[0]["lr"] == 0.05
    assert wrapper.state_dict() == inner.state_dict()


def test_a_tensor_learning_rate_follows_its_scheduler():
    """A graph reads lr from memory: schedulers must fill the tensor in place."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = ADAM([weight], lr=0.1)
    lr_as_device_tensor(optimizer, torch.device("cpu"))
    tensor = optimizer.param_groups[0]["lr"]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()  # (no gradients: changes nothing)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] is tensor and float(tensor) == pytest.approx(0.05)


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_steps_the_engine_applies_train_like_lightnings_optimizer_step(
    tiny_root, tmp_path, monkeypatch, caplog
):
    """Graph mode's bookkeeping (the engine updates, Lightning only counts), on the CPU.

    Off CUDA the graph runner takes every step eagerly, so forcing graph mode here runs the
    very path a GPU run takes around its replays: same weights, steps and curves as eager.
    """
    runs = {}
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(
                ae_lightning.system, "choose_step_mode", lambda *a: StepMode(True, "forced")
            )
        run_dir = tmp_path / str(forced)
        cfg = compose_cfg(
            [*tiny_overrides(tiny_root), "engine.steps_per_call=3", "callbacks=minimal",
             "trainer.max_epochs=2", "latent_metrics=false"],
            run_dir=run_dir,
        )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="ae_lightning"):
            metrics = train(cfg)
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        runs[forced] = metrics, checkpoint["state_dict"], run_dir
    (m_eager, w_eager, d_eager), (m_graph, w_graph, d_graph) = runs[False], runs[True]
    assert m_eager["global_step"] == m_graph["global_step"] == 20
    assert all(torch.equal(w_eager[name], w_graph[name]) for name in w_eager)
    assert scalars(d_eager, "val/mse") == scalars(d_graph, "val/mse")
    assert [s for s, _ in scalars(d_graph, "train/mse")] == [4, 9, 14, 19]
    assert "eager training steps: the device is cpu, not CUDA" in caplog.text
    assert "CUDA-graph training steps: forced" in caplog.text
    assert "Eager step for a minibatch on cpu, not CUDA" in caplog.text  # said once
    assert caplog.text.count("Eager step for") == 1


def test_lightning_private_names_stay_in_one_function():
    """Lightning's public API only, but for ``align_logger_step`` (see its docstring)."""
    private = re.compile(
        r"\._batches_that_stepped|\._on_(before|after)_step\b|self\._trainer\b|"
        r"\.fit_loop\b|\._logger_connector\b|\.epoch_loop\b"
    )
    hits = []
    for path in sorted((PROJECT / "src" / "ae_lightning").rglob("*.py")):
        function = None
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("def "):
                function = line.split("def ")[1].split("(")[0]
            if private.search(line.split("#")[0]):
                hits.append((path.name, function))
    assert hits == [("system.py", "align_logger_step")]


def test_the_loggers_count_optimizer_steps_with_k_steps_per_call(tiny_root, tmp_path):
    """What ``align_logger_step`` is for: val/mse and the lr monitor at optimizer steps."""
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "engine.steps_per_call=4", "trainer.max_epochs=2",
         "figures.every_n_epochs=0", "latent_metrics=false"],
        run_dir=tmp_path,
    )  # fmt: skip
    train(cfg)
    assert [s for s, _ in scalars(tmp_path, "val/mse")] == [9, 19]  # 10 steps an epoch
    assert [s for s, _ in scalars(tmp_path, "train/lr")] == [0, 10]  # at each epoch's start


class CountBackward(pl.Callback):
    """Counts ``on_after_backward`` calls (a gradient-norm logger would hook in here)."""

    calls = 0

    def on_after_backward(self, trainer, pl_module):
        CountBackward.calls += 1


class CountOptimizerSteps(pl.Callback):
    """Counts ``on_before_optimizer_step`` calls (a gradient logger's other usual hook)."""

    calls = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        CountOptimizerSteps.calls += 1


@pytest.mark.parametrize("counter", [CountBackward, CountOptimizerSteps])
@pytest.mark.parametrize("listening", [False, True])
def test_per_step_hooks_run_every_step_whenever_someone_listens(
    tiny_root, tmp_path, monkeypatch, counter, listening
):
    """The shortcuts (``loss.backward()`` for ``manual_backward``; no ``on_before_optimizer_
    step`` dispatch, ~25 us a step) are taken only when nobody overrides those hooks."""
    dispatched = []
    original = pl_call._call_callback_hooks

    def counting(trainer, hook_name, *args, **kwargs):
        dispatched.append(hook_name)
        return original(trainer, hook_name, *args, **kwargs)

    monkeypatch.setattr(pl_call, "_call_callback_hooks", counting)
    extra = [f"+callbacks.count._target_=test_engine.{counter.__name__}"] if listening else []
    counter.calls = 0
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "callbacks=minimal", "latent_metrics=false", *extra],
        run_dir=tmp_path,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["global_step"] == 10
    assert counter.calls == (10 if listening else 0)
    hook = "on_after_backward" if counter is CountBackward else "on_before_optimizer_step"
    assert dispatched.count(hook) == (10 if listening else 0)


def test_only_optimizers_that_step_without_a_closure_are_wrapped():
    assert steps_without_closure(torch.optim.Adam) and steps_without_closure(torch.optim.SGD)
    assert not steps_without_closure(torch.optim.LBFGS)  # needs the loss closure each step


# --- CUDA only ------------------------------------------------------------------------------


def cuda_cfg(root, run_dir, *extra):
    return compose_cfg(
        [*tiny_overrides(root), "trainer.accelerator=gpu", "model=hidden1024",
         "callbacks=minimal", "latent_metrics=false", "trainer.max_epochs=2", *extra],
        run_dir=run_dir,
    )  # fmt: skip


@CUDA
def test_graphed_steps_train_like_eager_ones_on_cuda(tiny_root, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="ae_lightning"):
        graphed = train(cuda_cfg(tiny_root, tmp_path / "graph", "engine.cuda_graphs=true"))
    assert "CUDA-graph training steps" in caplog.text
    assert "Captured the training step" in caplog.text
    eager = train(cuda_cfg(tiny_root, tmp_path / "eager", "engine.cuda_graphs=false"))
    assert graphed["global_step"] == eager["global_step"] == 20
    assert graphed["test/mse"] == pytest.approx(eager["test/mse"], rel=1e-3)


@CUDA
def test_a_graphed_step_follows_the_learning_rate_schedule(tiny_root, tmp_path):
    schedule = ["+model.scheduler._target_=torch.optim.lr_scheduler.StepLR",
                "+model.scheduler._partial_=true", "+model.scheduler.step_size=1",
                "+model.scheduler.gamma=0.1"]  # fmt: skip
    results = [
        train(cuda_cfg(tiny_root, tmp_path / mode, f"engine.cuda_graphs={mode}", *schedule))
        for mode in ("true", "false")
    ]
    assert results[0]["test/mse"] == pytest.approx(results[1]["test/mse"], rel=1e-3)


@CUDA
def test_a_resumed_graphed_run_captures_again_and_finishes(tiny_root, tmp_path):
    first = train(cuda_cfg(tiny_root, tmp_path / "run", "trainer.max_epochs=1"))
    assert first["global_step"] == 10
    resumed = train(
        cuda_cfg(tiny_root, tmp_path / "run", "trainer.max_epochs=3", f"resume={tmp_path / 'run'}")
    )
    assert resumed["global_step"] == 30 and resumed["epochs"] == 3
    assert resumed["test/mse"] < first["test/mse"]
