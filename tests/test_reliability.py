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
from ae_lightning.errors import UserError
from ae_lightning.train import train
from conftest import PROJECT, compose_cfg, run_train_cli, tiny_overrides

SLOW_TINY = ["model=hidden1024", "data.batch_size=10", "callbacks=none", "seed=7"]


SIGTERM_EXIT = 143
KILL_AT = ["+callbacks.kill._target_=signals.SigtermAtStep"]  # tests/signals.py
WITH_TESTS = {
    "PYTHONPATH": os.pathsep.join([str(PROJECT / "tests"), os.environ.get("PYTHONPATH", "")])
}


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def scalar_steps(run_dir, tag):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_sigterm_mid_epoch_then_resume_is_bit_identical(tiny_root, tmp_path, loader):
    """50 minibatches an epoch: with the default steps_per_call=20 Lightning steps of 20, 20,
    10; with a torch DataLoader one minibatch a step."""
    args = [*tiny_overrides(tiny_root), "data.batch_size=10", "callbacks=none", "seed=7",
            "trainer.max_epochs=3", f"data.loader={loader}"]  # fmt: skip
    reference = run_train_cli(args, logs=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    (reference_dir,) = (tmp_path / "reference" / "runs").iterdir()

    logs, run_dir = tmp_path / "interrupted", tmp_path / "interrupted" / "run"
    stopped = run_train_cli(
        [*args, *KILL_AT, "+callbacks.kill.step=70", f"hydra.run.dir={run_dir}"],
        logs=logs, env=WITH_TESTS,
    )  # SIGTERM after step 70: 20 steps into the second epoch  # fmt: skip
    assert stopped.returncode == SIGTERM_EXIT, stopped.stderr[-2000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted: SIGTERM: stopped at step 70 (epoch 2)")
    assert "resume with: python train.py " in line and f"resume={run_dir}" in line
    assert "Traceback" not in stopped.stderr and not (run_dir / "metrics.json").exists()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 70

    resumed = run_train_cli([*args, f"resume={run_dir}"], logs=logs)
    assert [p.name for p in logs.iterdir()] == ["run"]  # continued in the same folder
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = json.loads((reference_dir / "metrics.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/mse"] == expected["test/mse"] and metrics["global_step"] == 150
    ours, theirs = weights(run_dir), weights(reference_dir)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)  # bit-identical
    for tag in ("val/mse", "train/mse"):  # one continuous history, no step twice
        assert scalar_steps(run_dir, tag) == scalar_steps(reference_dir, tag)
    # metrics.json's history came through the checkpoint: every epoch once, same val/mse
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]
    assert [r["val/mse"] for r in metrics["history"]] == [r["val/mse"] for r in expected["history"]]


def test_a_resumed_vae_draws_the_noise_the_uninterrupted_one_draws(tiny_root, tmp_path):
    """Its reparameterised noise comes from torch's generator, which now travels in the
    checkpoint: 1 epoch + resume to 2 ends bit for bit where 2 epochs do."""
    common = [*tiny_overrides(tiny_root), "callbacks=minimal", "logger=none", "model=vae"]
    whole = run_train_cli([*common, "trainer.max_epochs=2"], logs=tmp_path / "whole")
    first = run_train_cli(common, logs=tmp_path / "parts")
    assert whole.returncode == 0 and first.returncode == 0, first.stderr[-2000:]
    (run_dir,) = (tmp_path / "parts" / "runs").iterdir()
    more = run_train_cli([*common, "trainer.max_epochs=2", f"resume={run_dir}"], tmp_path / "parts")
    assert more.returncode == 0, more.stderr[-2000:]
    (whole_dir,) = (tmp_path / "whole" / "runs").iterdir()
    expected, got = weights(whole_dir), weights(run_dir)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_generator_state_that_does_not_fit_is_left_out():
    from ae_lightning.system import rng_states

    own = torch.get_rng_state()
    assert torch.equal(rng_states({"cpu": own.clone()})["cpu"], own)
    for bad in (None, 5, {"cpu": own[:10]}, {"cpu": own.float()}, {"cpu": "x"},
                {"cpu": torch.zeros(1, dtype=torch.uint8).expand(own.numel())}):  # fmt: skip
        assert rng_states(bad) is None


def test_an_outside_sigterm_stops_within_seconds_with_143(tiny_root, tmp_path):
    args = [*tiny_overrides(tiny_root), *SLOW_TINY, "trainer.max_epochs=50"]
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT / "train.py"), *args],
        env={**os.environ, "AE_LOGS_DIR": str(tmp_path)}, cwd=PROJECT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # inside the next epoch
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    took = time.time() - sent
    assert proc.returncode == SIGTERM_EXIT, stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert f"stopped at step {step} " in stderr.splitlines()[-1]
    assert took < 30, took  # seconds on a 2-core machine under load; ~1 s when idle


def test_sigterm_in_a_sweep_stops_it_with_a_summary_and_the_resume_command(tiny_root, tmp_path):
    result = run_train_cli(
        ["-m", *tiny_overrides(tiny_root), "data.batch_size=10", "trainer.max_epochs=2", *KILL_AT,
         "callbacks=none", "+callbacks.kill.step=100000,70,100000"],
        logs=tmp_path, env=WITH_TESTS,
    )  # fmt: skip
    assert result.returncode == SIGTERM_EXIT, result.stderr[-2000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["step=100000", "step=70"]  # no third job
    interrupted = sweep / "step=70"
    marker = json.loads((interrupted / "interrupted.json").read_text())
    assert marker["status"] == "interrupted" and f"resume={interrupted}" in marker["resume"]
    summary = (sweep / "summary.md").read_text()
    assert "| ok |" in summary and "| interrupted |" in summary


def test_resume_refuses_a_folder_without_checkpoint_or_another_architecture(tiny_root, tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    result = run_train_cli([*tiny_overrides(tiny_root), f"resume={empty}"], logs=tmp_path)
    assert result.returncode == 2 and "holds no checkpoints/last.ckpt" in result.stderr
    assert not any(empty.iterdir())  # refused before Hydra wrote .hydra-resumed/ or a log
    nowhere = tmp_path / "typo_run"
    result = run_train_cli([*tiny_overrides(tiny_root), f"resume={nowhere}"], logs=tmp_path)
    assert result.returncode == 2 and f"resume={nowhere} does not exist" in result.stderr
    assert not nowhere.exists()  # not created from nothing

    first = run_train_cli([*tiny_overrides(tiny_root), "callbacks=none"], logs=tmp_path / "a")
    assert first.returncode == 0
    (run_dir,) = (tmp_path / "a" / "runs").iterdir()
    (run_dir / "metrics.json").unlink()  # unfinished: a finished run is not resumed at all
    other = run_train_cli(
        [*tiny_overrides(tiny_root), "bottleneck=5", f"resume={run_dir}"], logs=tmp_path / "a"
    )
    assert other.returncode == 2
    assert "was trained with bottleneck=2 but this config has bottleneck=5" in other.stderr
    assert "Traceback" not in other.stderr
    last = run_dir / "checkpoints" / "last.ckpt"  # the file itself, as the sentence once hinted
    pointed = run_train_cli([*tiny_overrides(tiny_root), f"resume={last}"], logs=tmp_path / "a")
    assert pointed.returncode == 2 and "Traceback" not in pointed.stderr
    assert f"is a checkpoint file, not a run folder: resume={run_dir} continues" in pointed.stderr
    for script in ("train.py", "eval.py"):
        args = [*tiny_overrides(tiny_root), f"ckpt_path={run_dir}"]
        folder = run_train_cli(args, tmp_path / "b", script=script)
        assert folder.returncode == 2, folder.stderr[-2000:]
        assert f"ckpt_path={run_dir} is a folder: point it at a .ckpt" in folder.stderr


def test_resume_null_trains_a_new_run_and_the_last_resume_given_is_the_one_checked(
    tiny_root, tmp_path
):
    """``resume=null`` is the config's own default (no resume), yet it was refused as a
    folder named ``null``; with ``resume=`` twice, Hydra applies the last, so that is the
    one the checks before Hydra read."""
    common = [*tiny_overrides(tiny_root), "callbacks=none", "logger=none"]
    typo = tmp_path / "typo_run"
    result = run_train_cli([*common, f"resume={typo}", "resume=NULL"], logs=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "metrics.json").is_file() and not typo.exists()
    again = run_train_cli([*common, "resume=null", f"resume={typo}"], logs=tmp_path)
    assert again.returncode == 2 and f"resume={typo} does not exist" in again.stderr
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_a_finished_run_is_never_written_by_eval_resume_or_a_reused_run_dir(tiny_root, tmp_path):
    """eval.py resume=<run> and hydra.run.dir=<run> used to replace the run's metrics.json,
    .hydra/ config and checkpoints, exit 0."""
    common = [*tiny_overrides(tiny_root), "callbacks=minimal", "logger=none"]
    assert run_train_cli(common, logs=tmp_path).returncode == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    best = run_dir / "checkpoints" / "best.ckpt"
    tries = {
        "eval.py": ([*common, f"ckpt_path={best}", f"resume={run_dir}"],
                    f"resume={run_dir} continues a training run, which eval.py does not"),
        "train.py": ([*common, "model=vae", f'hydra.run.dir="{run_dir}"'],  # quoted: a comma
                     f"hydra.run.dir={run_dir} already holds a run (metrics.json and checkpoints)"),
    }  # fmt: skip
    for script, (args, said) in tries.items():
        result = run_train_cli(args, logs=tmp_path, script=script)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert said in result.stderr
    quoted = f'hydra.run.dir="{run_dir}"'
    result = run_train_cli([*common, f"ckpt_path={best}", quoted], logs=tmp_path, script="eval.py")
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


def test_a_resume_that_changes_the_recipe_is_refused_and_a_new_run_may_change_knobs(
    tiny_root, tmp_path
):
    """Lightning restores the checkpoint's optimizer groups over the config's: a changed lr
    was written into metrics.json's recipe and never used; resume= with a changed knob mixed
    two recipes in one run; a schedule starting mid-run was a KeyError."""
    common = [*tiny_overrides(tiny_root), "callbacks=minimal", "logger=none"]
    assert run_train_cli(common, logs=tmp_path).returncode == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    before = (run_dir / "metrics.json").read_bytes()
    last = run_dir / "checkpoints" / "last.ckpt"
    go_on = [*common, "trainer.max_epochs=2"]
    refused = {
        "model.optimizer.lr=1e-4": (f"resume={run_dir}",
                                    "was trained with model.optimizer.lr=0.003 but this config "
                                    "has 0.0001, and a resumed optimizer keeps"),
        "model.dropout=0.5": (f"resume={run_dir}",
                              "was trained with dropout=0.0 but this config has dropout=0.5"),
        "scheduler=onecycle": (f"ckpt_path={last}",
                               "was trained with no learning-rate schedule but this config"),
    }  # fmt: skip
    for change, (source, said) in refused.items():
        result = run_train_cli([*go_on, change, source], logs=tmp_path / "new")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"error: {last} {said}" in result.stderr
    assert (run_dir / "metrics.json").read_bytes() == before
    tuned = run_train_cli([*go_on, "model.dropout=0.5", f"ckpt_path={last}"], tmp_path / "new")
    assert tuned.returncode == 0, tuned.stderr[-2000:]  # a new run from the weights: its own knobs


def test_last_ckpt_is_every_epochs_end_even_when_the_best_stays_behind(tiny_root, tmp_path):
    """mode=max keeps epoch 1 as the best while val/mse falls: Lightning 2.6 refreshed
    last.ckpt only with the best, so a resume trained epochs 2-3 again and metrics.json's
    history stopped at the best epoch."""
    common = [*tiny_overrides(tiny_root), "callbacks=minimal", "logger=none",
              "callbacks.checkpoint.mode=max"]  # fmt: skip
    assert run_train_cli([*common, "trainer.max_epochs=3"], logs=tmp_path).returncode == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = {name: torch.load(run_dir / "checkpoints" / f"{name}.ckpt", weights_only=True)
             for name in ("best", "last")}  # fmt: skip
    assert (saved["best"]["epoch"], saved["last"]["epoch"]) == (0, 2)
    assert saved["last"]["global_step"] == 30
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]  # tested best, kept all
    more = run_train_cli([*common, "trainer.max_epochs=4", f"resume={run_dir}"], logs=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    log = (run_dir / "train.log").read_text()
    assert "epoch 4/4" in log and "epoch 3/4" not in log  # only the new epoch was trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3, 4]


def test_resume_past_a_one_cycle_schedule_is_one_sentence_and_keeps_the_run(tiny_root, tmp_path):
    """One epoch of one-cycle (10 steps), then resume= with trainer.max_epochs=2: torch would
    raise a ValueError at step 11, after the resumed run had started."""
    common = [*tiny_overrides(tiny_root), "scheduler=onecycle", "callbacks=minimal", "logger=none"]
    assert run_train_cli(common, logs=tmp_path).returncode == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    kept = {
        name: (run_dir / name).read_bytes() for name in ("metrics.json", "checkpoints/last.ckpt")
    }
    result = run_train_cli([*common, "trainer.max_epochs=2", f"resume={run_dir}"], logs=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line == (
        f"error: {run_dir / 'checkpoints' / 'last.ckpt'} holds a one-cycle schedule of 10 steps, "
        "and torch cannot stretch one once begun: keep trainer.max_epochs=1 (this run would take "
        "20 steps), or train the longer run from the start."
    )
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept


def test_a_continued_run_must_keep_its_schedule_data_and_have_something_to_train(
    tiny_root, tmp_path
):
    """Before: another scheduler's state was merged into the configured one, a changed
    patience or data.val_size was recorded but not (or silently) used, an early-stopped run
    resumed with its patience used up stopped after one epoch, and ckpt_path= with
    trainer.max_epochs reached left a new run folder with no checkpoint, exit 0."""
    base = [*tiny_overrides(tiny_root), "callbacks=minimal", "logger=none", "latent_metrics=false"]
    stopping = ["early_stopping=val", "callbacks.early_stopping.patience=0",
                "callbacks.early_stopping.min_delta=10"]  # fmt: skip
    run = tmp_path / "run"
    first = [*base, "scheduler=plateau", "trainer.max_epochs=3", *stopping]
    started = run_train_cli([*first, f"hydra.run.dir={run}"], logs=tmp_path)  # its .hydra/
    assert started.returncode == 0, started.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2  # stopped early
    last = run / "checkpoints" / "last.ckpt"
    kept = {name: (run / name).read_bytes() for name in ("metrics.json", "checkpoints/last.ckpt")}

    def refusal(overrides, run_dir):
        with pytest.raises(UserError) as refused:
            train(compose_cfg([*base, *overrides], run_dir=run_dir))
        return str(refused.value)

    go_on = [f"resume={run}", "trainer.max_epochs=4"]
    assert refusal([*go_on, "scheduler=plateau", *stopping], run) == (
        f"resume={run} was stopped early at epoch 2 and its early stopping's patience is used "
        "up, so it would stop again after one epoch: add early_stopping=none to train it on "
        "to trainer.max_epochs=4."
    )
    assert refusal([*go_on, "scheduler=cosine"], run).startswith(
        f"{last} holds the state of a plateau learning-rate schedule but this config has "
        "scheduler=cosine, and a resumed schedule keeps the checkpoint's state"
    )
    assert refusal([*go_on, "scheduler=plateau", "model.scheduler.patience=5"], run).startswith(
        f"{last} was trained with model.scheduler.patience=3 but this config has 5, and a "
        "resumed schedule keeps the checkpoint's settings"
    )
    assert refusal([*go_on, "scheduler=plateau", "data.val_size=200"], run).startswith(
        f"resume={run} was trained with data.val_size=100 but this config has 200, and a "
        "resumed run goes on with the data it was trained on"
    )
    new = tmp_path / "new"
    assert refusal([f"ckpt_path={last}", "scheduler=plateau", "trainer.max_epochs=2"], new) == (
        f"ckpt_path={last} has trained 2 epochs and trainer.max_epochs=2 leaves a new run "
        f"nothing to train: add trainer.max_epochs=3 or more, or test it as it is with eval.py "
        f"ckpt_path={last}."
    )
    assert not (new / "checkpoints").exists()
    assert {name: (run / name).read_bytes() for name in kept} == kept
    # The way on that each sentence names: early stopping off, the run's own schedule.
    on = [*base, *go_on, "scheduler=plateau", "early_stopping=none"]
    assert train(compose_cfg(on, run_dir=run))["epochs"] == 4


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
    assert (jobs["z=2"] / "metrics.json").is_file()
    assert (jobs["z=3"] / "metrics.json").is_file()
    failed = json.loads((jobs["z=0"] / "failed.json").read_text())
    assert failed["status"] == "failed"
    assert failed["error"].startswith("UserError: bottleneck=0 is not a positive whole number")


def test_sigint_mid_epoch_leaves_a_loadable_last_checkpoint(tiny_root, tmp_path):
    args = [*tiny_overrides(tiny_root), *SLOW_TINY, "trainer.max_epochs=50"]
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT / "train.py"), *args],
        env={**os.environ, "AE_LOGS_DIR": str(tmp_path)}, cwd=PROJECT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        # Ctrl-C as a terminal delivers it: a test runner's worker may ignore SIGINT, and a
        # child would inherit that and never see the signal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.03)  # somewhere inside the next epoch
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert proc.returncode != 0 and not (run_dir / "metrics.json").exists(), stderr[-2000:]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert 0 <= checkpoint["epoch"] < 49 and "state_dict" in checkpoint


@pytest.mark.slow  # 8 jobs: about a minute on 2 cores
def test_a_sweep_releases_each_job_threads_and_memory(tiny_root, tmp_path):
    probe = tmp_path / "probe.jsonl"
    result = run_train_cli(
        ["-m", *tiny_overrides(tiny_root), "callbacks=minimal", "latent_metrics=false",
         "seed=0,1,2,3,4,5,6,7", "hydra.callbacks.sweep_summary.enabled=false",
         "+hydra.callbacks.probe._target_=signals.JobProbe",
         f"+hydra.callbacks.probe.path={probe}"],
        logs=tmp_path, env=WITH_TESTS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in probe.read_text().splitlines()]
    assert len(records) == 8
    threads = [r["threads"] for r in records]
    assert threads == [threads[0]] * 8, threads  # every event-writer thread closed
    rss = [r["rss"] for r in records]
    assert max(rss[1:]) <= 1.10 * rss[1], rss  # flat after the first job's warm-up
