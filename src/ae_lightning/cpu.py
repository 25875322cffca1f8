"""CPU speed that does not depend on luck: denormals flushed, a thread count that fits the load.

Plain torch, no Lightning. Two effects set a CPU run's speed as much as the model does:

- Denormal floats (tiny values near zero, which Adam's moment estimates drift into) take the
  CPU's slow path; flushing them to zero keeps late epochs as fast as early ones, with the
  same losses to float precision.
- One intra-op thread per core is fastest on an idle machine, but when another process
  keeps a core busy, every parallel region waits for the thread that lost its core. Fewer
  threads are then much faster. ``ThreadSearch`` times the training steps at the current
  count and its neighbours, keeps the fastest, and looks again later or when steps slow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

THREADS_AUTO = "auto"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def flush_denormals(enabled: bool) -> None:
    """Treat denormal floats as zero on the CPU (a no-op where the CPU lacks the mode)."""
    torch.set_flush_denormal(enabled)


def thread_candidates(current: int, ceiling: int) -> list[int]:
    """The counts one search times: the current one first, then one fewer, then one more."""
    ceiling = max(1, ceiling)
    current = min(max(1, current), ceiling)
    candidates = [current]
    for count in (current - 1, current + 1):
        if 1 <= count <= ceiling and count not in candidates:
            candidates.append(count)
    return candidates


def choose_threads(
    seconds_per_step: Mapping[int, float], current: int, ceiling: int, margin: float = 0.05
) -> int:
    """The fastest timed count, kept within 1..``ceiling``.

    Another count replaces ``current`` only when it is faster by more than ``margin``, so
    timing noise on an idle machine does not move the count back and forth.
    """
    ceiling = max(1, ceiling)
    timed = {n: t for n, t in seconds_per_step.items() if 1 <= n <= ceiling and t > 0}
    chosen = min(max(1, current), ceiling)
    if not timed:
        return chosen
    best = min(timed, key=timed.__getitem__)
    if chosen in timed and timed[best] >= timed[chosen] * (1 - margin):
        return chosen
    return best


@dataclass
class ThreadSearch:
    """Which thread count to train with, from the timings of the steps just run.

    Feed it each timed stretch of training (``record``); it answers the count to use next.
    A search times ``window_s`` of steps at each of ``thread_candidates`` (the first stretch
    of a search is not counted: it may carry a warm-up), then settles on ``choose_threads``.
    Settled, it searches again after ``recheck_s`` of training, or as soon as a stretch runs
    ``slowdown`` times slower per step than the chosen count did when it was timed.
    """

    ceiling: int
    threads: int
    window_s: float = 0.3
    recheck_s: float = 20.0
    slowdown: float = 1.5
    searching: bool = False
    chosen_step_s: float | None = None
    _queue: list[int] = field(default_factory=list)
    _timed: dict[int, list[float]] = field(default_factory=dict)
    _origin: int = 0
    _skip_next: bool = False
    _since_search_s: float = 0.0
    _recent: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def __post_init__(self) -> None:
        self.ceiling = max(1, self.ceiling)
        self.threads = min(max(1, self.threads), self.ceiling)

    def start(self) -> int:
        """Begin a search at the current count; returns the count to use."""
        self.searching = True
        self._origin = self.threads
        self._queue = thread_candidates(self.threads, self.ceiling)[1:]
        self._timed = {}
        self._skip_next = True
        return self.threads

    def record(self, seconds: float, steps: int) -> int:
        """Account ``steps`` optimizer steps that took ``seconds`` at ``self.threads``;
        returns the count to use from now on."""
        if not self.searching:
            return self._watch(seconds, steps)
        if self._skip_next:
            self._skip_next = False
            return self.threads
        total = self._timed.setdefault(self.threads, [0.0, 0.0])
        total[0] += seconds
        total[1] += steps
        if total[0] < self.window_s or total[1] == 0:
            return self.threads
        if self._queue:
            self.threads = self._queue.pop(0)
            return self.threads
        per_step = {n: s / k for n, (s, k) in self._timed.items() if k > 0}
        self.threads = choose_threads(per_step, self._origin, self.ceiling)
        self.chosen_step_s = per_step.get(self.threads)
        self.searching = False
        self._since_search_s = 0.0
        self._recent = [0.0, 0.0]
        return self.threads

    def _watch(self, seconds: float, steps: int) -> int:
        self._since_search_s += seconds
        self._recent[0] += seconds
        self._recent[1] += steps
        if self._since_search_s >= self.recheck_s:
            return self.start()
        if self._recent[0] >= self.window_s and self._recent[1] > 0:
            per_step = self._recent[0] / self._recent[1]
            self._recent = [0.0, 0.0]
            if self.chosen_step_s and per_step > self.slowdown * self.chosen_step_s:
                return self.start()
        return self.threads


def share_cores(processes: int) -> None:
    """Torch threads = this machine's cores / processes running at once (not cores each).

    Processes that each start a thread per core oversubscribe the cores and all run slower.
    """
    torch.set_num_threads(max(1, available_cores() // max(1, processes)))
