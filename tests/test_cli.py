"""`python train.py ...` as users type it, in a subprocess."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from ae_lightning.policy import run_cli
from conftest import compose_cfg, run_train_cli, tiny_overrides


def only_child(folder):
    (child,) = [p for p in folder.iterdir() if p.is_dir()]
    return child


def assert_run_contract(run_dir):
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))  # TensorBoard names the run by its folder
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    return json.loads((run_dir / "metrics.json").read_text())


def test_documented_command_on_real_mnist(mnist_root, tmp_path):
    """`python train.py model=hidden1024 bottleneck=10`, cut to 300 batches."""
    result = run_train_cli(
        [
            "model=hidden1024",
            "bottleneck=10",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=300",
            f"data.root={mnist_root}",
        ],
        logs=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_child(tmp_path / "runs")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d+_hidden1024,z=10[,+][^ ]*", run_dir.name
    )
    metrics = assert_run_contract(run_dir)
    assert metrics["test/mse"] < 0.0675  # better than predicting the mean image
    assert f"test/mse {metrics['test/mse']:.5f}" in result.stdout
    assert "Traceback" not in result.stderr


def test_multirun_leaves_one_folder_per_job(tiny_root, tmp_path):
    # $AE_DATA_ROOT names an empty folder: the comparison must read the data.root= the sweep
    # was given, as its jobs did (CI's $AE_DATA_ROOT holds real MNIST, which would hide that).
    env = {"AE_DATA_ROOT": str(tmp_path / "no-data-here")}
    result = run_train_cli(
        ["-m", "bottleneck=2,3", *tiny_overrides(tiny_root)], logs=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_child(tmp_path / "multiruns")
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert [j.name for j in jobs] == ["z=2", "z=3"]  # what the sweep varies, in short words
    assert [assert_run_contract(j)["bottleneck"] for j in jobs] == [2, 3]
    # The sweep callback compared the jobs when the multirun ended.
    summary = (sweep / "summary.md").read_text()
    assert "| z=2 | ok |" in summary and "| z=3 | ok |" in summary
    for name in ("scatter", "reconstructions", "interpolation", "samples"):
        assert (sweep / "comparison" / f"{name}.png").is_file()
    assert "sweep summary failed" not in result.stderr + result.stdout


def test_a_sweep_reading_its_data_from_ae_data_root_is_compared_too(tiny_root, tmp_path):
    """The jobs' saved configs keep `${oc.env:AE_DATA_ROOT,...}` unresolved (files are never
    resolved): the summary must still find the images the jobs read, and so must ae-compare."""
    overrides = [o for o in tiny_overrides(tiny_root) if not o.startswith("data.root=")]
    env = {"AE_DATA_ROOT": str(tiny_root)}
    result = run_train_cli(["-m", "bottleneck=2,3", *overrides], logs=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sweep summary failed" not in result.stderr + result.stdout
    sweep = only_child(tmp_path / "multiruns")
    assert (sweep / "comparison" / "scatter.png").is_file() and (sweep / "summary.md").is_file()
    again = subprocess.run(
        [sys.executable, "-m", "ae_lightning.cli.compare", str(sweep),
         "--out", str(tmp_path / "c")],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "c" / "samples.png").is_file()


def test_two_runs_started_together_get_their_own_folders(tiny_root, tmp_path):
    from conftest import PROJECT

    args = [
        sys.executable,
        str(PROJECT / "train.py"),
        *tiny_overrides(tiny_root),
        "logger=none",
        "callbacks=none",
    ]
    env = {"AE_LOGS_DIR": str(tmp_path)}
    import os

    procs = [
        subprocess.Popen(
            args,
            env={**os.environ, **env},
            cwd=PROJECT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "metrics.json").is_file() for r in runs)


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_two_process_ddp_on_cpu_trains_into_one_run_folder(tiny_root, tmp_path, loader):
    """`trainer=ddp`: each rank takes its own shard (gloo, CPU), with either loader (a torch
    DataLoader's sampler is kept, not sharded a second time by Lightning)."""
    result = run_train_cli(
        ["trainer=ddp", *tiny_overrides(tiny_root), "callbacks=none", "trainer.max_epochs=2",
         f"data.loader={loader}"],
        logs=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_child(tmp_path / "runs")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 500 images, 2 ranks x 250, batches of 50: 5 optimizer steps a rank per epoch.
    assert metrics["epochs"] == 2 and metrics["global_step"] == 10
    assert metrics["test/fd_samples"] >= 0  # measured by rank zero alone, no sync to wait on
    assert result.stdout.count("test/mse ") == 1  # printed by rank zero only


def test_cluster_and_parallel_launcher_configs_compose():
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    for launcher, target in (("slurm", "SlurmLauncher"), ("local_parallel", "JoblibLauncher")):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                config_name="train", overrides=[f"hydra/launcher={launcher}"],
                return_hydra_config=True,
            )  # fmt: skip
        assert cfg.hydra.launcher._target_.endswith(target)


def test_submitit_local_multirun_completes(tiny_root, tmp_path):
    result = run_train_cli(
        ["-m", "hydra/launcher=submitit_local", "bottleneck=2,3", *tiny_overrides(tiny_root),
         "callbacks=none"],
        logs=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_child(tmp_path / "multiruns")
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert [json.loads((j / "metrics.json").read_text())["bottleneck"] for j in jobs] == [2, 3]
    assert (sweep / "summary.md").is_file()


@pytest.mark.parametrize("sweep", ["experiment=reference", "hparams_search=optuna"])
def test_a_sweep_config_without_multirun_is_one_sentence(sweep, tmp_path):
    """Without -m Hydra would train one default run and say nothing."""
    result = run_train_cli([sweep, "debug=fast"], logs=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: {sweep} is a sweep (it sets hydra.sweeper): run it with -m, as in "
        f"python train.py -m {sweep}."
    )
    assert not (tmp_path / "runs").exists()
    shown = run_train_cli([sweep, "--cfg", "job"], logs=tmp_path)  # printing only: allowed
    assert shown.returncode == 0 and "model:" in shown.stdout


def test_a_sweeper_never_gets_the_test_mse(tmp_path):
    """Without a validation score (e.g. +trainer.limit_val_batches=0) the sweep's objective
    is NaN (a failed Optuna trial), not the test MSE it used to fall back to."""
    cfg = compose_cfg([], run_dir=str(tmp_path / "run"))
    finished = {"test/mse": 0.01, "epochs": 1, "train_time_s": 1.0}
    assert math.isnan(run_cli(cfg, task=lambda cfg: finished))
    assert run_cli(cfg, task=lambda cfg: {**finished, "best_val/mse": 0.02}) == 0.02


def test_optuna_search_minimises_val_mse(tiny_root, tmp_path):
    result = run_train_cli(
        ["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *tiny_overrides(tiny_root),
         "callbacks=none"],
        logs=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only_child(tmp_path / "multiruns")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = [p for p in sweep.iterdir() if (p / ".hydra").is_dir()]
    val = [json.loads((j / "metrics.json").read_text())["best_val/mse"] for j in jobs]
    assert len(jobs) == 2 and best["best_value"] == pytest.approx(min(val))
    assert {"model", "model.optimizer.lr"} <= set(best["best_params"])
