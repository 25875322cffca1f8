"""`ae-compare` on real (tiny) runs: figures, summary tables, failed runs as rows."""

import csv
import json
import math
import shutil
import statistics
import subprocess
import sys

import matplotlib.image
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ae_lightning.compare import compare
from ae_lightning.errors import UserError
from conftest import run_train_cli, tiny_overrides

FIGURES = ["scatter", "reconstructions", "interpolation", "samples"]
COMPARISON_FIGURES = [*FIGURES, "final_metrics"]  # ae-compare's own: a bar per run


@pytest.fixture(scope="module")
def two_runs(tiny_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("compare_logs")
    for bottleneck in (2, 3):
        result = run_train_cli(
            [*tiny_overrides(tiny_root), f"bottleneck={bottleneck}", "callbacks=none",
             "trainer.max_epochs=2", "hydra.callbacks.sweep_summary.enabled=false"],
            logs=logs,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    return sorted((logs / "runs").iterdir())


def test_compare_writes_every_figure_and_a_summary_matching_metrics(two_runs, tmp_path):
    out = compare(two_runs, tmp_path / "cmp")
    for name in COMPARISON_FIGURES:
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.shape[0] > 200 and image.shape[1] > 300
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    for row in rows:
        metrics = json.loads((tmp_path.parent / row["path"] / "metrics.json").read_text())
        assert float(row["test/mse"]) == pytest.approx(metrics["test/mse"])
        assert row["run"] in ("z=2", "z=3")
    assert float(rows[0]["test/mse"]) <= float(rows[1]["test/mse"])  # sorted by test MSE
    assert "| z=2 |" in (out / "summary.md").read_text()  # named as a sweep names its folders
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    assert {f"versus/{name}" for name in COMPARISON_FIGURES} <= set(events.Tags()["images"])


def test_failed_and_checkpointless_runs_are_rows_not_crashes(two_runs, tmp_path):
    broken = tmp_path / "broken_run"
    shutil.copytree(two_runs[0], broken)
    shutil.rmtree(broken / "checkpoints")
    (broken / "metrics.json").unlink()
    out = compare([two_runs[1], broken], tmp_path / "cmp")
    with open(out / "summary.csv") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert rows[str(broken)]["status"] == "failed"
    assert "no checkpoint" in rows[str(broken)]["error"]
    assert rows[str(two_runs[1])]["status"] == "ok"
    assert (out / "scatter.png").is_file()


def test_a_folder_without_runs_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="No run folders"):
        compare([tmp_path])
    result = subprocess.run(
        [sys.executable, "-m", "ae_lightning.cli.compare", str(tmp_path)], capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: No run folders")
    assert "Traceback" not in result.stderr


def test_eval_retests_a_checkpoint_into_a_new_run_folder(two_runs, tiny_root, tmp_path):
    run = two_runs[1]
    expected = json.loads((run / "metrics.json").read_text())
    # eval's own batch size, epochs and seed are not the run's: its record must say the run's
    eval_settings = [*tiny_overrides(tiny_root), "data.batch_size=25", "seed=7"]
    result = run_train_cli(
        [f"ckpt_path={run}/checkpoints/best.ckpt", *eval_settings],
        logs=tmp_path, script="eval.py",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (eval_dir,) = (tmp_path / "runs").iterdir()
    # TensorBoard's name for it says which run it tested, in that run's own first words
    first_word = run.name.split("_", 2)[2].split(",")[0].replace("=", "-")
    assert f"_from={first_word}" in eval_dir.name, (eval_dir.name, run.name)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["test/mse"] == pytest.approx(expected["test/mse"], abs=1e-7)
    assert metrics["bottleneck"] == expected["bottleneck"] == 3 and metrics["epochs"] == 2
    assert metrics["recipe"] == expected["recipe"] == "adam lr=0.003, batch 50"
    assert "(a checkpoint of 2 epochs, tested)  -> " in result.stdout  # it trained nothing
    assert {p.stem for p in (eval_dir / "figures").glob("*.png")} == set(FIGURES)
    knobs = yaml.safe_load((eval_dir / "hparams.yaml").read_text())  # the HParams tab's row
    assert (knobs["lr"], knobs["batch_size"], knobs["max_epochs"], knobs["seed"]) == (
        0.003, 50, 2, 0,
    )  # fmt: skip


def test_eval_reads_a_received_runs_odd_config_as_plain_values(two_runs, tiny_root, tmp_path):
    """The training run's config is a received file: values of the wrong type are left out,
    never called nor resolved, and the evaluation still records its test metrics."""
    received = tmp_path / "received_run"
    shutil.copytree(two_runs[0], received)
    odd = (
        "model:\n  optimizer: adam\n  scheduler: {_target_: 5, step_size: [1]}\n"
        "data: {batch_size: '${oc.env:HOME}'}\ntrainer: {max_epochs: true}\n"
        f"seed: {10**400}\n"  # an int no float holds: the HParams tab's writer overflows
    )
    for name in ("config.yaml", "config_resolved.yaml"):
        (received / ".hydra" / name).write_text(odd)
    result = run_train_cli(
        [f"ckpt_path={received}/checkpoints/best.ckpt", *tiny_overrides(tiny_root),
         "callbacks=none"], logs=tmp_path / "logs", script="eval.py",
    )  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (eval_dir,) = (tmp_path / "logs" / "runs").iterdir()
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["recipe"].startswith("training settings unknown") and "test/mse" in metrics
    knobs = yaml.safe_load((eval_dir / "hparams.yaml").read_text())
    assert all(math.isnan(knobs[key]) for key in ("lr", "batch_size", "max_epochs", "seed"))


def test_eval_of_a_lone_checkpoint_records_its_recipe_as_unknown(two_runs, tiny_root, tmp_path):
    lone = tmp_path / "received.ckpt"  # a colleague's file, without its run folder
    shutil.copy(two_runs[0] / "checkpoints" / "best.ckpt", lone)
    result = run_train_cli(
        [f"ckpt_path={lone}", *tiny_overrides(tiny_root), "callbacks=none"],
        logs=tmp_path, script="eval.py",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (eval_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["recipe"].startswith("training settings unknown"), metrics["recipe"]
    knobs = yaml.safe_load((eval_dir / "hparams.yaml").read_text())
    assert all(math.isnan(knobs[key]) for key in ("lr", "batch_size", "max_epochs", "seed"))


def test_eval_refuses_a_missing_or_foreign_checkpoint(tiny_root, tmp_path):
    missing = run_train_cli(["ckpt_path=/nowhere/best.ckpt"], logs=tmp_path, script="eval.py")
    assert missing.returncode == 2 and "ckpt_path=/nowhere/best.ckpt does not exist" in (
        missing.stderr
    )
    foreign = tmp_path / "foreign.ckpt"
    foreign.write_bytes(b"not a checkpoint")
    result = run_train_cli(
        [f"ckpt_path={foreign}", *tiny_overrides(tiny_root)], logs=tmp_path, script="eval.py"
    )
    assert result.returncode == 2 and "is not an ae-lightning checkpoint" in result.stderr
    assert "Traceback" not in result.stderr + missing.stderr


def hparams_experiment(log_dir):
    """The HParams experiment TensorBoard's event reader finds in ``log_dir``."""
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(log_dir))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG]
    return metadata.parse_experiment_plugin_data(content)


def test_seeds_of_one_run_get_a_mean_and_std_row(tiny_root, tmp_path):
    logs = tmp_path / "logs"
    result = run_train_cli(
        ["-m", "seed=0,1", *tiny_overrides(tiny_root), "callbacks=none"], logs=logs
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (logs / "multiruns").iterdir()
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["n"]) for r in rows][0] == (
        "all seeds (mean ± std)", "mean", "2",
    )  # fmt: skip
    assert sorted(r["run"] for r in rows[1:]) == ["seed=0", "seed=1"]
    seeds = [json.loads((sweep / r["run"] / "metrics.json").read_text()) for r in rows[1:]]
    mses = [m["test/mse"] for m in seeds]
    assert float(rows[0]["test/mse"]) == pytest.approx(statistics.fmean(mses))
    assert float(rows[0]["test/mse std"]) == pytest.approx(statistics.stdev(mses))
    shown = f"{statistics.fmean(mses):.4f} ± {statistics.stdev(mses):.4f}"
    assert "| all seeds (mean ± std) | mean | 2 |" in (sweep / "summary.md").read_text()
    assert shown in (sweep / "summary.md").read_text()

    # ae-compare prints the same row; the sweep's Text tab shows it too.
    cli = subprocess.run(
        [sys.executable, "-m", "ae_lightning.cli.compare", str(sweep),
         "--out", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert cli.returncode == 0 and "Traceback" not in cli.stderr, cli.stderr[-2000:]
    assert "| all seeds (mean ± std) | mean | 2 |" in cli.stdout and shown in cli.stdout
    events = EventAccumulator(str(sweep / "comparison"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("comparison/summary/text_summary")
    assert shown in text.tensor_proto.string_val[0].decode()

    # HParams shows (and so ticks) the one knob that differs between the jobs.
    experiment = hparams_experiment(sweep / "comparison")
    assert [info.name for info in experiment.hparam_infos] == ["seed"]
    assert list(experiment.hparam_infos[0].domain_discrete.values) != []


@pytest.mark.parametrize("module", ["compare", "export"])
def test_the_former_module_commands_name_their_new_home(module, tmp_path):
    """``python -m ae_lightning.compare`` used to run the CLI: it now fails with the command
    to use, instead of doing nothing silently."""
    result = subprocess.run(
        [sys.executable, "-m", f"ae_lightning.{module}", str(tmp_path)], capture_output=True,
        text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.strip() == (
        f"error: `python -m ae_lightning.{module}` is now `python -m ae_lightning.cli.{module}` "
        f"(or `ae-{module}`): run that with the same arguments."
    )
