"""Shared fixtures: tiny MNIST-format IDX files, the real MNIST copy, Hydra composition."""

from __future__ import annotations

import gc
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

PROJECT = Path(__file__).resolve().parents[1]
# The sample-quality classifier's fallback cache (a read-only data copy cannot hold it): one
# per test session, shared by its subprocesses, never the user's own ~/.cache.
os.environ.setdefault("AE_CACHE_DIR", tempfile.mkdtemp(prefix="ae_test_cache_"))

CONF = PROJECT / "src" / "ae_lightning" / "conf"
TINY_TRAIN, TINY_TEST = 600, 200


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every test module is imported: freeze that heap, as the CLI does after its imports, so
    each in-process job's collection (``release``) walks only the objects tests made since."""
    gc.freeze()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format MNIST ships in (big-endian header)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def tiny_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten blurry 'digit' prototypes plus noise: structure a model can learn in seconds."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    prototypes = []
    for digit in range(10):
        angle = digit * np.pi / 10
        stroke = np.abs((xx - 14) * np.cos(angle) + (yy - 14) * np.sin(angle)) < 2.5
        ring = np.abs(np.hypot(xx - 14, yy - 14) - 4 - digit * 0.8) < 1.5
        prototypes.append(np.where(stroke | (ring & (digit % 2 == 1)), 1.0, 0.0))
    labels = rng.integers(0, 10, size=n)
    images = np.stack([prototypes[d] for d in labels]) * rng.uniform(0.7, 1.0, (n, 1, 1))
    images = np.clip(images + rng.normal(0, 0.05, images.shape), 0, 1)
    return (images * 255).round().astype(np.uint8), labels.astype(np.uint8)


def write_tiny_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", TINY_TRAIN, 1), ("t10k", TINY_TEST, 2)):
        images, labels = tiny_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding tiny MNIST-format files, read by the real torchvision loader."""
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST: $AE_DATA_ROOT or ../shared/data. Skips if absent, unless required."""
    candidates = [os.environ.get("AE_DATA_ROOT"), str(PROJECT.parent / "shared" / "data")]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
            return Path(candidate).resolve()
    if os.environ.get("AE_REQUIRE_MNIST") == "1":
        pytest.fail(f"AE_REQUIRE_MNIST=1 but no MNIST under any of {candidates}")
    pytest.skip("real MNIST not found (set AE_DATA_ROOT to a torchvision-layout copy)")


def tiny_overrides(root: Path) -> list[str]:
    """Overrides that make a run take seconds on the tiny data."""
    return [
        f"data.root={root}",
        "data.download=false",
        "data.val_size=100",
        "data.batch_size=50",
        "data.eval_batch_size=100",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=5",
        "engine.threads=1",  # one fixed count: runs compared bit for bit stay identical
    ]


def compose_cfg(overrides: Sequence[str] = (), run_dir: Path | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would see, composed with Hydra's API."""
    extra = [f"run_dir={run_dir}"] if run_dir is not None else ["run_dir=unused"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, *extra])


def run_train_cli(
    args: Sequence[str],
    logs: Path,
    env: dict[str, str] | None = None,
    timeout: int = 600,
    script: str = "train.py",
) -> subprocess.CompletedProcess:
    """`python train.py ARGS` (or another entry script) as a user runs it, logs in ``logs``."""
    full_env = {**os.environ, "AE_LOGS_DIR": str(logs), "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(PROJECT / script), *args],
        cwd=PROJECT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
