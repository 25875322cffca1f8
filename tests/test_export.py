"""`ae-export`: ONNX and TorchScript files that give the PyTorch model's outputs."""

import json

import numpy as np
import pytest
import torch

from ae_lightning.api import load_run
from ae_lightning.cli.export import main as export_main
from ae_lightning.errors import UserError
from ae_lightning.extras import check_command_line, require
from ae_lightning.train import train
from conftest import compose_cfg, tiny_overrides


@pytest.fixture(scope="module")
def run_dir(tiny_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export_run")
    overrides = [
        *tiny_overrides(tiny_root),
        "bottleneck=3",
        "model=hidden1024",
        "model.hidden=[32]",
        "callbacks=minimal",
        "logger=none",
        "latent_metrics=false",
    ]
    train(compose_cfg(overrides, run_dir=run_dir))  # fmt: skip
    return run_dir


def test_onnx_round_trip_matches_pytorch(run_dir, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    export_main([str(run_dir), "--format", "onnx", "--out", str(tmp_path)])
    assert f"-> {tmp_path}" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["encoder"]["input"] == {
        "name": "images", "dtype": "float32", "shape": ["N", 1, 28, 28], "range": [0.0, 1.0]
    }  # fmt: skip
    assert manifest["encoder"]["output"]["shape"] == ["N", 3]

    run = load_run(run_dir, device="cpu")
    pixels = torch.rand(5, 1, 28, 28)  # any batch size, not only the export example's 2
    encoder = ort.InferenceSession(str(tmp_path / manifest["encoder"]["file"]))
    decoder = ort.InferenceSession(str(tmp_path / manifest["decoder"]["file"]))
    (codes,) = encoder.run(None, {"images": pixels.numpy()})
    (decoded,) = decoder.run(None, {"codes": codes})
    assert codes.shape == (5, 3) and decoded.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(codes, run.encode(pixels).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(decoded, run.decode(codes).numpy(), rtol=0, atol=1e-5)


def test_torchscript_round_trip_matches_pytorch(run_dir, tmp_path):
    export_main([str(run_dir / "checkpoints" / "last.ckpt"), "--format", "torchscript",
                 "--out", str(tmp_path)])  # fmt: skip
    run = load_run(run_dir, checkpoint="last", device="cpu")
    pixels = torch.rand(4, 1, 28, 28)
    encoder, decoder = (torch.jit.load(str(tmp_path / f"{n}.pt")) for n in ("encoder", "decoder"))
    codes = encoder(pixels)
    torch.testing.assert_close(codes, run.encode(pixels), rtol=0, atol=1e-5)
    torch.testing.assert_close(decoder(codes), run.decode(codes), rtol=0, atol=1e-5)


def test_missing_run_exits_2_with_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'} does not exist")


def test_missing_extra_is_named():
    with pytest.raises(UserError, match=r"needs the optional package nope.*\[export\]"):
        require("ae_no_such_package.nope", "export", "ae-export --format onnx")
    check_command_line(["logger=tensorboard", "model=deep"])  # nothing optional asked for


def test_a_missing_extra_inside_a_list_of_loggers_is_named(monkeypatch):
    from ae_lightning import extras

    monkeypatch.setattr(extras, "installed", lambda module: module != "mlflow")
    for arg in ("logger=[tensorboard,mlflow]", "'logger=[tensorboard, mlflow]'", "logger=mlflow"):
        with pytest.raises(UserError, match=r"logger=mlflow needs the optional package mlflow"):
            check_command_line([arg.strip("'")])
    check_command_line(["logger=[tensorboard,csv]"])
