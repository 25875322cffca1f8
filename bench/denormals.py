"""Per-epoch CPU time of `model=hidden1024` with and without flushing denormal floats.

As training goes on, some of the network's activations and Adam's moments fall into the
denormal range, where x86 CPUs compute far slower; flushing them to zero
(`engine.flush_denormals`, on by default on the CPU) keeps epochs steady. Each setting trains
the same model from the same seed for `--epochs` epochs (figures and latent metrics off) and
reports every epoch's time and the test MSE, so the cost and the (lack of) effect on the
result sit side by side. Run it on an idle machine.

    python bench/denormals.py --epochs 10 --json denormals.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from common import PROJECT, train_with

from ae_lightning.cpu import available_cores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="hidden1024")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--data-root", default=str(PROJECT.parent / "shared" / "data"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.device = "cpu"
    threads = available_cores()  # fixed, so that only the float mode differs
    runs_dir = Path(tempfile.mkdtemp(prefix="ae_denormals_"))
    results = {
        "model": args.model, "epochs": args.epochs, "threads": threads,
        "torch": torch.__version__, "processor": platform.processor() or platform.machine(),
        "runs": {},
    }  # fmt: skip
    for flush in (True, False):
        metrics = train_with(
            args, runs_dir / f"flush_{flush}", f"model={args.model}", "callbacks=none",
            "logger=none", "latent_metrics=false", "eval.nll_samples=0",
            f"engine.flush_denormals={str(flush).lower()}", f"engine.threads={threads}",
        )  # fmt: skip
        times = metrics["epoch_times_s"]
        results["runs"]["flush" if flush else "no flush"] = {
            "epoch_times_s": [round(t, 2) for t in times],
            "median_after_first_s": round(statistics.median(times[1:]), 2),
            "last_three_s": round(statistics.mean(times[-3:]), 2),
            "test_mse": round(metrics["test/mse"], 6),
        }
    print("| float mode | epoch times (s) | median after the 1st | mean of the last 3 | test/mse |")
    print("|---|---|---|---|---|")
    for name, row in results["runs"].items():
        shown = ", ".join(f"{t:.1f}" for t in row["epoch_times_s"])
        print(
            f"| {name} | {shown} | {row['median_after_first_s']:.2f} | "
            f"{row['last_three_s']:.2f} | {row['test_mse']:.5f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
