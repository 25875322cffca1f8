"""`logger=wandb`: an offline W&B run, read back from its `.wandb` log with wandb's own records."""

import json
import struct
from pathlib import Path

import pytest

from conftest import run_train_cli, tiny_overrides

BLOCK = 32 * 1024  # the `.wandb` log is LevelDB's log format: 32 KiB blocks of records
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every record of a `.wandb` file, parsed with wandb's own protobuf ``Record``."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B log"
    records, pending, offset = [], b"", 7  # magic, 2-byte identifier, version
    while offset + 7 <= len(data):
        room = BLOCK - offset % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            offset += room
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        payload = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def key_of(item) -> str:
    """A history item's key: plain, or nested (an image's fields) joined with ``/``."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_history_hyperparameters_and_figures(tiny_root, tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "", "NETRC": str(tmp_path / "no-netrc")}
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "logger=wandb", "trainer.max_epochs=2",
         "figures.every_n_epochs=1", "~callbacks.projector"],
        logs=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # offline: no account configured
    (log_file,) = offline.glob("run-*.wandb")

    records = wandb_records(log_file)
    history = [
        {key_of(item): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    val_steps = [row["trainer/global_step"] for row in history if "val/mse" in row]
    assert val_steps == [9, 19]  # the last step of each 10-step epoch, as TensorBoard has it
    assert any("train/mse" in row for row in history)
    final = next(row for row in history if "test/knn_acc" in row)  # the records at the end
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert final["test/knn_acc"] == pytest.approx(metrics["test/knn_acc"])
    assert final["trainer/global_step"] == metrics["global_step"]  # at the final step

    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
    assert config["bottleneck"] == 2 and config["max_epochs"] == 2 and config["model"] == "linear"

    figure_rows = [row for row in history if "figures/scatter/_type" in row]
    # Epoch 1's figures, then epoch 2's and the final ones, which share the last step (W&B
    # keeps one value of a key per step: the final figure).
    assert [row["trainer/global_step"] for row in figure_rows] == [10, metrics["global_step"]]
    assert {row["figures/scatter/_type"] for row in figure_rows} == {"images/separated"}
    images = sorted(p.name for p in (offline / "files" / "media" / "images" / "figures").iterdir())
    names = ("scatter", "reconstructions", "interpolation", "samples", "manifold")
    for name in names:
        assert sum(n.startswith(f"{name}_") and n.endswith(".png") for n in images) >= 2, images
