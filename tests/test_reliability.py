"""Interrupted runs resume exactly; checkpoints are atomic; one failed job spares a sweep."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ae_lightning.checkpointing import AtomicCheckpointIO
from conftest import PROJECT, run_train_cli, tiny_overrides

SLOW_TINY = ["model=hidden1024", "data.batch_size=10", "callbacks=none", "seed=7"]


def test_sigterm_then_resume_matches_an_uninterrupted_run(tiny_root, tmp_path):
    args = [*tiny_overrides(tiny_root), *SLOW_TINY, "trainer.max_epochs=12"]
    reference = run_train_cli(args, logs=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    (reference_dir,) = (tmp_path / "reference" / "runs").iterdir()
    expected = json.loads((reference_dir / "metrics.json").read_text())["test/mse"]

    logs = tmp_path / "interrupted"
    env = {**os.environ, "AE_LOGS_DIR": str(logs)}
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT / "train.py"), *args],
        env=env, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(logs.glob("runs/*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # Lightning ends the epoch in progress, then exits
    proc.wait(timeout=120)
    (run_dir,) = (logs / "runs").iterdir()
    assert not (run_dir / "metrics.json").exists(), "the run finished before the signal"
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"]
    assert stopped_at < 11

    resumed = run_train_cli([*args, f"resume={run_dir}"], logs=logs)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(list((logs / "runs").iterdir())) == 1  # continued in the same folder
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # the original config is kept
    assert (run_dir / ".hydra-resumed" / "overrides.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 12
    assert abs(metrics["test/mse"] - expected) < 1e-6

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars("val/mse")]
    assert len(set(steps)) == 12 and steps == sorted(steps)  # one continuous history


def test_resume_refuses_a_folder_without_checkpoint_or_another_architecture(tiny_root, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    result = run_train_cli([*tiny_overrides(tiny_root), f"resume={empty}"], logs=tmp_path)
    assert result.returncode == 2 and "checkpoints/last.ckpt, which does not exist" in result.stderr

    first = run_train_cli([*tiny_overrides(tiny_root), "callbacks=none"], logs=tmp_path / "a")
    assert first.returncode == 0
    (run_dir,) = (tmp_path / "a" / "runs").iterdir()
    other = run_train_cli(
        [*tiny_overrides(tiny_root), "bottleneck=5", f"resume={run_dir}"], logs=tmp_path / "a"
    )
    assert other.returncode == 2
    assert "was trained with bottleneck=2 but this config has bottleneck=5" in other.stderr
    assert "Traceback" not in other.stderr


def test_a_checkpoint_save_that_dies_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1}, path)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # Lightning serialises into a buffer, then writes it
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        io.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}


def test_a_failing_job_does_not_take_the_sweep_down(tiny_root, tmp_path):
    result = run_train_cli(["-m", "bottleneck=2,0,3", *tiny_overrides(tiny_root)], logs=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    jobs = {p.name: p for p in sweep.iterdir() if (p / ".hydra").is_dir()}  # named by what varies
    assert (jobs["bottleneck=2"] / "metrics.json").is_file()
    assert (jobs["bottleneck=3"] / "metrics.json").is_file()
    failed = json.loads((jobs["bottleneck=0"] / "failed.json").read_text())
    assert failed["status"] == "failed"
    assert failed["error"].startswith("UserError: bottleneck=0 is not a positive whole number")


def test_sigint_mid_epoch_leaves_a_loadable_last_checkpoint(tiny_root, tmp_path):
    args = [*tiny_overrides(tiny_root), *SLOW_TINY, "trainer.max_epochs=50"]
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT / "train.py"), *args],
        env={**os.environ, "AE_LOGS_DIR": str(tmp_path)}, cwd=PROJECT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.03)  # somewhere inside the next epoch
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert not (run_dir / "metrics.json").exists()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert 0 <= checkpoint["epoch"] < 49 and "state_dict" in checkpoint
