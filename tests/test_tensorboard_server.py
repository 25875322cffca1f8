"""A real TensorBoard server, on 127.0.0.1, serves what a finished sweep logged."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import run_train_cli, tiny_overrides

FIGURES = ["scatter", "reconstructions", "interpolation", "samples", "manifold"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, data: bytes | None = None):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def sweep_logs(tiny_root, tmp_path):
    result = run_train_cli(["-m", "bottleneck=2,3", *tiny_overrides(tiny_root)], logs=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path / "multiruns"


def test_tensorboard_serves_runs_scalars_images_and_hparams(sweep_logs):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep_logs),
         "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        runs, deadline = [], time.time() + 90
        while time.time() < deadline:
            try:
                runs = get(f"{base}/data/runs")
                scalars = get(f"{base}/data/plugin/scalars/tags")
                if len([r for r in runs if r.endswith("tensorboard")]) >= 2 and scalars:
                    break
            except OSError:
                pass
            time.sleep(1)
        job_runs = [r for r in runs if "/tensorboard" in r and "comparison" not in r]
        assert len(job_runs) == 2, runs
        scalars = get(f"{base}/data/plugin/scalars/tags")
        images = get(f"{base}/data/plugin/images/tags")
        for run in job_runs:
            assert {"train/mse", "val/mse", "test/mse", "test/knn_acc"} <= set(scalars[run])
            expected = FIGURES if "bottleneck-2" in run else FIGURES[:-1]  # manifold: 2-D only
            assert {f"figures/{name}" for name in expected} <= set(images[run])
        comparison = [r for r in images if "comparison" in r]
        assert comparison and "comparison/scatter" in images[comparison[0]]
        experiment = get(f"{base}/data/plugin/hparams/experiment",
                         json.dumps({"experimentName": ""}).encode())  # fmt: skip
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"bottleneck", "lr", "hidden", "batch_size", "seed"} <= hparams
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert "test/mse" in metrics
    finally:
        server.terminate()
        server.wait(timeout=30)
