"""`pip install .` (not editable) into a fresh venv, then `ae-train` from another folder."""

import json
import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest

from conftest import PROJECT, tiny_overrides


def install(tmp_path: Path, borrow_dependencies: bool) -> Path:
    """A fresh venv holding a wheel-built copy of the project; returns its bin/ folder.

    ``borrow_dependencies``: torch and the rest come from this interpreter's site-packages
    through a .pth file, and only the project itself is installed (seconds, not minutes).
    """
    source = tmp_path / "source"  # what a wheel is built from; the checkout stays untouched
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(PROJECT / "src", source / "src", ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT / name, source / name)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    python = bin_dir / "python"
    args = [str(python), "-m", "pip", "install", "--quiet", str(source)]
    if borrow_dependencies:
        site = subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
        (Path(site) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        args.append("--no-deps")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(args, check=True, env=env, timeout=1800, cwd=tmp_path)
    return bin_dir


def train_elsewhere(bin_dir: Path, tiny_root: Path, tmp_path: Path) -> None:
    work = tmp_path / "somewhere_else"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AE_LOGS_DIR")}
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import ae_lightning; print(ae_lightning.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout  # not the checkout
    result = subprocess.run(
        [str(bin_dir / "ae-train"), "debug=fast", *tiny_overrides(tiny_root)],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (work / "logs" / "runs").iterdir()  # ./logs of the working folder
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 1
    assert (run_dir / "train.log").read_text().count("epoch 1/1") == 1
    example = subprocess.run(  # the README's Python API example, in the fresh venv
        [str(bin_dir / "python"), str(PROJECT / "examples" / "explore.py"), str(run_dir)],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert example.returncode == 0, example.stderr[-3000:]
    assert (work / "explore.png").is_file()
    help_text = subprocess.run([str(bin_dir / "ae-export"), "--help"], cwd=work, env=env,
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "--format {onnx,torchscript}" in help_text


def test_installed_ae_train_runs_from_any_folder(tiny_root, tmp_path):
    train_elsewhere(install(tmp_path, borrow_dependencies=True), tiny_root, tmp_path)


@pytest.mark.slow
def test_full_install_with_dependencies(tiny_root, tmp_path):
    """pip resolves and installs every dependency (torch included): minutes."""
    train_elsewhere(install(tmp_path, borrow_dependencies=False), tiny_root, tmp_path)
