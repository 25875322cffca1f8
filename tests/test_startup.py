"""The command line answers before the heavy stack loads: help, config and completion."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PROJECT, tiny_overrides

HEAVY = ("torch", "pytorch_lightning", "torchvision", "sklearn", "matplotlib")
# Runs a console entry point as a user would, then reports which heavy packages it imported.
WRAPPER = """
import atexit, json, runpy, sys
heavy = {heavy!r}
atexit.register(lambda: print("IMPORTED " + json.dumps([m for m in heavy if m in sys.modules])))
entry, *args = sys.argv[1:]
sys.argv = [entry, *args]
if entry.endswith(".py"):
    runpy.run_path(entry, run_name="__main__")
else:
    module, function = entry.split(":")
    getattr(__import__(module, fromlist=[function]), function)()
"""


def run_light(entry, *args, env=None):
    code = WRAPPER.format(heavy=HEAVY)
    result = subprocess.run(
        [sys.executable, "-c", code, entry, *args],
        capture_output=True, text=True, cwd=PROJECT, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    imported = json.loads(result.stdout.rsplit("IMPORTED ", 1)[1])
    return result.stdout, imported


@pytest.mark.parametrize(
    ("entry", "args", "shown"),
    [
        ("train.py", ["--help"], "== Config groups"),
        ("train.py", ["--cfg", "job"], "bottleneck: 2"),
        ("train.py", ["-sc", "install=bash"], "hydra_bash_completion"),
        ("eval.py", ["--help"], "Usage: ae-eval ckpt_path="),
        ("ae_lightning.cli.train:main", ["--help"], "== Config groups"),
        ("ae_lightning.cli.compare:main", ["--help"], "usage: ae-compare"),
        ("ae_lightning.cli.export:main", ["--help"], "--format {onnx,torchscript}"),
    ],
)
def test_help_and_config_need_no_torch(entry, args, shown):
    stdout, imported = run_light(entry, *args)
    assert shown in stdout
    assert imported == []


@pytest.mark.parametrize("app", ["train"])  # eval's page is its own (test_console)
def test_help_page_is_the_one_hydra_renders(app):
    """`--help` skips Hydra's help machinery, yet prints Hydra's page for the same template."""
    ours = subprocess.run(
        [sys.executable, f"{app}.py", "--help"], capture_output=True, text=True, cwd=PROJECT,
        timeout=120, check=True,
    ).stdout  # fmt: skip
    hydras = subprocess.run(
        [sys.executable, "-c", "import sys; from ae_lightning.cli.train import _train; "
         f"sys.argv = ['{app}.py', '--help', 'hydra.job.name={app}']; _train()"],
        capture_output=True, text=True, cwd=PROJECT, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert ours == hydras
    assert f"Usage: ae-{app} " in ours
    assert "model: contractive, deep, hidden1024, iwae, linear," in ours


def test_help_lists_a_new_option_file_with_no_other_edit(monkeypatch, tmp_path):
    from ae_lightning.cli import help as cli_help

    conf = tmp_path / "conf"
    for group, option in [("model", "linear"), ("model", "mine"), ("hydra/help", "x")]:
        (conf / group).mkdir(parents=True, exist_ok=True)
        (conf / group / f"{option}.yaml").write_text("{}\n")
    (conf / "model" / "notes.txt").write_text("not an option\n")
    (conf / "__pycache__").mkdir()
    monkeypatch.setattr(cli_help, "files", lambda package: conf)
    assert cli_help.config_groups() == {"model": ["linear", "mine"]}


def test_help_flags_are_hydras():
    from ae_lightning.cli.help import wants_help

    assert wants_help(["train.py", "model=vae", "--help"])
    assert wants_help(["train.py", "-h"])
    assert not wants_help(["train.py", "--hydra-help"])
    assert not wants_help(["--help"])  # the program's own name, not an argument


def test_shell_completion_needs_no_torch():
    """What one Tab press runs, after `eval "$(python train.py -sc install=bash)"`."""
    line = "python train.py mod"
    stdout, imported = run_light(
        "train.py", "-sc", "query=bash", env={"COMP_LINE": line, "COMP_POINT": str(len(line))}
    )
    assert "model=" in stdout
    assert imported == []


def test_importing_the_package_needs_no_torch():
    result = subprocess.run(
        [sys.executable, "-c", f"import sys, ae_lightning; print([m for m in {HEAVY!r} "
                               "if m in sys.modules])"],
        capture_output=True, text=True, cwd=PROJECT, timeout=60, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "[]"


def test_export_choices_are_the_exporters_formats():
    from ae_lightning.cli.export import FORMAT_CHOICES
    from ae_lightning.export import FORMATS

    assert sorted(FORMAT_CHOICES) == sorted(FORMATS)


PROBE = """
import gc
import json
import sys
from pytorch_lightning.callbacks import Callback
import watch


class ImportProbe(Callback):
    def __init__(self, out):
        self.out = out

    def on_train_start(self, trainer, pl_module):
        loaded = [m for m in watch.WATCHED if m in sys.modules]
        with open(self.out, "w") as f:
            json.dump({"ours": watch.OURS, "loaded": loaded, "frozen": gc.get_freeze_count()}, f)
"""
# Notes every `import` of a watched package that a module of this package executes, even of
# one already loaded by a library.
WATCH = """
import builtins
WATCHED = ("sklearn", "matplotlib", "torchmetrics")
OURS = []
_import = builtins.__import__


def watching(name, globals=None, locals=None, fromlist=(), level=0):
    importer = str((globals or {}).get("__name__", ""))
    if level == 0 and name.partition(".")[0] in WATCHED and importer.startswith("ae_lightning"):
        OURS.append(f"{importer} imports {name}")
    return _import(name, globals, locals, fromlist, level)


builtins.__import__ = watching
"""


def test_debug_fast_imports_no_figures_or_probes_of_its_own(tiny_root, tmp_path):
    """sklearn, matplotlib and torchmetrics: none imported by this package before training.

    (Lightning itself imports torchmetrics, which imports matplotlib.pyplot when installed.)
    """
    (tmp_path / "watch.py").write_text(WATCH)
    (tmp_path / "import_probe.py").write_text(PROBE)
    out = tmp_path / "importers.json"
    code = "import watch, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
    code += "run_name='__main__')"
    args = ["debug=fast", *tiny_overrides(tiny_root), "+callbacks.probe._target_=import_probe."
            "ImportProbe", f"+callbacks.probe.out={out}"]  # fmt: skip
    env = {
        **os.environ,
        "AE_LOGS_DIR": str(tmp_path / "logs"),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code, str(PROJECT / "train.py"), *args],
        capture_output=True, text=True, cwd=PROJECT, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["ours"] == []
    assert "sklearn" not in seen["loaded"]  # no kNN or probe fits: latent_metrics=false
    assert seen["frozen"] > 100_000  # start-up's objects: out of every collection's walk
