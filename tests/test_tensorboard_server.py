"""A real TensorBoard server, on 127.0.0.1, serves what a finished sweep logged."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import run_train_cli, tiny_overrides

FIGURES = ["scatter", "reconstructions", "interpolation", "samples", "manifold"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, data: bytes | None = None, raw: bool = False):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return body if raw else json.loads(body)


@pytest.fixture
def sweep_logs(tiny_root, tmp_path):
    result = run_train_cli(
        ["-m", "model=linear,hidden1024", "bottleneck=2", *tiny_overrides(tiny_root)],
        logs=tmp_path,
    )
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
    (sweep,) = sweep_logs.iterdir()
    jobs = {"linear", "hidden1024"}  # what the sweep varies, nothing else, in short words
    try:
        runs, deadline = [], time.time() + 90
        while time.time() < deadline:
            try:
                runs = get(f"{base}/data/runs")
                scalars = get(f"{base}/data/plugin/scalars/tags")
                if jobs <= {r.split("/")[-1] for r in runs} and len(scalars) >= 2:
                    break
            except OSError:
                pass
            time.sleep(1)
        prefix = f"{sweep.name}/"
        assert {r.removeprefix(prefix) for r in runs} == {*jobs, "comparison"}, runs
        scalars = get(f"{base}/data/plugin/scalars/tags")
        images = get(f"{base}/data/plugin/images/tags")
        final = ("test/mse", "test/knn_acc", "val/best_mse", "time/train_s")
        final = [f"zfinal/{tag}" for tag in final]  # the one-point group sorts last
        for job in jobs:
            run = prefix + job
            assert {"train/mse", "val/mse", *final} <= set(scalars[run])
            assert {f"views/{name}" for name in FIGURES} <= set(images[run])
            # Time Series opens the first two tag groups by name: the curves, nothing else.
            groups = sorted({t.split("/")[0] for t in [*scalars[run], *images[run]]})
            assert groups[:2] == ["train", "val"] and "epoch" not in groups, groups
            # Final metrics once, at the run's last step: one point per run, never at 0.
            global_step = json.loads((sweep / job / "metrics.json").read_text())["global_step"]
            for tag in final:
                points = get(f"{base}/data/plugin/scalars/scalars?{urlencode(run=run, tag=tag)}")
                assert [step for _, step, _ in points] == [global_step], (run, tag)
            # The Projector draws only with 3+ columns: 2-D codes come padded with zeros.
            (embedding,) = get(f"{base}/data/plugin/projector/info?{urlencode(run=run)}")[
                "embeddings"
            ]
            name = embedding["tensorName"]
            labels = (
                get(
                    f"{base}/data/plugin/projector/metadata?{urlencode(run=run, name=name)}",
                    raw=True,
                )
                .decode()
                .split()
            )
            tensor = get(
                f"{base}/data/plugin/projector/tensor?{urlencode(run=run, name=name)}", raw=True
            )
            assert len(tensor) == 4 * 3 * len(labels) and set(labels) <= set("0123456789")
        comparison = images[prefix + "comparison"]
        assert "versus/scatter" in comparison  # sorted after train/ and val/

        experiment = get(f"{base}/data/plugin/hparams/experiment",
                         json.dumps({"experimentName": ""}).encode())  # fmt: skip
        # Only the knobs that differ, lr through the models' own configs (`hidden` and
        # `recipe` say the same as `model`): the tab ticks these and no constant one.
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert hparams == {"model", "architecture", "lr"}, hparams
        metrics = {m["displayName"]: m["name"]["tag"] for m in experiment["metricInfos"]}
        assert metrics["test/mse"] == "zfinal/test/mse" and "time/train_s" in metrics
        layout = get(f"{base}/data/plugin/custom_scalars/layout")
        charts = [c["multiline"]["tag"] for c in layout["category"][0]["chart"]]
        assert [r"^(train|val)/mse$"] in charts  # train and val MSE of every run, one chart
        assert "versus/final_metrics" in comparison  # one bar per run: readable at card size
    finally:
        server.terminate()
        server.wait(timeout=30)


def urlencode(**params: str) -> str:
    return urllib.parse.urlencode(params)
