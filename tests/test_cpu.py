"""CPU speed settings: denormals flushed by a switch, a thread count that fits the load."""

import itertools
import os

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from ae_lightning.config import validate_config
from ae_lightning.cpu import ThreadSearch, choose_threads, thread_candidates
from ae_lightning.errors import UserError
from ae_lightning.train import train
from conftest import compose_cfg, run_train_cli, tiny_overrides


class CpuProbe(Callback):
    """Records, during training, torch's thread count and whether denormals are flushed."""

    threads: list[int] = []
    flushed: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        CpuProbe.threads.append(torch.get_num_threads())
        tiny = torch.tensor([1e-40], dtype=torch.float32)  # a denormal float32
        CpuProbe.flushed.append(float(tiny * 1.0) == 0.0)


@pytest.fixture
def probe():
    CpuProbe.threads, CpuProbe.flushed = [], []
    before = torch.get_num_threads()
    yield ["+callbacks.probe._target_=test_cpu.CpuProbe", "callbacks=none", "logger=none"]
    torch.set_flush_denormal(False)  # torch's default, for the tests that follow
    torch.set_num_threads(before)


def test_thread_choices_stay_between_one_and_the_cores():
    for ceiling, current in itertools.product(range(0, 9), range(-2, 11)):
        assert all(1 <= n <= max(1, ceiling) for n in thread_candidates(current, ceiling))
        timings = {n: 1.0 / n for n in range(1, 14)} | {-1: 1e-9, 0: 1e-9, 99: 1e-9}
        assert 1 <= choose_threads(timings, current, ceiling) <= max(1, ceiling)
        assert 1 <= choose_threads({}, current, ceiling) <= max(1, ceiling)
    assert thread_candidates(2, 2) == [2, 1] and thread_candidates(1, 2) == [1, 2]
    assert thread_candidates(4, 8) == [4, 3, 5] and thread_candidates(1, 1) == [1]


def test_another_count_wins_only_when_clearly_faster():
    assert choose_threads({2: 6.0, 1: 1.0}, current=2, ceiling=2) == 1  # a busy neighbour
    assert choose_threads({2: 1.0, 1: 1.6}, current=2, ceiling=2) == 2  # idle
    assert choose_threads({2: 1.0, 1: 0.98}, current=2, ceiling=2) == 2  # noise


def drive(search, step_s, seconds):
    """Feed ``search`` stretches of 10 steps on a machine whose step time is ``step_s(n)``."""
    used = []
    for _ in range(int(seconds / 0.05)):
        stretch = 10 * step_s(search.threads)
        used.append(search.threads)
        search.record(stretch, 10)
    return used


def test_the_search_follows_a_neighbour_that_comes_and_goes():
    search = ThreadSearch(ceiling=2, threads=2, window_s=0.3, recheck_s=20.0)
    idle = {2: 0.005, 1: 0.008}.__getitem__
    busy = {2: 0.030, 1: 0.009}.__getitem__
    search.start()
    drive(search, idle, 5)
    assert search.threads == 2 and not search.searching  # idle: every core
    used = drive(search, busy, 10)
    assert search.threads == 1  # the slowdown started a search at once
    assert used.count(2) < len(used) / 4
    drive(search, idle, 30)  # the neighbour left; a later re-check finds it
    assert search.threads == 2


def test_engine_threads_and_flush_denormals_are_checked():
    for override, message in [
        ("engine.threads=0", "engine.threads=0 is not a thread count"),
        ("engine.threads=many", "engine.threads='many' is not a thread count"),
        ("engine.flush_denormals=maybe", "engine.flush_denormals='maybe' is not true or false"),
    ]:
        with pytest.raises(UserError, match=message):
            validate_config(compose_cfg([override]))


def test_a_bad_thread_count_exits_2_before_training(tiny_root, tmp_path):
    result = run_train_cli([*tiny_overrides(tiny_root), "engine.threads=0"], logs=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: engine.threads=0 is not a thread count: use engine.threads=auto, or a whole "
        "number from 1 up, e.g. engine.threads=1."
    ]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_engine_threads_forces_the_count_while_training(tiny_root, tmp_path, probe):
    before = torch.get_num_threads()
    cfg = compose_cfg([*tiny_overrides(tiny_root), *probe, "engine.threads=1"], tmp_path / "r")
    train(cfg)
    assert CpuProbe.threads and set(CpuProbe.threads) == {1}
    assert torch.get_num_threads() == before  # the process's own count is back


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to choose")
def test_auto_threads_train_within_the_cores(tiny_root, tmp_path, probe):
    overrides = [*tiny_overrides(tiny_root), *probe, "trainer.max_epochs=2", "engine.threads=auto"]
    train(compose_cfg(overrides, tmp_path))
    assert CpuProbe.threads
    assert all(1 <= n <= len(os.sched_getaffinity(0)) for n in CpuProbe.threads)


def test_a_deterministic_run_keeps_its_thread_count(tiny_root, tmp_path, probe):
    before = torch.get_num_threads()
    overrides = [*tiny_overrides(tiny_root), *probe, "engine.threads=auto",
                 "trainer.deterministic=true"]  # fmt: skip
    try:
        train(compose_cfg(overrides, tmp_path))
    finally:
        torch.use_deterministic_algorithms(False)  # Lightning leaves it set
    assert set(CpuProbe.threads) == {before}


def test_flushing_denormals_leaves_the_results_and_the_switch_turns_it_off(
    tiny_root, tmp_path, probe
):
    base = [*tiny_overrides(tiny_root), *probe, "model=hidden1024", "latent_metrics=false"]
    flushed = train(compose_cfg(base, tmp_path / "flushed"))
    assert CpuProbe.flushed and all(CpuProbe.flushed)  # the default on a CPU run
    CpuProbe.flushed = []
    kept = train(compose_cfg([*base, "engine.flush_denormals=false"], tmp_path / "kept"))
    assert CpuProbe.flushed and not any(CpuProbe.flushed)
    assert kept["test/mse"] == pytest.approx(flushed["test/mse"], rel=1e-4)
