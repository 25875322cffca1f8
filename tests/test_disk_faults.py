"""A full disk, a read-only one or an I/O error: one sentence, no half files, results kept."""

import errno
import io
import json
import os
import subprocess

import pytest
from pytorch_lightning.loggers import TensorBoardLogger

from ae_lightning import atomic
from ae_lightning.policy import run_cli
from conftest import compose_cfg, run_train_cli, tiny_overrides


class FullDiskFile(io.BytesIO):
    """A file that takes a few bytes, then fails the way a full disk does."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def write(self, data):
        with open(self.path, "wb") as f:
            f.write(bytes(data)[:100])  # half a file on disk
        raise OSError(errno.ENOSPC, "No space left on device")


def run(cfg, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_cli(cfg)
    err = capsys.readouterr().err
    return stopped.value.code, [line for line in err.splitlines() if line.startswith("error:")]


def test_a_checkpoint_on_a_full_disk_is_one_sentence_and_no_tmp(tiny_root, tmp_path, capsys,
                                                                 monkeypatch):  # fmt: skip
    def full_disk_open(path, mode="r", *args, **kwargs):
        name = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else str(path)
        full = "w" in mode and ".ckpt" in name  # run_info.json, written first, fits
        return FullDiskFile(path) if full else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", full_disk_open, raising=False)  # every checkpoint
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*tiny_overrides(tiny_root), "callbacks=minimal"], run_dir=run_dir)
    code, lines = run(cfg, capsys)
    assert code == 1
    (line,) = lines
    assert line.startswith(f"error: Writing {run_dir}/checkpoints/")
    assert "(No space left on device): free space on that disk" in line
    assert f"resume={run_dir}" in line
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EIO])
def test_a_failed_write_after_the_test_keeps_metrics_json(code, tiny_root, tmp_path, capsys,
                                                           monkeypatch):  # fmt: skip
    def fails(self, *args, **kwargs):
        raise OSError(code, "simulated", str(tmp_path / "run" / "tensorboard" / "events"))

    monkeypatch.setattr(TensorBoardLogger, "log_hyperparams", fails)
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "callbacks=minimal", "latent_metrics=false"], run_dir=run_dir
    )
    exit_code, (line,) = run(cfg, capsys)
    assert exit_code == 1
    assert "metrics.json and the last complete checkpoint are kept; then continue with: " in line
    assert json.loads((run_dir / "metrics.json").read_text())["test/mse"] > 0
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MB file system, where the test may mount one (root on Linux)."""
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the fault-injection tests cover this")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk(tiny_root, tiny_tmpfs, tmp_path):
    run_dir = tiny_tmpfs / "run"
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "model=deep", "trainer.max_epochs=2",
         f"hydra.run.dir={run_dir}"],
        logs=tmp_path / "logs",
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "(No space left on device): free space on that disk" in line
    assert not list(run_dir.rglob("*.tmp"))
