"""``ae-compare``: arguments parsed before the heavy stack is imported, so ``--help`` is quick."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ae_lightning.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ae-compare", description="Compare autoencoder runs side by side."
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders and/or sweep folders")
    parser.add_argument("--out", type=Path, default=None, help="default: <sweep>/comparison")
    parser.add_argument(
        "--data-root", default=None,
        help="the data's folder (default: $AE_DATA_ROOT, else ./data; never a run's own)",
    )  # fmt: skip
    parser.add_argument(
        "--sampler",
        default="auto",
        help="auto (each model's own prior or fitted sampler), gaussian, normal, gmm or box",
    )
    parser.add_argument("--seed", type=int, default=0, help="the interpolation pair and samples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ae_lightning.compare import compare  # torch and the models: only now

    try:
        out = compare(args.runs, args.out, args.data_root, args.sampler, args.seed)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"comparison written to {out}")
    print((out / "summary.md").read_text())


if __name__ == "__main__":  # `python -m ae_lightning.cli.compare`
    main()
