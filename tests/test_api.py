"""`ae_lightning.load_run` on a tiny trained run: shapes, dtypes, identities, refusals."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ae_lightning
from ae_lightning.errors import UserError
from conftest import PROJECT, run_train_cli, tiny_overrides


@pytest.fixture(scope="module")
def run_dir(tiny_root, tmp_path_factory):
    logs = tmp_path_factory.mktemp("api_logs")
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "bottleneck=3", "callbacks=minimal", "logger=none",
         "latent_metrics=false"],
        logs=logs,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (logs / "runs").iterdir()
    return run


@pytest.fixture(scope="module")
def run(run_dir, tiny_root):
    # where the data is on this machine: a run's own data.root is never read
    return ae_lightning.load_run(run_dir, data_root=tiny_root)


def test_load_run_reads_model_config_and_metrics(run, run_dir):
    assert run.checkpoint == run_dir / "checkpoints" / "best.ckpt"
    assert run.bottleneck == 3 and run.config.bottleneck == 3
    assert run.metrics["test/mse"] > 0
    assert not run.model.training
    last = ae_lightning.load_run(run_dir / "checkpoints" / "last.ckpt")
    assert last.checkpoint.name == "last.ckpt" and last.config.bottleneck == 3


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,  # uint8 tensor (N, 28, 28)
        lambda x: x.numpy(),  # uint8 numpy
        lambda x: x.float().div(255).unsqueeze(1),  # float (N, 1, 28, 28)
        lambda x: x.float().div(255).reshape(len(x), 784).numpy(),  # float numpy (N, 784)
    ],
)
def test_every_input_form_gives_the_same_codes(run, make):
    images, _ = run.test_images()
    assert images.dtype == torch.uint8 and images.shape[1:] == (28, 28)
    codes = run.encode(make(images[:7]))
    assert codes.shape == (7, 3) and codes.dtype == torch.float32
    torch.testing.assert_close(codes, run.encode(images[:7]))


def test_reconstruct_is_decode_of_encode(run):
    images, _ = run.test_images()
    out = run.reconstruct(images[:5])
    assert out.shape == (5, 1, 28, 28) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    torch.testing.assert_close(out, run.decode(run.encode(images[:5])), rtol=0, atol=0)
    assert run.decode(np.zeros(3, dtype=np.float32)).shape == (1, 1, 28, 28)


def test_interpolation_ends_are_the_reconstructions(run):
    images, _ = run.test_images()
    line = run.interpolate(images[0], images[1], steps=6)
    assert line.shape == (6, 1, 28, 28)
    ends = run.reconstruct(images[:2])
    torch.testing.assert_close(line[0], ends[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(line[-1], ends[1], rtol=0, atol=1e-6)


def test_samples_are_images_and_repeat_with_the_seed(run):
    samples = run.sample(5, sampler="gaussian", seed=1)
    assert samples.shape == (5, 1, 28, 28)
    torch.testing.assert_close(samples, run.sample(5, sampler="gaussian", seed=1))
    train_images, _ = run.train_images()
    assert len(train_images) == 600 - 100  # the run's own val_size=100 held out


def test_the_prior_sampler_decodes_the_models_own_prior():
    vae = ae_lightning.load_run(PROJECT / "tests" / "data" / "main_vae.ckpt")
    expected = vae.decode(vae.model.prior_sample(4, seed=2))
    torch.testing.assert_close(vae.sample(4, sampler="prior", seed=2), expected)
    codes = torch.randn(4, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(expected, vae.decode(codes.float()))  # N(0, I) for a VAE


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(28, 28, dtype=torch.uint8), r"shape \(28, 28\).*x\[None\]"),
        (torch.zeros(2, 3, 28), r"shape \(2, 3, 28\): pass \(N, 28, 28\)"),
        (torch.full((2, 784), 255.0), r"from 255 to 255: .*divide 0-255 values by 255"),
        (np.full((2, 784), -0.5, dtype=np.float32), r"from -0.5 to -0.5: pixels must lie in"),
        (np.zeros((2, 784), dtype=np.int64), r"dtype torch.int64: pass uint8"),
        ([[0.0] * 784], r"is a list: pass a numpy array or a torch tensor"),
    ],
)
def test_bad_images_are_refused_in_one_sentence(run, bad, message):
    with pytest.raises(UserError, match=message):
        run.encode(bad)


def test_other_refusals(run, run_dir, tmp_path):
    with pytest.raises(UserError, match=r"shape \(1, 2\).*\(N, 3\)"):
        run.decode(torch.zeros(1, 2))
    with pytest.raises(UserError, match="sampler='vamp' is not a sampler"):
        run.sample(2, sampler="vamp")
    with pytest.raises(UserError, match="ae model has none: use sampler='gaussian'"):
        run.sample(2, sampler="prior")  # a plain autoencoder has no prior to draw from
    with pytest.raises(UserError, match="does not exist"):
        ae_lightning.load_run(tmp_path / "nowhere")
    with pytest.raises(UserError, match="is a sweep with 1 jobs, not one run"):
        ae_lightning.load_run(run_dir.parent)
    fake = tmp_path / "fake.ckpt"
    fake.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not an ae-lightning checkpoint"):
        ae_lightning.load_run(fake)


def test_import_stays_light():
    code = "import sys, ae_lightning; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_example_script(run_dir, tiny_root, tmp_path):
    """examples/explore.py, as the README shows it, on the tiny run (its data where
    $AE_DATA_ROOT says, as a user's shell would have it)."""
    result = subprocess.run(
        [sys.executable, str(PROJECT / "examples" / "explore.py"), str(run_dir)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "AE_DATA_ROOT": str(tiny_root)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "codes (200, 3)" in result.stdout
    assert "interpolation (8, 1, 28, 28), samples (8, 1, 28, 28)" in result.stdout
    assert (tmp_path / "explore.png").stat().st_size > 1000
