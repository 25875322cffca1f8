"""The step runner: one optimizer step per minibatch, eager or replayed from a CUDA graph.

Plain torch, no Lightning. On a GPU every optimizer step of these small MLPs is bound by
Python and kernel launches, not by the maths; replaying forward, backward and the Adam
update from one captured CUDA graph removes that cost (PyTorch's "whole network capture":
warm-up on a side stream, a static input buffer, ``capturable`` optimizer state).

The module decides per run which mode to use (``choose_step_mode``) and per minibatch
whether the graph applies (``GraphedSteps.reason_for_eager``): a partial last batch or a
batch-size change runs eagerly, and the log says why once.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
CUDA_GRAPH_CHOICES = ("auto", True, False)


@dataclass(frozen=True)
class EngineOptions:
    """How the training step runs: graphs, clipping, accumulation (config ``engine.*``).

    ``gradient_clip_val``, ``gradient_clip_algorithm`` and ``accumulate_grad_batches`` come
    from the Trainer config: under manual optimisation the module, not the Trainer, applies
    them, so ``train(cfg)`` hands them over here.
    """

    cuda_graphs: str | bool = "auto"
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    warmup_steps: int = 3  # eager steps on a side stream before capture (PyTorch's advice)

    @property
    def clips(self) -> bool:
        return self.gradient_clip_val is not None and self.gradient_clip_val > 0


@dataclass(frozen=True)
class StepMode:
    """``graph`` or ``eager``, and in words why."""

    graphed: bool
    reason: str

    def describe(self) -> str:
        return f"{'CUDA-graph' if self.graphed else 'eager'} training steps: {self.reason}"


def supports_capturable(optimizer_class: type) -> bool:
    """True for optimizers whose state can live in a CUDA graph (Adam, AdamW, ...)."""
    return "capturable" in inspect.signature(optimizer_class).parameters


def scheduler_blocker(scheduler_factory: Any) -> str | None:
    """Why this scheduler cannot drive a captured step (None: it can).

    A graph reads the learning rate from a device tensor that schedulers update in place,
    but the Adam kernels take ``betas`` as numbers baked in at capture: a scheduler that
    cycles momentum (OneCycleLR, CyclicLR) would be frozen at the capture step's betas.
    """
    target = getattr(scheduler_factory, "func", None)
    if target is None:
        return None
    chosen = getattr(scheduler_factory, "keywords", None) or {}
    parameter = inspect.signature(target).parameters.get("cycle_momentum")
    if parameter is None or not chosen.get("cycle_momentum", parameter.default):
        return None
    return (
        f"{target.__name__} cycles the optimizer's momentum each step, which a graph would "
        "freeze (+model.scheduler.cycle_momentum=false allows graphs)"
    )


def choose_step_mode(
    options: EngineOptions,
    device_type: str,
    optimizer_class: type | None,
    precision: str = "32-true",
    world_size: int = 1,
    model_reason: str | None = None,
) -> StepMode:
    """Graph replay where the run allows it, else eager with the first reason it does not.

    Anything a graph cannot hold keeps working, eagerly: clipping (a host-side decision per
    step in Lightning), fp16 loss scaling (skips steps on overflow), accumulation (steps
    every N minibatches), DDP (gradient all-reduce hooks), optimizers without capturable
    state. ``model_reason`` is the model's own, if its loss reads host values per step.
    """
    request = options.cuda_graphs
    if request not in CUDA_GRAPH_CHOICES:
        raise ValueError(f"engine.cuda_graphs={request!r}: use auto, true or false")
    if request is False:
        return StepMode(False, "engine.cuda_graphs=false")
    name = getattr(optimizer_class, "__name__", "this optimizer")
    blockers = [
        (device_type != "cuda", f"the device is {device_type}, not CUDA"),
        (world_size > 1, f"DDP over {world_size} processes syncs gradients outside a graph"),
        (str(precision) not in ("32-true", "32"), f"precision={precision} is not 32-true"),
        (options.clips, f"gradient clipping (gradient_clip_val={options.gradient_clip_val})"),
        (
            options.accumulate_grad_batches != 1,
            f"gradient accumulation (accumulate_grad_batches={options.accumulate_grad_batches})",
        ),
        (
            optimizer_class is None or not supports_capturable(optimizer_class),
            f"{name} has no capturable state",
        ),
        (model_reason is not None, str(model_reason)),
    ]
    reason = next((why for blocked, why in blockers if blocked), None)
    if reason is not None:
        return StepMode(False, reason)
    return StepMode(True, f"{name} with capturable state on CUDA")


class EngineOptimizer(torch.optim.Optimizer):
    """The optimizer Lightning holds, around the real one, where the engine steps it.

    Lightning counts optimizer steps (``global_step``) when its optimizer's ``step`` is
    called, and on the way runs its closure, which dispatches ``on_before_optimizer_step``
    to every callback and the module (a measurable share of a ``linear`` step on a CPU).
    This ``step`` runs that closure only while ``closure_needed`` (someone listens), and
    applies the update unless a graph replay already did (``update_applied``). State,
    param groups and checkpoints are the wrapped optimizer's own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super(): shares state
        self.wrapped = optimizer
        self.update_applied = False
        self.closure_needed = True

    @classmethod
    def around(cls, optimizer: torch.optim.Optimizer) -> EngineOptimizer:
        """Named after the wrapped class and a subclass of it, so loggers keep their tags
        (``lr-Adam``) and ``isinstance(trainer.optimizers[0], torch.optim.Adam)`` holds.
        Every method that touches state is this class's (first in the MRO), forwarded."""
        kind = type(optimizer)
        named = type(kind.__name__, (cls, kind), {"__module__": kind.__module__})
        return named(optimizer)

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.wrapped.param_groups

    @property
    def state(self) -> dict:  # type: ignore[override]
        return self.wrapped.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.wrapped.defaults

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        result = closure() if closure is not None and self.closure_needed else None
        if self.update_applied:
            self.update_applied = False
        else:
            self.wrapped.step()
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.wrapped.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.wrapped.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wrapped.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.wrapped.add_param_group(param_group)


def steps_without_closure(optimizer_class: type) -> bool:
    """True for optimizers whose ``step`` needs no closure (all but LBFGS-like ones)."""
    closure = inspect.signature(optimizer_class.step).parameters.get("closure")
    return closure is None or closure.default is None


def lr_as_device_tensor(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """A graph reads the learning rate from memory only if it is a tensor on the device.

    A float would be baked into the captured kernel, and schedulers would no longer reach
    it; they ``fill_`` a tensor lr in place. Also repairs an lr a checkpoint restored as a
    float or on the CPU.
    """
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.device == device):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)


class GraphedSteps:
    """Optimizer steps replayed from a CUDA graph of forward, backward and the update.

    The first ``warmup_steps`` full minibatches run eagerly on a side stream (so lazy state,
    cuBLAS handles and Adam's moments exist before capture), the next one is captured and
    replayed, and every later one of the same shape is copied into the static input buffer
    and replayed. Nothing here reads a value back to the host.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 3,
    ) -> None:
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.warmup_steps = warmup_steps
        self.warmed = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_input: torch.Tensor | None = None
        self.static_outputs: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.captured_lrs: list[torch.Tensor] = []
        self._explained: set[str] = set()

    def reason_for_eager(self, x: torch.Tensor) -> str | None:
        """Why this minibatch cannot replay the graph, or None if it can."""
        if x.device.type != "cuda":
            return f"a minibatch on {x.device.type}, not CUDA"
        if self.static_input is not None and x.shape != self.static_input.shape:
            return (
                f"a minibatch of {x.shape[0]} (the graph holds {self.static_input.shape[0]}): "
                "a partial last batch or a batch-size change"
            )
        return None

    def explain_once(self, reason: str) -> None:
        key = reason.split(":")[0]
        if key not in self._explained:
            self._explained.add(key)
            log.info("Eager step for %s", reason)

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One full optimizer step on ``x``; the update is applied when this returns."""
        reason = self.reason_for_eager(x)
        if reason is not None:
            self.explain_once(reason)
            return self.eager_step(x)
        if self.static_input is None:
            self.static_input = torch.empty_like(x)
        self.static_input.copy_(x)
        if self.warmed < self.warmup_steps:
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                outputs = self.eager_step(self.static_input)
            torch.cuda.current_stream(x.device).wait_stream(side)
            self.warmed += 1
            return outputs
        if self.graph is None:
            self._capture()
        assert self.graph is not None and self.static_outputs is not None
        self._keep_lr_in_graph()
        self.graph.replay()
        return self.static_outputs

    def _keep_lr_in_graph(self) -> None:
        """A scheduler or checkpoint load that set a group's lr to a new object (a float, a
        CPU tensor) would leave the graph reading the old one: copy its value in instead."""
        for group, captured in zip(self.optimizer.param_groups, self.captured_lrs, strict=True):
            if group["lr"] is not captured:
                captured.fill_(float(group["lr"]))
                group["lr"] = captured

    def eager_step(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.optimizer.zero_grad(set_to_none=True)  # fresh grads, never the graph's buffers
        loss, terms = self.loss_fn(x)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), {name: value.detach() for name, value in terms.items()}

    def _capture(self) -> None:
        assert self.static_input is not None
        lr_as_device_tensor(self.optimizer, self.static_input.device)
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates grads in the pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, terms = self.loss_fn(self.static_input)
            loss.backward()
            self.optimizer.step()
        self.graph = graph
        self.captured_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.static_outputs = (
            loss.detach(),
            {name: value.detach() for name, value in terms.items()},
        )
        log.info("Captured the training step in a CUDA graph (batch %d)", len(self.static_input))
