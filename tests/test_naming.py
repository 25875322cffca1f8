"""Run-folder names: short, valid for any command line, and pasteable back into resume=."""

import json
import re

from hydra.core.override_parser.overrides_parser import OverridesParser

from ae_lightning.naming import (
    NAME_LIMIT,
    job_dirname,
    named_pairs,
    quote_path_overrides,
    run_suffix,
    short_name,
    varying_keys,
)
from conftest import run_train_cli, tiny_overrides

# What Hydra and a shell both take unquoted, once train.py has quoted resume=/ckpt_path=.
SAFE_NAME = re.compile(r"[A-Za-z0-9._+=,-]+")


def test_names_keep_lists_readable_and_cap_long_command_lines():
    assert short_name([("model", "linear"), ("bottleneck", "2")]) == "linear,z=2"
    assert short_name([("model.hidden", "[64, 32]")]) == "hidden=64-32"
    assert short_name([("model.beta", "4"), ("model.optimizer.lr", "1e-3")]) == "beta=4,lr=1e-3"
    # two keys with one last part keep their full keys: the name must tell them apart
    assert short_name([("model.beta", "4"), ("data.beta", "1")]) == "model.beta=4,data.beta=1"
    assert short_name([("data", "npz"), ("data.path", "/data/x/faces.npz")]) == "npz,path=faces.npz"
    long_a = short_name([("model.optimizer.lr", "0.001"), ("+note", "x" * 300)])
    long_b = short_name([("model.optimizer.lr", "0.001"), ("+note", "y" * 300)])
    assert len(long_a) <= NAME_LIMIT and long_a != long_b and SAFE_NAME.fullmatch(long_a)


def test_a_key_given_twice_is_named_by_the_value_hydra_applies(tiny_root, tmp_path):
    assert named_pairs(["bottleneck=3", "model=linear", "+bottleneck=5"]) == [
        ("model", "linear"), ("bottleneck", "5"),
    ]  # fmt: skip
    overrides = [*tiny_overrides(tiny_root), "callbacks=none", "logger=none"]
    result = run_train_cli(["bottleneck=3", "bottleneck=5", *overrides], logs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "z=5" in run_dir.name and "z=3" not in run_dir.name, run_dir.name
    assert json.loads((run_dir / "metrics.json").read_text())["bottleneck"] == 5


def test_a_run_from_a_checkpoint_is_named_by_the_run_it_came_from():
    source = "logs/runs/2026-12-07_23-37-42-2703_hidden1024,lr=0.002+2e123658"
    assert run_suffix([f"ckpt_path={source}/checkpoints/best.ckpt", "data.val_size=100"]) == (
        "_from=hidden1024-lr-0.002,val_size=100"
    )  # the source's start time and capped-name hash left out: room for this run's words
    job = "logs/multiruns/2026-12-07_23-37-42-2703/z=2/checkpoints/last.ckpt"
    assert run_suffix([f"ckpt_path='{job}'", "trainer.max_epochs=5"]) == "_from=z-2,epochs=5"
    assert run_suffix(["ckpt_path=/tmp/received.ckpt"]) == "_from=received"
    assert run_suffix(["ckpt_path=null", "bottleneck=3"]) == "_z=3"
    assert SAFE_NAME.fullmatch(run_suffix([f"ckpt_path={source}/checkpoints/best.ckpt"])[1:])


def test_varying_keys_are_the_swept_ones_in_command_line_order():
    overrides = ["model=linear,hidden1024", "bottleneck=2", "seed=range(3)", "data.root=/x"]
    assert varying_keys(overrides) == ["model", "seed"]
    assert varying_keys(["bottleneck=2"], {"model.optimizer.lr": "tag(log, interval(1e-4,1))"}) == [
        "model.optimizer.lr"
    ]


def test_a_job_named_like_an_earlier_one_gets_its_number(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"varying": ["seed"]}))
    assert job_dirname(str(tmp_path), 0, ["seed=1", "bottleneck=2"]) == "seed=1"
    (tmp_path / "seed=1").mkdir()
    assert job_dirname(str(tmp_path), 1, ["seed=1", "bottleneck=2"]) == "seed=1,job=1"
    assert job_dirname(str(tmp_path), 0, ["seed=1", "bottleneck=2"]) == "seed=1"  # fixed once


def test_resume_takes_any_printed_folder_as_it_is():
    folder = "logs/runs/2026-01-01_00-00-00-1_model.hidden=64-32,bottleneck=2"
    (quoted,) = quote_path_overrides([f"resume={folder}"])
    assert OverridesParser.create().parse_override(quoted).value() == folder
    assert quote_path_overrides(["resume=null", "bottleneck=2"]) == ["resume=null", "bottleneck=2"]


def test_a_300_character_command_line_trains_and_its_folder_resumes_unquoted(tiny_root, tmp_path):
    overrides = [
        "model=hidden1024", "model.hidden=[64]", "bottleneck=2", *tiny_overrides(tiny_root),
        "callbacks=minimal", "logger=none", "+note=" + "a-long-free-text-note_" * 12,
    ]  # fmt: skip
    assert len(" ".join(overrides)) >= 300
    first = run_train_cli(overrides, logs=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    suffix = run_dir.name.split("_", 2)[2]
    assert len(suffix) <= NAME_LIMIT and SAFE_NAME.fullmatch(suffix), run_dir.name
    assert suffix.startswith("hidden1024")
    saved = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "a-long-free-text-note_" * 12 in saved  # the full overrides stay in .hydra/

    printed = first.stdout.strip().split("-> ")[-1]  # the folder as train.py printed it
    resumed = run_train_cli(
        [*overrides, "trainer.max_epochs=2", f"resume={printed}"], logs=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
