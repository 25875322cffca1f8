"""``ae-export``: arguments parsed before the heavy stack is imported, so ``--help`` is quick."""

from __future__ import annotations

import argparse
import sys

from ae_lightning.errors import UserError

FORMAT_CHOICES = ("onnx", "torchscript")  # the keys of export.FORMATS (a test checks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ae-export",
        description="Write a run's encoder and decoder as two ONNX or TorchScript files, "
        "plus model.json (input/output shapes and pixel range).",
    )
    parser.add_argument("run", help="a run folder, a sweep job folder or a .ckpt file")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="onnx")
    parser.add_argument("--out", help="output folder (default: <run>/export)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    args = parser.parse_args(argv)
    from ae_lightning.export import export_run  # torch and Lightning: only now

    try:
        out = export_run(args.run, args.format, args.out, args.checkpoint)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        print(f"error: writing {err.filename} failed ({err.strerror}): pass --out to a "
              "writable folder.", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    print(f"encoder, decoder and model.json -> {out}")


if __name__ == "__main__":  # `python -m ae_lightning.cli.export`
    main()
