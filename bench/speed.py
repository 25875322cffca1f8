"""Epoch time, side by side in one process: reference pipeline, plain loop, this framework.

(a) reference: torchvision MNIST with per-sample ToTensor + Normalize, a shuffled
    DataLoader with 4 workers, and a plain training loop (the reference notebook's pipeline);
(b) plain: a hand-written PyTorch loop over uint8 tensors on the device (the hardware
    reference: what the maths costs with no framework around it), with fused Adam, the
    fastest optimiser step PyTorch has on CPU and GPU alike;
(c) framework: `ae_lightning.train.train(cfg)` with default settings, figures off. Its epoch
    time includes its validation pass and checkpoint writes; the plain loop has neither;
(d) on CUDA only, plain graph: the plain loop with each full step (forward, backward, fused
    capturable Adam) replayed from one captured CUDA graph, the practical floor on a GPU;
(e) on CUDA only, framework eager: (c) with `engine.cuda_graphs=false`, one run, to show
    what the graphs buy.

All three train the same architecture with Adam (lr 1e-3) on the same 55k training images.
(b) and (c) alternate for `--rounds` rounds so that a machine whose speed drifts slows both
alike; each reports the median of all epochs after each run's first (warm-up) epoch. On the
CPU all of them flush denormal floats, as the framework does by default
(`engine.flush_denormals`), so the ratios compare the loops and not the float mode.

`--competitor` adds, on the CPU, the framework's epochs with `engine.threads=auto` and with
each forced thread count, idle and beside one busy process that this script starts and
stops itself (plus the plain loop at torch's default count), for every model.

    python bench/speed.py --device cpu --json speed.json
    python bench/speed.py --device cpu --competitor --json speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from common import PROJECT, compose_config, train_with
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import MNIST

from ae_lightning.cpu import available_cores, flush_denormals
from ae_lightning.data import MNISTDataModule
from ae_lightning.nets import build_encoder_decoder

try:
    import psutil
except ImportError:
    sys.exit("error: bench/speed.py needs psutil, which is not installed: pip install '.[bench]'.")

MODELS = {"linear": [], "hidden1024": [1024]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak RSS of this process (polled every 20 ms) and, on CUDA, peak allocated memory."""
    result: dict[str, float] = {}
    process, stop, peak = psutil.Process(), threading.Event(), [0]

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.02)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_rss_mb"] = round(peak[0] / 2**20, 1)
        if device.type == "cuda":
            result["cuda_max_allocated_mb"] = round(
                torch.cuda.max_memory_allocated(device) / 2**20, 1
            )


def make_model(hidden: list[int], bottleneck: int, device: torch.device) -> torch.nn.Module:
    encoder, decoder = build_encoder_decoder(bottleneck, hidden)
    return torch.nn.Sequential(encoder, decoder).to(device)


def make_adam(model: torch.nn.Module, fused: bool, weight_decay: float = 0.0) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=weight_decay, fused=fused)


def timed_epochs(run_epoch: Callable[[], None], epochs: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        run_epoch()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def reference_pipeline(args, hidden, train_indices, device) -> list[float]:
    """(a) Per-sample PIL -> ToTensor -> Normalize, DataLoader with workers, plain loop."""
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )
    dataset = Subset(MNIST(args.data_root, train=True, transform=transform), train_indices)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.reference_workers
    )
    model = make_model(hidden, args.bottleneck, device)
    optimizer = make_adam(model, fused=False, weight_decay=1e-5)  # the notebook's Adam

    def epoch() -> None:
        for x, _ in loader:
            x = x.to(device)
            loss = F.mse_loss(model(x), x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return timed_epochs(epoch, args.epochs, device)


def plain_loop(args, hidden, images_u8, device) -> list[float]:
    """(b) uint8 tensors on the device, a device-side permutation, slicing, a plain loop."""
    images = images_u8.to(device)
    model = make_model(hidden, args.bottleneck, device)
    optimizer = make_adam(model, fused=True)
    generator = torch.Generator(device=device).manual_seed(0)
    n, batch = len(images), args.batch_size

    def epoch() -> None:
        order = torch.randperm(n, device=device, generator=generator)
        shuffled = images[order]
        for start in range(0, n, batch):
            x = shuffled[start : start + batch].unsqueeze(1).float().div_(255)
            loss = F.mse_loss(model(x), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return timed_epochs(epoch, args.epochs, device)


def plain_graph_loop(args, hidden, images_u8, device) -> list[float]:
    """(d) The plain loop, each full minibatch's step replayed from one CUDA graph.

    PyTorch's whole-network capture: a static input buffer, three warm-up steps on a side
    stream, capturable fused Adam; the last partial batch of an epoch steps eagerly.
    """
    images = images_u8.to(device)
    model = make_model(hidden, args.bottleneck, device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=torch.tensor(1e-3, device=device), fused=True, capturable=True
    )
    generator = torch.Generator(device=device).manual_seed(0)
    n, batch = len(images), args.batch_size
    static_x = torch.empty(batch, 1, 28, 28, device=device)

    def step(x: torch.Tensor) -> None:
        loss = F.mse_loss(model(x), x)
        loss.backward()
        optimizer.step()

    def load(chunk: torch.Tensor) -> None:
        static_x.copy_(chunk.unsqueeze(1)).div_(255)  # uint8 -> float pixels, in place

    load(images[:batch])
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step(static_x)
    torch.cuda.current_stream(device).wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static_x)

    def epoch() -> None:
        order = torch.randperm(n, device=device, generator=generator)
        shuffled = images[order]
        for start in range(0, n, batch):
            chunk = shuffled[start : start + batch]
            if len(chunk) == batch:
                load(chunk)
                graph.replay()
                continue
            optimizer.zero_grad(set_to_none=True)  # fresh grads; the graph keeps its own
            step(chunk.unsqueeze(1).float().div_(255))

    return timed_epochs(epoch, args.epochs, device)


def framework(args, model_name, run_dir, *overrides: str) -> list[float]:
    """(c) `train(cfg)` as `python train.py` runs it: default config, figure callbacks off."""
    metrics = train_with(
        args, run_dir, f"model={model_name}", f"bottleneck={args.bottleneck}", "callbacks=none",
        *overrides,
    )  # fmt: skip
    return metrics["epoch_times_s"]


@contextmanager
def busy_neighbour() -> Iterator[int]:
    """One other process that keeps a core busy (a pure-Python loop) while the block runs."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # running before the first timed step
        yield process.pid
    finally:
        process.terminate()
        process.wait()


def thread_rows(args, name: str, train_images: torch.Tensor) -> dict:
    """Framework epochs with engine.threads=auto and each forced count, idle and contended."""
    counts = list(range(1, min(torch.get_num_threads(), available_cores()) + 1))
    rows: dict = {}
    for situation in ("idle", "contended"):
        with busy_neighbour() if situation == "contended" else contextlib.nullcontext() as pid:
            row: dict = {"competitor_pid": pid} if pid else {}
            for threads in ["auto", *counts]:
                with tempfile.TemporaryDirectory() as run_dir:
                    times = framework(args, name, run_dir, f"engine.threads={threads}")
                row[f"threads_{threads}_epoch_s"] = round(steady([times]), 4)
            row["plain_default_threads_epoch_s"] = round(
                steady([plain_loop(args, MODELS[name], train_images, torch.device("cpu"))]), 4
            )
        best = min(row[f"threads_{n}_epoch_s"] for n in counts)
        row["best_forced_epoch_s"] = best
        row["auto_vs_best"] = round(row["threads_auto_epoch_s"] / best, 3)
        rows[situation] = row
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.machine(),
    ) if Path("/proc/cpuinfo").exists() else platform.machine()  # fmt: skip
    return f"{model} ({os.cpu_count()} cores)"


def steady(runs: list[list[float]]) -> float:
    """Median over runs of the epochs after each run's warm-up one."""
    return statistics.median(t for times in runs for t in times[1:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4, help="incl. 1 warm-up epoch (min 2)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating plain/framework runs per model"
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--bottleneck", type=int, default=2)
    parser.add_argument("--reference-workers", type=int, default=4)
    parser.add_argument(
        "--data-root",
        default=os.environ.get("AE_DATA_ROOT", str(PROJECT / "data")),
        help="torchvision-layout MNIST root (default: $AE_DATA_ROOT or data/)",
    )
    parser.add_argument("--val-size", type=int, default=5000, help="held out, as data.val_size")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--competitor", action="store_true",
        help="CPU: also time engine.threads=auto and each forced count, idle and beside a busy "
        "process (started and stopped here)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: need at least 2 (one warm-up, one measured)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here; use --device cpu")
    if args.competitor and args.device != "cpu":
        parser.error("--competitor measures CPU threads: use it with --device cpu")
    device = torch.device(args.device)
    if device.type == "cpu":
        flush_denormals(True)  # every loop here, as the framework's CPU runs by default
    # Importing Lightning sets this, which makes every Adam step query NVML; a plain
    # script would not have it, so neither does the plain loop here.
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)

    datamodule = MNISTDataModule(root=args.data_root, val_size=args.val_size, download=False)
    datamodule.setup()
    train_images = datamodule.split("train")[0]
    # The same training images as indices into torchvision's dataset, for the reference.
    total = len(train_images) + args.val_size
    order = torch.randperm(total, generator=torch.Generator().manual_seed(datamodule.split_seed))
    train_indices = order[args.val_size :].tolist()
    n = len(train_images)

    results: dict = {
        "device": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "steps_per_call": compose_config().engine.steps_per_call,
        "cuda_graphs": str(compose_config().engine.cuda_graphs),
        "train_images": n,
        "flush_denormals": device.type == "cpu",
        "models": {},
    }
    for name in args.models:
        hidden = MODELS[name]
        row: dict = {}
        with peak_memory(device) as memory:
            reference = reference_pipeline(args, hidden, train_indices, device)
        row["reference_peak_rss_mb"] = memory["peak_rss_mb"]
        plain, graphed, ours, plain_rss, framework_memory = [], [], [], 0.0, {}
        for _ in range(args.rounds):  # alternating, so drift in machine speed hits both
            with peak_memory(device) as memory:
                plain.append(plain_loop(args, hidden, train_images, device))
            plain_rss = max(plain_rss, memory["peak_rss_mb"])
            if device.type == "cuda":
                graphed.append(plain_graph_loop(args, hidden, train_images, device))
            with tempfile.TemporaryDirectory() as run_dir, peak_memory(device) as memory:
                ours.append(framework(args, name, run_dir))
            framework_memory = {k: max(v, framework_memory.get(k, 0.0)) for k, v in memory.items()}
        eager = []
        if device.type == "cuda":  # (e) the framework's own eager steps, once
            with tempfile.TemporaryDirectory() as run_dir:
                eager.append(framework(args, name, run_dir, "engine.cuda_graphs=false"))
        row.update(
            reference_epoch_s=round(steady([reference]), 4),
            plain_epoch_s=round(steady(plain), 4),
            framework_epoch_s=round(steady(ours), 4),
            reference_epochs_s=[round(t, 4) for t in reference],
            plain_epochs_s=[[round(t, 4) for t in run] for run in plain],
            framework_epochs_s=[[round(t, 4) for t in run] for run in ours],
            plain_peak_rss_mb=plain_rss,
            peak_rss_mb=framework_memory["peak_rss_mb"],
        )
        if "cuda_max_allocated_mb" in framework_memory:
            row["cuda_max_allocated_mb"] = framework_memory["cuda_max_allocated_mb"]
        row["framework_vs_plain"] = round(row["framework_epoch_s"] / row["plain_epoch_s"], 3)
        if graphed:
            row["plain_graph_epoch_s"] = round(steady(graphed), 4)
            row["plain_graph_epochs_s"] = [[round(t, 4) for t in run] for run in graphed]
            row["framework_vs_plain_graph"] = round(
                row["framework_epoch_s"] / row["plain_graph_epoch_s"], 3
            )
        if eager:
            row["framework_eager_epoch_s"] = round(steady(eager), 4)
            row["framework_eager_epochs_s"] = [[round(t, 4) for t in run] for run in eager]
            row["graphs_speedup"] = round(
                row["framework_eager_epoch_s"] / row["framework_epoch_s"], 2
            )
        row["speedup_vs_reference"] = round(row["reference_epoch_s"] / row["framework_epoch_s"], 2)
        for key in ("reference", "plain", "framework"):
            row[f"{key}_samples_per_s"] = round(n / row[f"{key}_epoch_s"])
        results["models"][name] = row
        if args.competitor:
            results.setdefault("threads", {})[name] = thread_rows(args, name, train_images)

    print(markdown_table(results))
    if "threads" in results:
        print("\n" + threads_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def markdown_table(results: dict) -> str:
    lines = [
        f"device: {results['device']}, batch {results['batch_size']}, "
        f"{results['train_images']} images, "
        f"median of {results['epochs'] - 1} epochs after 1 warm-up, "
        f"{results['rounds']} alternating rounds of plain and framework, "
        f"framework engine.steps_per_call={results['steps_per_call']}, "
        f"engine.cuda_graphs={results.get('cuda_graphs', 'auto')}",
        "",
    ]
    graphed = any("plain_graph_epoch_s" in row for row in results["models"].values())
    columns = ["model", "reference s/epoch", "plain s/epoch"]
    columns += ["plain graph s/epoch"] if graphed else []
    columns += ["framework s/epoch", "framework / plain"]
    columns += ["framework / plain graph"] if graphed else []
    columns += ["framework eager s/epoch", "eager / framework"] if graphed else []
    columns += ["reference / framework", "framework samples/s", "peak RSS MB"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, row in results["models"].items():
        cells = [name, f"{row['reference_epoch_s']:.3f}", f"{row['plain_epoch_s']:.3f}"]
        cells += [f"{row['plain_graph_epoch_s']:.3f}"] if graphed else []
        cells += [f"{row['framework_epoch_s']:.3f}", f"{row['framework_vs_plain']:.2f}"]
        cells += [f"{row['framework_vs_plain_graph']:.2f}"] if graphed else []
        if graphed:
            cells += [f"{row['framework_eager_epoch_s']:.3f}", f"{row['graphs_speedup']:.1f}"]
        cells += [
            f"{row['speedup_vs_reference']:.1f}", str(row["framework_samples_per_s"]),
            f"{row['peak_rss_mb']:.0f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def threads_table(results: dict) -> str:
    """engine.threads=auto beside each forced count, idle and with a busy neighbour."""
    rows = [(name, situation, row) for name, situations in results["threads"].items()
            for situation, row in situations.items()]  # fmt: skip
    counts = sorted(
        int(key.split("_")[1]) for key in rows[0][2]
        if key.startswith("threads_") and key.split("_")[1].isdigit()
    )  # fmt: skip
    columns = ["model", "machine", "auto s/epoch", *[f"{n} threads s/epoch" for n in counts]]
    columns += ["auto / best", "plain loop (default threads) s/epoch"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, situation, row in rows:
        cells = [name, situation, f"{row['threads_auto_epoch_s']:.3f}"]
        cells += [f"{row[f'threads_{n}_epoch_s']:.3f}" for n in counts]
        cells += [f"{row['auto_vs_best']:.2f}", f"{row['plain_default_threads_epoch_s']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
