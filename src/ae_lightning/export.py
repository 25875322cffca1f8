"""``ae-export <run> --format onnx|torchscript``: the encoder and the decoder as two files.

Each file takes and gives float32 tensors with a free batch size: the encoder maps pixels
``(N, C, H, W)`` (the run's image shape; MNIST's ``(N, 1, 28, 28)``) in [0, 1] to codes
``(N, z)``, the decoder codes back to pixels in (0, 1).
``model.json`` beside them records these shapes and the pixel range for the app that loads
them.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ae_lightning.api import load_run
from ae_lightning.atomic import check_no_links_out, write_atomic
from ae_lightning.errors import UserError
from ae_lightning.extras import require

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class _Encode(pl.LightningModule):
    """The model's ``encode`` as a module of its own (the mean code for a variational model).

    A LightningModule so that Lightning's public ``to_onnx`` and ``to_torchscript`` apply.
    """

    def __init__(self, model: pl.LightningModule) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)


class _Decode(_Encode):
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes)


def _save_onnx(module: pl.LightningModule, example: torch.Tensor, path: Path, names) -> None:
    """torch.export-based ONNX (the exporter's default) in one file, any batch size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter internals, not the user's concern
        module.to_onnx(
            path, example, input_names=[names[0]], output_names=[names[1]],
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
            external_data=False,
        )  # fmt: skip


def _save_torchscript(module: pl.LightningModule, example: torch.Tensor, path: Path, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's own deprecation notice
        module.to_torchscript(path, method="trace", example_inputs=example)


def export_run(
    run_path: str | Path, fmt: str = "onnx", out: str | Path | None = None, checkpoint: str = "best"
) -> Path:
    """Write ``encoder<ext>``, ``decoder<ext>`` and ``model.json`` into ``out``; return ``out``."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt} is not a format: use onnx or torchscript.")
    if fmt == "onnx":
        require("onnx", "export", "ae-export --format onnx")
        require("onnxscript", "export", "ae-export --format onnx")
    run = load_run(run_path, checkpoint=checkpoint, device="cpu")
    folder = run.path if run.path.is_dir() else run.checkpoint.parent
    if out is None:  # inside the received folder: no link there may carry the files out
        check_no_links_out(folder, f"ae-export {run_path}")
        out = folder / "export"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    z = run.bottleneck
    pixels = torch.rand(2, *run.image_shape)
    codes = run.model.encode(pixels).detach()
    save = _save_onnx if fmt == "onnx" else _save_torchscript
    ext = FORMATS[fmt]
    with torch.no_grad(), tempfile.TemporaryDirectory() as staging:
        # The exporters write by path: staged outside, then put in place by write_atomic.
        for module, example, name, names in (
            (_Encode(run.model), pixels, f"encoder{ext}", ("images", "codes")),
            (_Decode(run.model), codes, f"decoder{ext}", ("codes", "images")),
        ):
            save(module.eval(), example, Path(staging, name), names)
            write_atomic(out / name, Path(staging, name).read_bytes())
    pixel = {"dtype": "float32", "shape": ["N", *run.image_shape], "range": [0.0, 1.0]}
    code = {"dtype": "float32", "shape": ["N", z]}
    manifest: dict[str, Any] = {
        "format": fmt,
        "encoder": {"file": f"encoder{ext}", "input": {"name": "images", **pixel},
                    "output": {"name": "codes", **code}},
        "decoder": {"file": f"decoder{ext}", "input": {"name": "codes", **code},
                    "output": {"name": "images", **pixel}},
        "bottleneck": z,
        "pixels": "float32 in [0, 1] (uint8 / 255); the decoder ends in a sigmoid",
        "checkpoint": str(run.checkpoint),
    }  # fmt: skip
    write_atomic(out / "model.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return out


if __name__ == "__main__":  # the CLI lives above this module, in cli/: say where, run nothing
    raise SystemExit(
        "error: `python -m ae_lightning.export` is now `python -m ae_lightning.cli.export` "
        "(or `ae-export`): run that with the same arguments."
    )
