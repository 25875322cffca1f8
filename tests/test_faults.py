"""Every traceback users met becomes one sentence (the value and the fix), exit 2."""

import json
import shutil
import subprocess
import sys

import pytest
from filelock import FileLock

from conftest import PROJECT, run_train_cli, tiny_overrides, write_tiny_mnist


@pytest.fixture(scope="module")
def finished_run(tiny_root, tmp_path_factory):
    """A tiny run of two epochs, copied by the cases that damage or move it."""
    logs = tmp_path_factory.mktemp("faults_logs")
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "callbacks=minimal", "trainer.max_epochs=2"], logs=logs
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (logs / "runs").iterdir()
    return run_dir


def copy_run(run, tmp_path):
    """A copy of the run as if it had stopped before its test: a resume has work to do."""
    copy = tmp_path / "copied_run"
    shutil.copytree(run, copy)
    (copy / "metrics.json").unlink()
    return copy


def truncated_last(run, tiny, tmp_path):
    copy = copy_run(run, tmp_path)
    last = copy / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    return [f"resume={copy}"]


def swapped_split(kind):
    def setup(run, tiny, tmp_path):
        root = write_tiny_mnist(tmp_path / "data")
        raw = root / "MNIST" / "raw"
        shutil.copyfile(raw / f"t10k-{kind}-ubyte", raw / f"train-{kind}-ubyte")
        return [f"data.root={root}"]

    return setup


def resume_with(*overrides):
    return lambda run, tiny, tmp_path: [f"resume={copy_run(run, tmp_path)}", *overrides]


def plain(*overrides):
    return lambda run, tiny, tmp_path: list(overrides)


CASES = {
    "truncated last.ckpt on resume": (
        truncated_last, "last.ckpt is not an ae-lightning checkpoint that can be read"),
    "seed=-1": (plain("seed=-1"), "seed=-1 is not a whole number from 0 to 4294967295"),
    "seed=abc": (plain("seed=abc"), "seed='abc' is not a whole number"),
    "seed=4294967296": (plain("seed=4294967296"), "seed=4294967296 is not a whole number"),
    "train labels of another split": (
        swapped_split("labels-idx1"), "holds 600 images but"),
    "train images of another split": (
        swapped_split("images-idx3"), "holds 200 images but"),
    "hydra.run.dir=/proc/x/run": (
        plain("hydra.run.dir=/proc/x/run"), "hydra.run.dir=/proc/x/run cannot be written"),
    "max_epochs below the epochs trained": (
        resume_with("trainer.max_epochs=1"),
        "has already trained into epoch 2 but trainer.max_epochs=1: add trainer.max_epochs=2"),
    "activation=nosuch, model=linear": (
        plain("model.activation=nosuch"), "model.activation='nosuch' is not an activation"),
    "activation=nosuch, model=hidden1024": (
        plain("model=hidden1024", "model.activation=nosuch"), "is not an activation"),
    "activation=nosuch, model=deep": (
        plain("model=deep", "model.activation=nosuch"), "is not an activation"),
    "ae-compare --sampler nosuch": (
        lambda run, tiny, tmp_path: ["COMPARE", str(run), "--sampler", "nosuch",
                                     "--out", str(tmp_path / "cmp")],
        "--sampler nosuch is not a sampler: choose one of auto, "),
    "ae-compare into a folder it cannot write": (
        lambda run, tiny, tmp_path: ["COMPARE", str(run), "--out", "/proc/x/comparison"],
        "The comparison cannot be written to /proc/x/comparison"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_each_former_traceback_is_one_sentence(case, finished_run, tiny_root, tmp_path):
    setup, expected = CASES[case]
    args = setup(finished_run, tiny_root, tmp_path)
    logs = tmp_path / "logs"
    if args[0] == "COMPARE":
        result = subprocess.run(
            [sys.executable, "-m", "ae_lightning.cli.compare", *args[1:]],
            capture_output=True, text=True, cwd=PROJECT,
        )  # fmt: skip
    else:
        base = [a for a in tiny_overrides(tiny_root) if not a.startswith(("data.root=",))]
        if not any(a.startswith("data.root=") for a in args):
            base.append(f"data.root={tiny_root}")
        result = run_train_cli([*base, "callbacks=minimal", *args], logs=logs)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if args[0] != "COMPARE":  # a refused run leaves no folder behind
        assert not list(logs.glob("runs/*")), list(logs.glob("runs/*"))
    if (tmp_path / "copied_run").is_dir():  # a refused resume leaves the run as it was
        assert not (tmp_path / "copied_run" / "failed.json").exists()


def test_resume_of_a_moved_run_keeps_testing_its_best_checkpoint(finished_run, tiny_root, tmp_path):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(finished_run, moved)
    (moved / "metrics.json").unlink()
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "callbacks=minimal", "trainer.max_epochs=2",
         f"resume={moved}"],
        logs=tmp_path / "logs",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    original = json.loads((finished_run / "metrics.json").read_text())
    metrics = json.loads((moved / "metrics.json").read_text())
    assert metrics["test_checkpoint"] == str(moved / "checkpoints" / "best.ckpt")
    assert metrics["best_val/mse"] == original["best_val/mse"]
    assert metrics["test/mse"] == original["test/mse"]


def test_a_second_process_on_a_run_folder_is_refused(finished_run, tiny_root, tmp_path):
    run = copy_run(finished_run, tmp_path)
    args = [*tiny_overrides(tiny_root), "callbacks=minimal", "trainer.max_epochs=3"]
    with FileLock(run / "run.lock"):  # another process's run, alive
        result = run_train_cli([*args, f"resume={run}"], logs=tmp_path / "logs")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"error: The run folder {run} is in use by another process: wait for it to finish, "
        "or choose another folder."
    )
    assert not (run / "failed.json").exists()

    (run / "run.lock").write_text("process None on None {garbage")  # what a lock holds: moot
    result = run_train_cli([*args, f"resume={run}"], logs=tmp_path / "logs")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
