"""Sample quality (Fréchet distances in a cached classifier's features) and active units."""

import csv
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ae_lightning import markdown
from ae_lightning.api import load_run
from ae_lightning.compare import compare
from ae_lightning.data import MNISTDataModule, to_unit_float
from ae_lightning.errors import UserError
from ae_lightning.latent import active_units, encode_images
from ae_lightning.models import families
from ae_lightning.sample_quality import (
    DigitClassifier,
    class_coverage,
    classifier_path,
    frechet_distance,
    load_classifier,
    prepare_classifier,
    sample_quality,
    train_classifier,
)
from conftest import PROJECT, compose_cfg, run_train_cli, tiny_overrides, write_tiny_mnist

NEW_METRICS = (
    "test/fd_samples", "test/fd_recon", "test/sample_class_entropy",
    "test/sample_top_class_share", "test/classifier_acc", "test/active_units",
)  # fmt: skip


def cache_file(root):
    """Where a run on the data at ``root`` caches its one-epoch classifier."""
    datamodule = MNISTDataModule(root=str(root), download=False)
    images, labels = datamodule.official_train_split()
    return classifier_path(datamodule.cache_dir, images, labels, epochs=1, seed=0)


def test_the_frechet_distance_of_a_set_to_itself_is_zero_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2000, 8, generator=generator) @ torch.randn(8, 8, generator=generator)
    assert abs(frechet_distance(features, features)) < 1e-6
    assert frechet_distance(features, features + 0.5) == pytest.approx(8 * 0.25, rel=1e-4)
    assert frechet_distance(features, features + 1.0) > frechet_distance(features, features + 0.5)
    scaled = frechet_distance(features, 2 * features)  # the same mean-free shape, twice as wide
    assert scaled > 1.0


def test_the_frechet_distance_equals_its_formula_with_a_matrix_square_root():
    """Against scipy's sqrtm on correlated features and a rotated copy: the covariances'
    off-diagonal terms count (a diagonal-only distance would give a quarter of it here)."""
    from scipy.linalg import sqrtm

    generator = torch.Generator().manual_seed(1)
    mixing = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    a = torch.randn(4000, 6, generator=generator, dtype=torch.float64) @ mixing
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    b = a @ rotation + 0.3
    mean_a, mean_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    root = sqrtm(cov_a @ cov_b).real
    exact = float(((mean_a - mean_b) ** 2).sum() + (cov_a + cov_b - 2 * root).trace())
    assert frechet_distance(a.float(), b.float()) == pytest.approx(exact, rel=1e-3)
    var_a, var_b = cov_a.diagonal(), cov_b.diagonal()
    shift = ((mean_a - mean_b) ** 2).sum()
    diagonal_only = float(shift + (var_a + var_b - 2 * (var_a * var_b) ** 0.5).sum())
    assert abs(diagonal_only - exact) > 0.1 * exact  # the case tells the two apart


def test_class_coverage_is_one_for_equal_shares_and_zero_for_one_class():
    even = class_coverage(torch.arange(1000) % 10, classes=10)
    assert even["entropy"] == pytest.approx(1.0) and even["top_share"] == pytest.approx(0.1)
    stuck = class_coverage(torch.full((500,), 3), classes=10)
    assert stuck["entropy"] == pytest.approx(0.0, abs=1e-12) and stuck["top_share"] == 1.0


def test_active_units_count_only_the_code_dimensions_that_vary():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(500, 5, generator=generator)
    codes[:, 1] = 3.0  # dead: the same code for every input
    codes[:, 3] = 0.05 * codes[:, 3]  # variance 0.0025, below Burda et al.'s 0.01
    assert active_units(codes) == 3


def code_layer(model, x):
    """The Linear layer whose output is the family's ``encode(x)`` (its mean code), or None."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, _, out: seen.append((out, m)))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    codes = model.encode(x)
    for hook in hooks:
        hook.remove()
    return next((m for out, m in seen if out is codes), None)


@pytest.mark.parametrize("family", sorted(families()))
def test_active_units_read_each_family_mean_code_with_dead_dimensions(family):
    torch.manual_seed(0)
    model = families()[family](bottleneck=4, hidden=[16]).eval()
    images = (torch.rand(300, 28, 28) * 255).to(torch.uint8)
    layer = code_layer(model, torch.rand(2, 1, 28, 28))
    if layer is None:
        pytest.skip(f"the {family} code is not one Linear layer's output")
    with torch.no_grad():  # dims 0 and 2 ignore the input; 1 and 3 follow it closely
        layer.weight[[0, 2]] = 0.0
        layer.weight[[1, 3]] *= 100.0
    codes = encode_images(model.encode, images)
    assert torch.allclose(codes[:, 0], codes[0, 0]) and torch.allclose(codes[:, 2], codes[0, 2])
    assert active_units(codes) == 2


@pytest.mark.parametrize("family", sorted(families()))
def test_every_family_gets_finite_sample_quality(family, tiny_root):
    torch.manual_seed(0)
    model = families()[family](bottleneck=2, hidden=[8]).eval()
    datamodule = MNISTDataModule(root=str(tiny_root), download=False, val_size=100)
    train_images = datamodule.split("train")[0]
    metrics = sample_quality(
        model, DigitClassifier().eval(), datamodule.split("test"),
        lambda: encode_images(model.encode, train_images),
    )  # fmt: skip
    assert set(metrics) == set(NEW_METRICS) - {"test/active_units"}
    assert all(math.isfinite(value) for value in metrics.values())
    assert 0 <= metrics["test/sample_class_entropy"] <= 1


class MeanOracle(families()["ae"]):
    """A plain AE whose reconstructions are the grey test images a binarised test set was
    drawn from, in order: the Bernoulli means a perfect model would give."""

    def __init__(self, grey: torch.Tensor) -> None:
        super().__init__(bottleneck=2, hidden=[8])
        self.grey, self.given = to_unit_float(grey), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = self.grey[self.given : self.given + len(x)]
        self.given += len(x)
        return means


@pytest.mark.parametrize("binarize", ["static", "dynamic"])
def test_binarised_outputs_are_measured_against_the_grey_test_images(binarize, tiny_root):
    torch.manual_seed(0)
    datamodule = MNISTDataModule(root=str(tiny_root), download=False, val_size=100,
                                 binarize=binarize)  # fmt: skip
    (binary, labels), (grey, grey_labels) = datamodule.split("test"), datamodule.grey_split("test")
    plain = MNISTDataModule(root=str(tiny_root), download=False, val_size=100)
    assert torch.equal(grey, plain.split("test")[0]) and torch.equal(labels, grey_labels)
    assert set(binary.unique().tolist()) == {0, 255} and not torch.equal(binary, grey)
    assert plain.grey_split("test")[0] is plain.split("test")[0]

    classifier = train_classifier(*plain.official_train_split(), 1, 0, torch.device("cpu"))
    train_images = datamodule.split("train")[0]

    def measured(reference):
        model = MeanOracle(grey).eval()
        return sample_quality(
            model, classifier, (binary, labels), lambda: encode_images(model.encode, train_images),
            reference=reference,
        )  # fmt: skip

    against_grey, against_draws = measured(grey), measured(None)
    assert against_grey["test/fd_recon"] == pytest.approx(0, abs=1e-6)  # perfect means
    assert against_draws["test/fd_recon"] > 1e-3  # the binarisation noise, scored as error
    with torch.no_grad():
        accuracy = (classifier(to_unit_float(grey)).argmax(1) == labels).float().mean()
    assert against_grey["test/classifier_acc"] == pytest.approx(float(accuracy))


def test_a_binarised_run_records_its_frechet_distances_against_the_grey_test_images(tmp_path):
    root = write_tiny_mnist(tmp_path / "data")
    result = run_train_cli(
        ["model=vae", "data.binarize=static", *tiny_overrides(root), "callbacks=minimal",
         "eval.classifier_epochs=1", f"hydra.run.dir={tmp_path / 'run'}"],
        logs=tmp_path / "logs",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run = load_run(tmp_path / "run", device="cpu", data_root=root)
    datamodule = run._datamodule()
    classifier = load_classifier(cache_file(root))
    train_images = datamodule.split("train")[0]

    def measured(reference):
        return sample_quality(
            run.model, classifier, datamodule.split("test"),
            lambda: encode_images(run.model.encode, train_images), seed=run.config.seed,
            reference=reference,
        )  # fmt: skip

    against_grey = measured(datamodule.grey_split("test")[0])
    for key in ("test/fd_recon", "test/fd_samples", "test/classifier_acc"):
        assert recorded[key] == pytest.approx(against_grey[key], rel=1e-4), key
    assert recorded["test/fd_recon"] != pytest.approx(measured(None)["test/fd_recon"], rel=1e-2)


def test_the_cached_classifier_is_reused_not_retrained(tiny_root, tmp_path, caplog):
    train_set = MNISTDataModule(root=str(tiny_root), download=False).official_train_split()
    caplog.set_level(logging.INFO, logger="ae_lightning.sample_quality")
    first = prepare_classifier(tmp_path, train_set, epochs=1)
    (path,) = tmp_path.glob("classifier-*.pt")
    assert "Training the sample-quality classifier" in caplog.text and str(path) in caplog.text
    stamp = path.stat().st_mtime_ns
    caplog.clear()
    second = prepare_classifier(tmp_path, train_set, epochs=1)
    assert "Training" not in caplog.text and "(cached)" in caplog.text
    assert path.stat().st_mtime_ns == stamp and list(tmp_path.iterdir()) == [path]
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])
    prepare_classifier(tmp_path, train_set, epochs=2)  # another recipe: a file of its own
    assert len(list(tmp_path.glob("classifier-*.pt"))) == 2


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(tiny_root, tmp_path, caplog):
    train_set = MNISTDataModule(root=str(tiny_root), download=False).official_train_split()
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="ae_lightning.sample_quality"):
        net = prepare_classifier(blocked / "cache", train_set, epochs=1)
    assert isinstance(net, DigitClassifier) and not net.training
    assert "Could not cache the classifier" in caplog.text and "serves this run only" in caplog.text
    assert blocked.read_text() == "not a folder" and list(tmp_path.iterdir()) == [blocked]


def test_training_the_classifier_leaves_the_run_random_stream_alone(tiny_root, tmp_path):
    """Trained, or read from its cache (whose net's initial weights were drawn from the run's
    stream, so a run's result hung on whether the cache existed)."""
    train_set = MNISTDataModule(root=str(tiny_root), download=False).official_train_split()
    torch.manual_seed(123)
    expected = torch.rand(3)
    for _ in ("trained", "cached"):
        torch.manual_seed(123)
        prepare_classifier(tmp_path, train_set, epochs=1)
        assert torch.equal(torch.rand(3), expected)


def test_a_cut_cache_file_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "classifier-0123456789ab.pt"
    torch.save({"state_dict": DigitClassifier().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match=r"cannot be read .*delete it and run again to retrain"):
        load_classifier(path)


class RunsCode:
    """Unpickling this would create ``marker``: a cache file must never be unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_cache_file_that_asks_to_run_code_is_refused_before_training(tmp_path):
    root = write_tiny_mnist(tmp_path / "data")
    path, marker = cache_file(root), tmp_path / "code_ran"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": RunsCode(marker)}, path)
    checksum = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run_train_cli(
        [*tiny_overrides(root), "callbacks=minimal", "eval.classifier_epochs=1"],
        logs=tmp_path / "logs",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"The cached classifier {path} cannot be read" in errors[0]
    assert "eval.sample_quality=false" in errors[0]
    assert not marker.exists()  # never unpickled
    assert hashlib.sha256(path.read_bytes()).hexdigest() == checksum  # left for the user
    assert not (tmp_path / "logs" / "runs").exists() or not any(
        (tmp_path / "logs" / "runs").iterdir()
    )  # refused before training: no run folder


def deflated_bomb(path, inflated_mib: int = 32):
    """A torch.save archive of a classifier-shaped state dict padded with ``inflated_mib`` MiB
    of zeros, re-zipped with deflate: a few tens of kB on disk (the old size check passes),
    ``inflated_mib`` MiB inside torch.load."""
    buffer = io.BytesIO()
    state = DigitClassifier().state_dict() | {"pad": torch.zeros(inflated_mib << 18)}
    torch.save({"state_dict": state}, buffer)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as bomb:
        for info in source.infolist():
            bomb.writestr(info.filename, source.read(info), zipfile.ZIP_DEFLATED, 9)


def test_a_cache_file_that_would_inflate_is_refused_before_torch_load(tmp_path, monkeypatch):
    path = tmp_path / "classifier-0123456789ab.pt"
    deflated_bomb(path)
    assert path.stat().st_size < 1 << 20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was reached"))
    with pytest.raises(
        UserError, match=r"cannot be read \(it would inflate to 33,\d{3},\d{3} bytes"
    ):
        load_classifier(path)


def test_a_link_at_the_cache_name_is_refused_not_followed(tiny_root, tmp_path, monkeypatch):
    """The name is predictable: a link planted there, even to a good classifier, is refused."""
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save({"state_dict": DigitClassifier().state_dict()}, elsewhere)
    images, labels = MNISTDataModule(root=str(tiny_root), download=False).official_train_split()
    path = classifier_path(tmp_path / "cache", images, labels, epochs=1, seed=0)
    path.parent.mkdir()
    path.symlink_to(elsewhere)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was reached"))
    with pytest.raises(UserError, match=r"cannot be read \(a link, which is not followed\)"):
        prepare_classifier(tmp_path / "cache", (images, labels), epochs=1)
    path.unlink()
    os.mkfifo(path)  # reading it would block: refused without a read
    with pytest.raises(UserError, match=r"cannot be read \(not a regular file\)"):
        load_classifier(path)


def test_a_planted_cache_bomb_stops_the_run_before_training(tmp_path):
    root = write_tiny_mnist(tmp_path / "data")
    path = cache_file(root)
    path.parent.mkdir(parents=True)
    deflated_bomb(path, inflated_mib=512)  # the reviewer's: 0.5 MB on disk, 512 MiB inflated
    result = run_train_cli(
        [*tiny_overrides(root), "callbacks=minimal", "eval.classifier_epochs=1"],
        logs=tmp_path / "logs",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"The cached classifier {path} cannot be read (it would inflate to" in line
    assert not (tmp_path / "logs" / "runs").exists() or not any(
        (tmp_path / "logs" / "runs").iterdir()
    )  # refused before training: no run folder


def test_a_bad_classifier_budget_is_refused_in_one_sentence():
    from ae_lightning.config import validate_config

    with pytest.raises(UserError, match=r"eval.classifier_epochs=0 is not a positive whole"):
        validate_config(compose_cfg(["eval.classifier_epochs=0"]))
    validate_config(compose_cfg(["eval.classifier_epochs=0", "eval.sample_quality=false"]))


def test_debug_fast_loads_no_sample_quality_code_and_trains_no_classifier(tmp_path):
    root = write_tiny_mnist(tmp_path / "data")
    script = (
        "import sys\n"
        "from conftest import compose_cfg, tiny_overrides\n"
        "from ae_lightning.train import train\n"
        f"train(compose_cfg([*tiny_overrides({str(root)!r}), 'debug=fast', 'logger=none'],"
        f" run_dir={str(tmp_path / 'run')!r}))\n"
        "print(sorted(m for m in sys.modules if 'sample_quality' in m or 'fidelity' in m))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT / "src"), str(PROJECT / "tests")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert not (root / "MNIST" / "ae_lightning").exists()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not set(NEW_METRICS) & set(metrics)


def test_a_sweep_records_sample_quality_everywhere_with_one_classifier(tmp_path):
    root = write_tiny_mnist(tmp_path / "data")
    result = run_train_cli(
        ["-m", "model=linear,vae", *tiny_overrides(root), "callbacks=minimal",
         "eval.classifier_epochs=1"],
        logs=tmp_path / "logs",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(jobs) == 2
    logs = [(job / "train.log").read_text() for job in jobs]
    trained = [log.count("Training the sample-quality classifier") for log in logs]
    assert sorted(trained) == [0, 1] and any("(cached)" in log for log in logs)
    assert list((root / "MNIST" / "ae_lightning").iterdir()) == [cache_file(root)]

    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert all(math.isfinite(metrics[key]) for key in NEW_METRICS), metrics
        assert 0 <= metrics["test/active_units"] <= metrics["bottleneck"]
        events = EventAccumulator(str(job), size_guidance={"scalars": 0})  # a sweep job's logs
        events.Reload()
        (final,) = events.Scalars("zfinal/test/fd_samples")
        assert final.value == pytest.approx(metrics["test/fd_samples"], rel=1e-5)

    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        metrics = json.loads((tmp_path / row["path"] / "metrics.json").read_text())
        for key in ("test/fd_samples", "test/fd_recon", "test/sample_class_entropy"):
            assert float(row[key]) == pytest.approx(metrics[key])
        assert int(row["test/active_units"]) == metrics["test/active_units"]
    header = markdown.unescape((sweep / "summary.md").read_text().splitlines()[0])
    assert "test/fd_samples" in header and "test/active_units" in header
    out = compare([sweep], tmp_path / "cmp")  # ae-compare's own table
    assert (out / "summary.md").read_text() == (sweep / "summary.md").read_text()


def test_a_read_only_data_folder_caches_the_classifier_in_the_user_cache(
    tiny_root, tmp_path, caplog
):
    train_set = MNISTDataModule(root=str(tiny_root), download=False).official_train_split()
    blocked, fallback = tmp_path / "a_file", tmp_path / "user-cache" / "MNIST"
    blocked.write_text("not a folder")  # as a shared, read-only copy of the data
    with caplog.at_level(logging.INFO, logger="ae_lightning.sample_quality"):
        prepare_classifier([blocked / "cache", fallback], train_set, epochs=1)
        (cached,) = fallback.glob("classifier-*.pt")
        caplog.clear()
        prepare_classifier([blocked / "cache", fallback], train_set, epochs=1)
    assert f"{cached} (cached)" in caplog.text and "Training" not in caplog.text
    assert blocked.read_text() == "not a folder"


def test_a_data_folder_marked_read_only_is_left_alone_even_by_root(tiny_root, tmp_path):
    """A shared copy of the data (mode r-x) gets no cache folder inside it, whoever runs:
    root could write there anyway, so the mode bits decide, not the permission check."""
    shared = tmp_path / "shared"
    (shared / "MNIST").mkdir(parents=True)
    train_set = MNISTDataModule(root=str(tiny_root), download=False).official_train_split()
    fallback = tmp_path / "user-cache" / "MNIST"
    (shared / "MNIST").chmod(0o555)
    try:
        prepare_classifier([shared / "MNIST" / "ae_lightning", fallback], train_set, epochs=1)
        assert list((shared / "MNIST").iterdir()) == []
    finally:
        (shared / "MNIST").chmod(0o755)
    assert len(list(fallback.glob("classifier-*.pt"))) == 1
