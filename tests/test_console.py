"""What a user sees on the console and in the run folder: quiet, logged, resolved, helpful."""

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from ae_lightning.train import train
from conftest import PROJECT, compose_cfg, run_train_cli, tiny_overrides


def test_normal_run_is_quiet_and_leaves_a_full_record(tiny_root, tmp_path):
    result = run_train_cli([*tiny_overrides(tiny_root), "trainer.max_epochs=2"], logs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).lower().splitlines()
    assert not [line for line in lines if "litlogger" in line or "deprecated" in line]

    (run_dir,) = (tmp_path / "runs").iterdir()
    log = (run_dir / "train.log").read_text()
    assert "epoch 1/2  train/mse" in log and "epoch 2/2  train/mse" in log
    assert "epoch 2/2  train/mse" in result.stdout  # shown plainly on the console too

    resolved = yaml.safe_load((run_dir / ".hydra" / "config_resolved.yaml").read_text())
    assert resolved["data"]["root"] == str(tiny_root)
    assert resolved["run_dir"] == str(run_dir)
    assert "${" not in (run_dir / ".hydra" / "config_resolved.yaml").read_text()

    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["bottleneck"] == 2 and hparams["max_epochs"] == 2


def test_help_lists_every_config_group(tmp_path):
    result = run_train_cli(["--help"], logs=tmp_path)
    assert result.returncode == 0
    for group in ("model", "data", "trainer", "callbacks", "logger", "experiment", "debug"):
        assert any(line.startswith(f"{group} ") for line in result.stdout.splitlines()), group
    assert "debug: fast, limit, overfit, profile" in result.stdout
    assert "+trainer.KEY=VALUE" in result.stdout


def test_eval_help_names_its_checkpoint_and_only_the_groups_that_apply(tmp_path):
    result = run_train_cli(["--help"], logs=tmp_path, script="eval.py")
    assert result.returncode == 0
    assert "Usage: ae-eval ckpt_path=<run>/checkpoints/best.ckpt" in result.stdout
    options = [line.split(":")[0] for line in result.stdout.splitlines() if ": " in line]
    assert {"data", "trainer", "callbacks", "logger", "debug"} <= set(options)
    assert not {"model", "optimizer", "scheduler", "experiment", "hparams_search"} & set(options)


def test_print_config_prints_a_tree(tiny_root, tmp_path):
    result = run_train_cli([*tiny_overrides(tiny_root), "debug=fast", "print_config=true"],
                           logs=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "├── model" in result.stdout and "bottleneck: 2" in result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "print_config" not in run_dir.name  # a display switch, not part of the run's name


def test_debug_fast_is_one_batch_without_figures(tiny_root, tmp_path):
    metrics = train(compose_cfg([*tiny_overrides(tiny_root), "debug=fast"], run_dir=tmp_path))
    assert metrics["global_step"] == 1 and metrics["epochs"] == 1
    assert not (tmp_path / "figures").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["test/mse"] > 0


def test_debug_profile_writes_the_profile_into_the_run_folder(tiny_root, tmp_path):
    train(compose_cfg([*tiny_overrides(tiny_root), "debug=profile", "callbacks=minimal"],
                      run_dir=tmp_path))  # fmt: skip
    profile = (tmp_path / "fit-profile.txt").read_text()
    assert "run_training_epoch" in profile


def test_debug_overfit_and_limit_compose():
    overfit = compose_cfg(["debug=overfit"])
    assert overfit.trainer.overfit_batches == 3 and overfit.trainer.max_epochs == 300
    limit = compose_cfg(["debug=limit"])
    assert limit.trainer.limit_train_batches == 0.1 and limit.trainer.max_epochs == 3


def run_on_a_terminal(args: list[str], logs: Path) -> tuple[int, str]:
    """`python train.py ARGS` with its output on a pseudo-terminal, as a user at a shell sees it."""
    main, follower = pty.openpty()
    env = {**os.environ, "AE_LOGS_DIR": str(logs), "COLUMNS": "200", "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, str(PROJECT / "train.py"), *args],
        stdout=follower, stderr=follower, stdin=subprocess.DEVNULL, cwd=PROJECT, env=env,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    text = b"".join(chunks).decode(errors="replace")
    return process.wait(timeout=600), re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_terminal_bar_counts_optimizer_steps_and_hides_every_run_notices(tiny_root, tmp_path):
    code, screen = run_on_a_terminal(
        [*tiny_overrides(tiny_root), "trainer.max_epochs=2", "callbacks=minimal"], tmp_path
    )
    assert code == 0, screen[-3000:]
    # 500 training images in minibatches of 50: 10 optimizer steps an epoch, in one
    # Lightning call of engine.steps_per_call=20.
    bars = [line for line in re.split(r"[\r\n]", screen) if line.startswith("Epoch ")]
    assert bars and not [line for line in bars if line.startswith("Epoch 0")]
    assert any(line.startswith("Epoch 1/2") and "10/10" in line for line in bars), bars
    final = [line for line in bars if line.startswith("Epoch 2/2") and "10/10" in line]
    assert final and "train/mse 0." in final[-1] and "val/mse 0." in final[-1], bars
    assert "TPU available" not in screen and "GPU available" not in screen
    assert "the device is cpu" not in screen
    # The model summary shows real sizes: in/out sizes and FLOPs, not a FLOPs column of 0.
    assert "In sizes" in screen and "[1, 1, 28, 28]" in screen
    assert "Total FLOPs: 0" not in screen and "Total FLOPs" in screen
    (run_dir,) = (tmp_path / "runs").iterdir()
    log = (run_dir / "train.log").read_text()
    assert "TPU available" in log and "the device is cpu" in log  # kept for the record
    # Accumulating 4 minibatches a step: 3 optimizer steps an epoch (4, 4, and the last 2),
    # and the bar fills to them (it counted minibatches and stopped at 3/10).
    code, screen = run_on_a_terminal(
        [*tiny_overrides(tiny_root), "+trainer.accumulate_grad_batches=4", "callbacks=minimal",
         "logger=none"], tmp_path / "accumulating",
    )  # fmt: skip
    assert code == 0, screen[-3000:]
    bars = [line for line in re.split(r"[\r\n]", screen) if line.startswith("Epoch 1/1")]
    assert bars and "3/3" in bars[-1] and "/10" not in "".join(bars), bars


def test_run_folder_holds_history_curves_and_provenance(tiny_root, tmp_path):
    result = run_train_cli([*tiny_overrides(tiny_root), "trainer.max_epochs=3",
                            "figures.every_n_epochs=0"], logs=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = metrics["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [row["step"] for row in history] == [10, 20, 30]
    for row in history:
        assert row["train/mse"] > 0 and row["val/mse"] > 0 and row["lr"] == 3e-3
        assert row["epoch_s"] == pytest.approx(metrics["epoch_times_s"][row["epoch"] - 1])
    assert history[-1]["val/mse"] < history[0]["val/mse"]  # it learns
    curves = plt.imread(run_dir / "figures" / "curves.png")
    assert curves.shape[0] > 200 and curves.shape[1] > 600

    info = json.loads((run_dir / "run_info.json").read_text())
    git = ["git", "-C", str(PROJECT), "rev-parse", "HEAD"]
    head = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    assert info["code"]["commit"] == head
    assert isinstance(info["code"]["dirty"], bool)
    assert info["argv"][0].endswith("train.py") and "trainer.max_epochs=3" in info["argv"]
    assert info["device"] == "cpu" and info["device_name"]
    assert info["versions"]["torch"] and info["versions"]["pytorch-lightning"]
    assert info["versions"]["ae-lightning"] and info["versions"]["python"]
    assert info["started"] <= info["ended"]
