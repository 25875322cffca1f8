"""Process policy: SIGTERM in every phase, sweep locks, quoted commands, escaped Markdown,
and one sentence for every bad value (exit 2, no traceback, no folder left behind)."""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
from filelock import FileLock
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugin_util import markdown_to_safe_html

from ae_lightning import markdown
from ae_lightning.compare import SEED_STD_COLUMNS, SUMMARY_COLUMNS, write_summary
from ae_lightning.naming import job_dirname, short_name
from conftest import PROJECT, run_train_cli, tiny_overrides

SIGTERM_EXIT = 143
TESTS_ON_PATH = {
    "PYTHONPATH": os.pathsep.join([str(PROJECT / "tests"), os.environ.get("PYTHONPATH", "")])
}
# Markup and shell syntax in one folder name: none of it may run, or render.
HOSTILE = "r;touch X;$(touch Y)'q|<img src=x>**e**"


def checksums(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_one_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tiny_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("policy_logs")
    result = run_train_cli([*tiny_overrides(tiny_root), "callbacks=minimal"], logs=logs)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (logs / "runs").iterdir()
    return run_dir


def run_printed(command, cwd):
    """The printed command as a user pastes it into bash (``python`` is this interpreter)."""
    script = f'python() {{ "$PY" "$PROJECT/$1" "${{@:2}}"; }}; {command}'
    env = {**os.environ, **TESTS_ON_PATH, "PY": sys.executable, "PROJECT": str(PROJECT),
           "AE_LOGS_DIR": str(cwd / "logs")}  # fmt: skip
    return subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


PHASES = {  # hook of tests/signals.py's SigtermAt -> words of the interrupted line
    "setup": "SIGTERM before training started; nothing was trained: run again: ",
    "on_test_batch_end": "the test (or its figures) was interrupted: complete the run",
    "on_test_end": "the test (or its figures) was interrupted: complete the run",
    "latent_quality": "the latent metrics and records were interrupted: complete the run",
}


@pytest.mark.parametrize("hook", list(PHASES))
def test_sigterm_in_each_phase_is_143_and_the_printed_command_completes_the_run(
    hook, tiny_root, tmp_path
):
    run_dir = tmp_path / "logs" / HOSTILE
    log = tmp_path / "last_before_sigterm"
    args = [
        *tiny_overrides(tiny_root), "callbacks=minimal", f'hydra.run.dir="{run_dir}"',
        "+callbacks.kill._target_=signals.SigtermAt", f"+callbacks.kill.hook={hook}",
    ]  # fmt: skip
    env = {**TESTS_ON_PATH, "AE_TEST_SIGTERM_LOG": str(log)}
    stopped = run_train_cli(args, logs=tmp_path / "logs", env=env)
    assert stopped.returncode == SIGTERM_EXIT, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    (line,) = [ln for ln in stopped.stderr.splitlines() if ln.startswith("interrupted: ")]
    assert PHASES[hook] in line
    command = line.split(" with: ")[-1] if hook != "setup" else line.split("run again: ")[-1]
    words = shlex.split(command)  # one word per override, the folder's quote included
    assert words[:2] == ["python", "train.py"]
    if hook != "setup":
        assert f"resume={run_dir}" in words
        last = run_dir / "checkpoints" / "last.ckpt"
        before = hashlib.sha256(last.read_bytes()).hexdigest()
        assert before == log.read_text()  # the SIGTERM saved nothing over the trained state
        assert json.loads((run_dir / "interrupted.json").read_text())["status"] == "interrupted"

    done = run_printed(command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "X").exists() and not (tmp_path / "Y").exists()  # nothing ran
    assert json.loads((run_dir / "metrics.json").read_text())["test/mse"] > 0
    assert not (run_dir / "interrupted.json").exists()
    if hook != "setup":
        assert hashlib.sha256(last.read_bytes()).hexdigest() == before  # only re-tested
    if hook == "on_test_batch_end":  # the folder name reaches the Text tab: escaped
        events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
        events.Reload()
        tensors = events.Tensors("run/metrics/text_summary")  # torch's add_text tag
        (text,) = [e.tensor_proto.string_val[0].decode() for e in tensors]
        html = markdown_to_safe_html(text)
        assert "<img" not in html and "&lt;img src=x&gt;" in html and "**e**" in html
        row = next(r for r in html.split("<tr>") if "test_checkpoint" in r)
        assert row.count("<td>") == 2  # the `|` of the folder split no cell


def test_a_second_sweep_into_a_sweep_folder_in_use_is_refused_and_writes_nothing(
    tiny_root, tmp_path
):
    sweep = tmp_path / "sweep"
    job = sweep / "bottleneck=2"
    job.mkdir(parents=True)
    (job / "metrics.json").write_text('{"test/mse": 0.1}')
    with FileLock(sweep / "sweep.lock"):  # the first sweep, still running
        before = checksums(sweep)
        result = run_train_cli(
            ["-m", *tiny_overrides(tiny_root), "bottleneck=2,3", f"hydra.sweep.dir={sweep}"],
            logs=tmp_path / "logs",
        )
    line = assert_one_error(result)
    assert line == (
        f"error: The sweep folder {sweep} is in use by another process: wait for it to "
        "finish, or choose another folder."
    )
    assert checksums(sweep) == before and sorted(p.name for p in sweep.iterdir()) == [
        "bottleneck=2", "sweep.lock"
    ]  # fmt: skip


def test_a_later_sweep_into_the_same_folder_never_takes_a_job_folder(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"varying": ["seed"]}))
    for taken in ("seed=1", "seed=1,job=7"):
        (tmp_path / taken).mkdir()
    assert job_dirname(str(tmp_path), 7, ["seed=1"]) == "seed=1,job=7.2"


def test_folder_names_keep_signs():
    assert short_name([("figures.every_n_epochs", "-1")]) == "every_n_epochs=-1"
    assert short_name([("model.hidden", "[-1, 2]")]) == "hidden=-1-2"


def test_summary_md_and_its_text_tab_show_overrides_as_typed(tmp_path):
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(run="+note=a|b <img src=x> **bold** `code` _u_", status="ok")
    write_summary([row], tmp_path)
    text = (tmp_path / "summary.md").read_text()
    html = markdown_to_safe_html(text)
    cells = html.split("<tbody>")[1].count("<td>")
    hidden = ("overrides", "path", *SEED_STD_COLUMNS)  # the spread of a mean: CSV only
    assert cells == len([c for c in SUMMARY_COLUMNS if c not in hidden])
    assert "<img" not in html and "<strong>" not in html and "<code>" not in html
    assert markdown.unescape(text.splitlines()[2].split(" | ")[0][2:]) == row["run"]


def deleted_best(run, tmp_path):
    copy = tmp_path / "copied_run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "best.ckpt").unlink()
    (copy / "metrics.json").unlink()  # not finished: the test is still to come
    return [f"resume={copy}"]


def plain(*overrides):
    return lambda run, tmp_path: list(overrides)


CONFIG_CASES = {
    "bottleneck=3000000": (plain("bottleneck=3000000"), "has a layer of 3000000 units"),
    "bottleneck=1000000000": (plain("bottleneck=1000000000"), "has a layer of 1000000000"),
    "vae, 1e8 parameters": (plain("model=vae", "bottleneck=60000"), "more than the limit of"),
    "trainer.precision=64": (plain("trainer.precision=64"), "trainer.precision=64 is not a"),
    "step_size=0": (plain("scheduler=step", "model.scheduler.step_size=0"),
                    "model.scheduler.step_size=0 is not a positive whole number"),
    "projection=nosuch": (plain("callbacks=default", "callbacks.scatter.projection=nosuch"),
                          "callbacks.scatter.projection='nosuch' is not a projection"),
    "pair=[0,99999]": (plain("callbacks=default", "callbacks.interpolation.pair=[0,99999]"),
                       "callbacks.interpolation.pair=[0, 99999] is not two different"),
    "figures.every_n_epochs=-1": (plain("figures.every_n_epochs=-1"),
                                  "figures.every_n_epochs=-1 is not a whole number"),
    "unquoted non-ASCII hydra.run.dir": (
        lambda run, tmp_path: [f"hydra.run.dir={tmp_path}/rün"],
        "has characters Hydra cannot read unquoted: quote the folder"),
    "quoted hydra.run.dir='/proc/x/run'": (
        plain("hydra.run.dir='/proc/x/run'"), "hydra.run.dir=/proc/x/run cannot be written"),
    "a _target_ that does not exist": (
        plain("model._target_=nosuch.Class"), "model cannot be built (Error locating target"),
    "a misspelt model key": (
        plain("+model.hiden=[512]"),
        "model.hiden is not a setting of Autoencoder: did you mean model.hidden?"),
    "a word where a number goes": (
        plain("model.dropout=abc"),
        "model.dropout='abc' is not a number: use e.g. model.dropout=0.0 (its default)."),
    "best.ckpt deleted, resume with no epoch left": (
        deleted_best, "best.ckpt, which is missing: put it back, or add test_ckpt=last"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_each_bad_value_is_one_sentence_before_training(case, finished_run, tiny_root, tmp_path):
    setup, expected = CONFIG_CASES[case]
    args = setup(finished_run, tmp_path)
    copy = tmp_path / "copied_run"
    before = checksums(copy) if copy.is_dir() else None
    logs = tmp_path / "logs"
    result = run_train_cli([*tiny_overrides(tiny_root), "callbacks=minimal", *args], logs=logs)
    assert expected in assert_one_error(result)
    assert not list(logs.glob("runs/*")), list(logs.glob("runs/*"))  # no folder left behind
    assert not (tmp_path / "rün").exists() and not (PROJECT / "'").exists()
    if before is not None:  # a refused resume leaves the run as it was (Hydra's log aside)
        after = checksums(copy)
        assert {k: v for k, v in after.items() if "hydra" not in k and k != "train.log"} == {
            k: v for k, v in before.items() if "hydra" not in k and k != "train.log"
        }


def test_resuming_a_finished_run_says_so_and_changes_nothing(finished_run, tiny_root, tmp_path):
    before = checksums(finished_run)
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "callbacks=minimal", f"resume={finished_run}"],
        logs=tmp_path / "logs",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith(
        f"{finished_run} has finished (its metrics.json is complete after 1 epoch): nothing "
        "to resume; to train it further, add trainer.max_epochs=2 or more."
    )
    assert "Traceback" not in result.stderr
    assert checksums(finished_run) == before
