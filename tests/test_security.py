"""Files are data, never code: checkpoints and run folders that try to run code are refused."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import PROJECT, run_train_cli, tiny_overrides


class Payload:
    """Unpickling this calls ``os.system``: what a malicious checkpoint hides."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_sentence_refusal(result, marker, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert not marker.exists(), "the file's code ran"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def good_run(tiny_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("security_logs")
    result = run_train_cli([*tiny_overrides(tiny_root), "callbacks=minimal"], logs=logs)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (logs / "runs").iterdir()
    return run_dir


def poisoned_copy(run_dir, tmp_path, marker):
    """The run folder with code hidden in both checkpoints, beside real weights."""
    copy = tmp_path / "shared_run"
    shutil.copytree(run_dir, copy)
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(copy / "checkpoints" / name, weights_only=True)
        checkpoint["hyper_parameters"]["note"] = Payload(marker)
        torch.save(checkpoint, copy / "checkpoints" / name)
    return copy


@pytest.mark.parametrize("how", ["ckpt_path", "resume", "eval"])
def test_a_checkpoint_that_runs_code_is_refused(how, good_run, tiny_root, tmp_path):
    marker = tmp_path / "MARKER"
    run = poisoned_copy(good_run, tmp_path, marker)
    args, script = [*tiny_overrides(tiny_root), "callbacks=minimal"], "train.py"
    if how == "ckpt_path":
        args.append(f"ckpt_path={run}/checkpoints/last.ckpt")
    elif how == "resume":
        (run / "metrics.json").unlink()  # unfinished: a finished run is not resumed at all
        args.append(f"resume={run}")
    else:
        args.append(f"ckpt_path={run}/checkpoints/best.ckpt")
        script = "eval.py"
    result = run_train_cli(args, logs=tmp_path / "logs", script=script)
    one_sentence_refusal(result, marker, "asks to run code", "was not loaded")


def ae_compare(*args):
    return subprocess.run(
        [sys.executable, "-m", "ae_lightning.cli.compare", *map(str, args)],
        capture_output=True, text=True, cwd=PROJECT,
    )  # fmt: skip


def test_compare_refuses_a_checkpoint_that_runs_code(good_run, tmp_path):
    marker = tmp_path / "MARKER"
    run = poisoned_copy(good_run, tmp_path, marker)
    result = ae_compare(good_run, run, "--out", tmp_path / "cmp")
    one_sentence_refusal(result, marker, "best.ckpt asks to run code")


def poisoned_config(run_dir, tmp_path, marker):
    """The run folder with a `_target_` nested in its saved data settings."""
    copy = tmp_path / "shared_run"
    shutil.copytree(run_dir, copy)
    path = copy / ".hydra" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["data"]["root"] = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    path.write_text(yaml.safe_dump(config))
    return copy


def test_compare_refuses_a_run_config_that_names_code(good_run, tmp_path):
    marker = tmp_path / "MARKER"
    run = poisoned_config(good_run, tmp_path, marker)
    result = ae_compare(run, "--out", tmp_path / "cmp")
    one_sentence_refusal(
        result, marker, "data.root._target_ ('os.system')", "reads run folders as data only"
    )  # the offending target itself is shown, not data._target_'s
    assert not (tmp_path / "cmp").exists()  # refused before anything was written


def test_eval_never_reads_the_run_config_beside_the_checkpoint(good_run, tiny_root, tmp_path):
    marker = tmp_path / "MARKER"
    run = poisoned_config(good_run, tmp_path, marker)
    result = run_train_cli(
        [f"ckpt_path={run}/checkpoints/best.ckpt", *tiny_overrides(tiny_root),
         "callbacks=minimal"],
        logs=tmp_path / "logs", script="eval.py",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()


def test_a_saved_config_that_asks_for_python_objects_is_refused_unbuilt(tmp_path):
    """The run-folder YAML reader is a SafeLoader: a `!!python/object` tag is an error."""
    from ae_lightning.errors import UserError
    from ae_lightning.runfolder import read_yaml

    marker = tmp_path / "ran"
    path = tmp_path / "config.yaml"
    path.write_text(f"model: !!python/object/apply:os.system\n  - touch {marker}\n")
    with pytest.raises(UserError, match="cannot be read as train.py's YAML"):
        read_yaml(path, within=tmp_path)
    assert not marker.exists()


def test_a_loaded_optimizer_state_keeps_this_runs_kernel_flags_and_must_fit():
    """The file's fused/capturable/differentiable never reach the step; a short buffer is
    refused inside load_state_dict itself, the one place every resume goes through."""
    from ae_lightning.checkpointing import guard_optimizer_load
    from ae_lightning.errors import UserError

    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.Adam(params, foreach=False)
    guard_optimizer_load(optimizer)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = optimizer.state_dict()
    state["param_groups"][0].update(fused=True, capturable=True, differentiable=True)
    optimizer.load_state_dict(state)
    group = optimizer.param_groups[0]
    assert (group["fused"], group["capturable"], group["differentiable"]) == (None, False, False)
    optimizer.step()  # the file's flags would fail here (capturable on the CPU)

    state = optimizer.state_dict()
    state["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(UserError, match=r"exp_avg=\(3,\), not a finite torch.float32 tensor"):
        optimizer.load_state_dict(state)
    state["state"][0]["exp_avg"] = torch.zeros(1).expand(4, 3)  # its shape, one float stored
    with pytest.raises(UserError, match=r"exp_avg=\(4, 3\), not a finite"):
        optimizer.load_state_dict(state)


def test_another_optimizers_state_is_refused_and_a_schedulers_settings_are_not():
    """SGD's state in Adam (or Adam's in SGD) is a KeyError at the first step; the settings
    a scheduler adds to the groups belong to the same optimizer."""
    from ae_lightning.checkpointing import check_optimizer_state, guard_optimizer_load
    from ae_lightning.errors import UserError

    params = [torch.nn.Parameter(torch.zeros(4, 3))]
    params[0].grad = torch.ones(4, 3)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(params)
    torch.optim.lr_scheduler.OneCycleLR(adam, 0.1, total_steps=10)  # adds max_lr, initial_lr...
    for optimizer in (sgd, adam):
        optimizer.step()
    for target, source, foreign in ((torch.optim.Adam, sgd, "dampening, momentum, nesterov"),
                                    (torch.optim.SGD, adam, "amsgrad, betas")):  # fmt: skip
        loading = target(params)
        guard_optimizer_load(loading)
        with pytest.raises(
            UserError,
            match=rf"another optimizer than {target.__name__} "
            rf"\(its param_groups\[0\] has {foreign}",
        ):
            loading.load_state_dict(source.state_dict())
    fresh = torch.optim.Adam(params)  # before its scheduler exists, as train.py checks first
    check_optimizer_state(adam.state_dict(), [params], "last.ckpt", fresh)
    guard_optimizer_load(fresh)
    fresh.load_state_dict(adam.state_dict())
    fresh.step()


def test_a_scheduler_state_is_plain_data_torch_itself_wrote():
    """A scheduler's load_state_dict updates its __dict__: no other optimizer, no lambda
    state, no word torch's schedulers do not keep, no NaN, no 2**70 step, no zero length."""
    from ae_lightning.resume import _bad_scheduler_value

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([param])
    schedulers = [
        torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=10),
        torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer),  # best = inf: kept
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        torch.optim.lr_scheduler.StepLR(optimizer, 10),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 2.5),  # a float T_max works
    ]
    for scheduler in schedulers:
        assert _bad_scheduler_value(scheduler.state_dict(), "lr_schedulers[0]") is None
    phases = [{"end_step": 2.0, "start_lr": "no_such_key"}]
    for bad, where in (
        ({"optimizer": 5}, "lr_schedulers[0].optimizer"),
        ({"lr_lambdas": [{"x": 1}]}, "lr_schedulers[0].lr_lambdas"),
        ({"_schedule_phases": phases}, "lr_schedulers[0]._schedule_phases[0].start_lr"),
        ({"best": float("nan")}, "lr_schedulers[0].best"),
        ({"last_epoch": 2**70}, "lr_schedulers[0].last_epoch"),
        ({"base_lrs": [torch.zeros(1)]}, "lr_schedulers[0].base_lrs[0]"),
        ({"step_size": 0}, "lr_schedulers[0].step_size"),  # a modulo by zero mid-run
        ({"T_max": 0}, "lr_schedulers[0].T_max"),
        ({"total_steps": -5}, "lr_schedulers[0].total_steps"),
        ({"T_max": float("nan")}, "lr_schedulers[0].T_max"),
    ):
        assert _bad_scheduler_value(bad, "lr_schedulers[0]")[0] == where
