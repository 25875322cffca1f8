"""The VAE and denoising options: objectives against closed forms, and real tiny runs."""

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from ae_lightning.data import MNISTDataModule
from ae_lightning.errors import UserError
from ae_lightning.models.ae import Autoencoder
from ae_lightning.models.vae import VariationalAutoencoder
from ae_lightning.nets import PIXELS
from ae_lightning.objectives import corrupt, gaussian_kl, kl_weight, reconstruction_nats
from ae_lightning.runfolder import load_autoencoder
from ae_lightning.train import train
from conftest import compose_cfg, run_train_cli, tiny_overrides


def test_kl_matches_the_closed_form_on_known_means_and_variances():
    mean = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    variance = torch.tensor([[0.5, 2.0], [1.0, 0.1]])
    expected = kl_divergence(Normal(mean, variance.sqrt()), Normal(0.0, 1.0)).sum(1).mean()
    assert torch.allclose(gaussian_kl(mean, variance.log()), expected)
    # By hand, first row: 0.5 * [(1 + 0.5 - 1 - ln 0.5) + (4 + 2 - 1 - ln 2)]
    by_hand = 0.5 * ((0.5 + math.log(2)) + (5 - math.log(2)))
    assert gaussian_kl(mean[:1], variance[:1].log()).item() == pytest.approx(by_hand)
    assert gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0  # q is the prior


def test_bernoulli_reconstruction_is_binary_cross_entropy_in_nats_per_image():
    logits, x = torch.randn(5, 1, 28, 28), torch.rand(5, 1, 28, 28)
    expected = F.binary_cross_entropy(torch.sigmoid(logits), x, reduction="sum") / 5
    assert reconstruction_nats(logits, x, "bernoulli").item() == pytest.approx(expected.item())
    # Gaussian: -log N(x; x, 1/2) per pixel is log(pi)/2, the density's own constant
    constant = 784 * math.log(math.pi) / 2
    assert reconstruction_nats(x, x, "gaussian").item() == pytest.approx(constant)


def test_vae_at_beta_zero_and_zero_variance_is_the_deterministic_autoencoder():
    torch.manual_seed(0)
    ae = Autoencoder(bottleneck=3, hidden=[16])
    vae = VariationalAutoencoder(bottleneck=3, hidden=[16], beta=0.0, likelihood="gaussian")
    vae.decoder.load_state_dict(ae.decoder.state_dict())
    first, _, last = ae.encoder.to_latent
    vae.encoder.body[0].load_state_dict(first.state_dict())
    vae.encoder.mean.load_state_dict(last.state_dict())
    with torch.no_grad():  # sigma = exp(-30): the sample is the mean
        vae.encoder.log_var.weight.zero_()
        vae.encoder.log_var.bias.fill_(-60.0)
    x = torch.rand(8, 1, 28, 28)
    ae_loss, ae_terms = ae.training_loss(x)
    vae_loss, vae_terms = vae.training_loss(x)
    # Summed over pixels (nats per image, with the Gaussian's constant) versus averaged per
    # pixel: the same objective.
    squared_error = vae_loss - PIXELS * math.log(math.pi) / 2
    assert (squared_error / PIXELS).item() == pytest.approx(ae_loss.item(), rel=1e-4)
    assert set(ae_terms) == {"mse"} and set(vae_terms) == {"loss", "recon", "kl"}
    assert torch.equal(vae.encode(x), vae.encoder.distribution(x)[0])  # encode is the mean


def test_bce_loss_is_the_cross_entropy_of_the_logits_by_hand_and_mse_stays_the_metric():
    torch.manual_seed(0)
    model = Autoencoder(bottleneck=3, hidden=[16], loss="bce")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():  # the decoder's last layer outputs logit 0 for every pixel: p = 1/2
        last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.zero_()
        last.bias.zero_()
    loss, terms = model.training_loss(x)
    # -(x log 1/2 + (1 - x) log 1/2) = log 2 at every pixel, whatever x is.
    assert loss.item() == pytest.approx(math.log(2))
    assert terms["mse"].item() == pytest.approx(((0.5 - x) ** 2).mean().item())
    assert set(model.evaluation_terms(x)) == {"mse"}  # evaluation is the same MSE as ever
    loss.backward()  # the gradient is sigmoid(logit) - x per pixel, here 1/2 - x, averaged
    expected = (0.5 - x).flatten(1).mean(0) / x[0].numel()
    assert torch.allclose(last.bias.grad, expected, atol=1e-7)
    assert model.recipe_words() == ["bce loss"] and Autoencoder().recipe_words() == []


def test_kl_warm_up_ramps_beta_linearly():
    assert [kl_weight(2.0, step, 4) for step in (0, 2, 4, 100)] == [0.0, 1.0, 2.0, 2.0]
    assert kl_weight(0.5, 0, 0) == 0.5


def test_corruption_and_dropout_act_in_training_only():
    x = torch.rand(64, 1, 28, 28)
    masked = corrupt(x, "mask", 0.5)
    assert 0.4 < (masked == 0).float().mean() < 0.6 and torch.equal(corrupt(x, "none", 0.5), x)
    model = Autoencoder(bottleneck=2, hidden=[32], dropout=0.5, corruption="gaussian",
                        corruption_level=1.0)  # fmt: skip
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    model.eval()
    assert torch.equal(model.evaluation_terms(x)["mse"], model.evaluation_terms(x)["mse"])
    assert torch.equal(model.evaluation_terms(x)["mse"], F.mse_loss(model(x), x))


def test_bad_model_options_are_one_sentence():
    with pytest.raises(UserError, match="model.likelihood=bernoulli needs"):
        VariationalAutoencoder(output="linear")
    with pytest.raises(UserError, match="model.corruption='salt'"):
        Autoencoder(corruption="salt")
    with pytest.raises(UserError, match="corruption_level=1.5"):
        Autoencoder(corruption="mask", corruption_level=1.5)
    with pytest.raises(UserError, match="model.loss='l1' is not a choice"):
        Autoencoder(loss="l1")
    with pytest.raises(UserError, match="model.loss=bce needs pixels in"):
        Autoencoder(loss="bce", output="linear")
    with pytest.raises(UserError, match="the vae family minimises its own objective"):
        VariationalAutoencoder(loss="bce")


def test_vae_run_logs_its_terms_and_its_checkpoint_loads_as_data(tiny_root, tmp_path):
    run_dir = tmp_path / "vae"
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "model=vae", "model.hidden=[64]", "trainer.max_epochs=2",
         "callbacks=minimal", "logger=csv", "model.kl_warmup_steps=5"],
        run_dir=run_dir,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["family"] == "vae" and "beta 1.0 bernoulli" in metrics["recipe"]
    for stage in ("test",):
        for name in ("mse", "recon", "kl", "nelbo"):
            assert math.isfinite(metrics[f"{stage}/{name}"]), name
    assert "test/loss" not in metrics  # at beta 1 it is test/nelbo: kept once, as that
    assert metrics["test/nelbo"] == pytest.approx(metrics["test/recon"] + metrics["test/kl"])
    assert 0 < metrics["test/mse"] < 0.2
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/recon", "train/kl", "val/nelbo", "val/mse"} <= set(header)
    assert "val/loss" not in header

    path = run_dir / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert checkpoint["model_family"] == "vae" and checkpoint["hyper_parameters"]["beta"] == 1.0
    model = load_autoencoder(path)
    assert isinstance(model, VariationalAutoencoder) and model.hparams["hidden"] == [64]


def test_a_bce_run_logs_both_terms_tests_mse_and_reloads_with_its_loss(tiny_root, tmp_path):
    run_dir = tmp_path / "bce"
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "model=hidden1024", "model.hidden=[64]", "model.loss=bce",
         "trainer.max_epochs=2", "callbacks=minimal", "logger=csv", "latent_metrics=false"],
        run_dir=run_dir,
    )  # fmt: skip
    metrics = train(cfg)
    assert "bce loss" in metrics["recipe"] and 0 < metrics["test/mse"] < 0.2
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/bce", "train/mse", "val/mse"} <= set(header)
    model = load_autoencoder(metrics["test_checkpoint"])
    assert model.loss == "bce" and model.hparams["loss"] == "bce"


def test_denoising_run_is_tested_on_clean_images(tiny_root, tmp_path):
    run_dir = tmp_path / "dae"
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), "model=hidden1024", "model.corruption=mask",
         "model.corruption_level=0.9", "callbacks=minimal", "logger=none",
         "latent_metrics=false"],
        run_dir=run_dir,
    )  # fmt: skip
    metrics = train(cfg)
    model = load_autoencoder(metrics["test_checkpoint"]).eval()
    data = MNISTDataModule(str(tiny_root), download=False, val_size=100)
    images, _ = data.split("test")
    x = images.unsqueeze(1).float() / 255
    with torch.no_grad():
        clean = F.mse_loss(model(x), x).item()
        torch.manual_seed(0)
        noisy = F.mse_loss(model(corrupt(x, "mask", 0.9)), x).item()
    assert json.loads((run_dir / "metrics.json").read_text())["test/mse"] == pytest.approx(
        clean, rel=1e-4
    )
    assert abs(noisy - clean) > 0.005  # masked inputs give another number: not what was tested


def test_a_sweep_compares_an_autoencoder_with_a_vae(tiny_root, tmp_path):
    result = run_train_cli(
        ["-m", "model=hidden1024,vae", "model.hidden=[64]", *tiny_overrides(tiny_root)],
        logs=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    with open(sweep / "summary.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"hidden1024", "vae"}  # named as their folders
    ae, vae = rows["hidden1024"], rows["vae"]
    assert (ae["status"], ae["family"], ae["dataset"]) == ("ok", "ae", "mnist")
    assert (vae["status"], vae["family"]) == ("ok", "vae")
    assert ae["recipe"].startswith("adam lr=0.001") and "beta 1.0 bernoulli" in vae["recipe"]
    assert ae["test/nelbo"] == "" and float(vae["test/nelbo"]) > 0
    assert float(ae["test/mse"]) > 0 and float(vae["test/mse"]) > 0
    assert "| family | dataset | recipe |" in (sweep / "summary.md").read_text()
    assert (sweep / "comparison" / "samples.png").is_file()
