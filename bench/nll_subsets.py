"""test/nll of one trained run on the first N test images, a fixed random N, and all of them.

MNIST's test file is ordered by writer; this measures how much easier its head is to model
than the whole set (BENCHMARKS.md, "Which test images test/nll is measured on"):

    python bench/nll_subsets.py <run folder> --data-root ../shared/data --samples 1000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ae_lightning.data import load_mnist, to_unit_float
from ae_lightning.latent import evaluation_subset, importance_sampled_nll
from ae_lightning.runfolder import load_autoencoder


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder of a family with a likelihood")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--samples", type=int, default=1000, help="importance samples per image")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000])
    args = parser.parse_args(argv)

    model = load_autoencoder(f"{args.run}/checkpoints/best.ckpt")
    images, _ = load_mnist(args.data_root, train=False, download=False)  # the official 10k
    subsets = {}
    for size in args.sizes:
        subsets[f"first {size}"] = torch.arange(size)
        subsets[f"random {size}"] = evaluation_subset(len(images), size)
    subsets[f"all {len(images)}"] = torch.arange(len(images))
    results = {}
    for name, indices in subsets.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        results[name] = importance_sampled_nll(
            model.log_weights, to_unit_float(images[indices]), args.samples
        )
        print(f"{name}: {results[name]:.2f} nats ({time.perf_counter() - start:.0f} s)")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
