"""The sparse, contractive, WAE-MMD and RAE families: their maths against hand-computed values,
and each through a real (tiny) run with every figure. ``tests/test_families.py`` checks the
family contract of all of them."""

import csv
import hashlib
import math

import matplotlib.image
import pytest
import torch

from ae_lightning import callbacks
from ae_lightning.api import load_run
from ae_lightning.export import export_run
from ae_lightning.models.contractive import ContractiveAutoencoder
from ae_lightning.models.rae import RegularisedAutoencoder
from ae_lightning.models.sparse import SparseAutoencoder
from ae_lightning.objectives import IMQ_SCALES, encoder_jacobian, imq_mmd, kl_sparsity
from ae_lightning.train import train
from conftest import compose_cfg, run_train_cli, tiny_overrides

FIGURES = {"scatter", "reconstructions", "interpolation", "samples", "manifold"}


def test_the_contractive_term_is_the_squared_frobenius_norm_of_the_encoder_jacobian():
    torch.manual_seed(0)
    model = ContractiveAutoencoder(bottleneck=3, hidden=[8], activation="tanh")
    x = torch.rand(4, 1, 28, 28)
    expected = torch.stack(
        [
            torch.autograd.functional.jacobian(model.encoder, image.unsqueeze(0)).square().sum()
            for image in x
        ]
    ).mean()
    codes, jacobian = encoder_jacobian(model.encoder, x)
    assert torch.allclose(jacobian, expected, rtol=1e-5)
    assert torch.allclose(codes, model.encode(x))
    _, terms = model.training_loss(x)
    assert torch.allclose(terms["jacobian"], expected, rtol=1e-5)
    # The penalty alone moves the encoder (its Jacobian is differentiated), not the decoder.
    jacobian.backward()
    assert model.encoder.to_latent[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())


def test_mmd_is_near_zero_for_one_distribution_larger_for_shifted_sets_and_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(500, 2, generator=generator) for _ in range(2))
    same, shifted = imq_mmd(a, b), imq_mmd(a, b + 1.0)
    assert abs(same) < 0.01 and shifted > 20 * abs(same)
    # Identical sets: the cross term counts the n pairs (i, i) the within terms leave out.
    assert abs(imq_mmd(a, a)) < 2 * len(IMQ_SCALES) / len(a)

    x, y = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    n, expected = 4, 0.0
    for scale in IMQ_SCALES:
        c = 2 * 3 * 1.0 * scale

        def k(u, v, c=c):
            return c / (c + float(((u - v) ** 2).sum()))

        for i in range(n):
            for j in range(n):
                if i != j:
                    expected += (k(x[i], x[j]) + k(y[i], y[j])) / (n * (n - 1))
                expected -= 2 * k(x[i], y[j]) / n**2
    assert math.isclose(float(imq_mmd(x, y)), expected, rel_tol=1e-5)


def test_the_sparse_kl_penalty_is_ngs_formula_on_a_fixed_activation():
    firing = torch.tensor([[0.1, 0.5, 0.02], [0.3, 0.7, 0.04]])
    rho = 0.05
    expected = sum(
        rho * math.log(rho / r) + (1 - rho) * math.log((1 - rho) / (1 - r))
        for r in (0.2, 0.6, 0.03)  # the units' mean activations
    )
    assert math.isclose(float(kl_sparsity(firing, rho)), expected, rel_tol=1e-5)
    at_target = torch.full((5, 4), rho)
    assert abs(float(kl_sparsity(at_target, rho))) < 1e-6
    # a unit saturated on every image (sigmoid(17) is exactly 1.0 in float32) stays finite
    saturated = torch.sigmoid(torch.tensor([[17.0, 0.0], [18.0, 1.0]]))
    assert saturated[:, 0].eq(1.0).all() and torch.isfinite(kl_sparsity(saturated, rho))

    torch.manual_seed(0)
    model = SparseAutoencoder(bottleneck=3, hidden=[8], sparsity="kl", sparsity_target=rho)
    x = torch.rand(6, 1, 28, 28)
    units = model.encoder.to_latent[0](x.flatten(1))  # the hidden layer's pre-activations
    _, terms = model.training_loss(x)
    assert torch.allclose(terms["sparsity"], kl_sparsity(torch.sigmoid(units), rho))
    l1 = SparseAutoencoder(bottleneck=3, hidden=[8], sparsity="l1")
    _, terms = l1.training_loss(x)
    assert torch.allclose(terms["sparsity"], l1.encode(x).abs().sum(1).mean())


def test_the_rae_decoder_penalty_is_the_sum_of_squared_decoder_weights():
    torch.manual_seed(0)
    model = RegularisedAutoencoder(bottleneck=3, hidden=[8], code_weight=0.5, decoder_weight=0.2)
    x = torch.rand(4, 1, 28, 28)
    by_hand = sum(
        float(value.double().square().sum()) for value in model.decoder.state_dict().values()
    )
    loss, terms = model.training_loss(x)
    assert math.isclose(float(terms["decoder_l2"].detach()), by_hand, rel_tol=1e-5)
    codes = model.encode(x)
    assert torch.allclose(terms["code"], 0.5 * codes.square().sum(1).mean())
    expected = terms["recon"] + 0.5 * terms["code"] + 0.2 * terms["decoder_l2"]
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize(
    ("model", "terms", "sampler"),
    [
        ("sparse", {"sparsity"}, "Gaussian fitted to the training codes"),
        ("contractive", {"jacobian"}, "Gaussian fitted to the training codes"),
        ("wae", {"mmd"}, "standard normal N(0, I), the WAE-MMD's prior"),
        ("rae", {"code", "decoder_l2"}, "10-component GMM fitted to the training codes"),
    ],
)
def test_family_trains_logs_its_terms_and_writes_every_figure(
    model, terms, sampler, tiny_root, tmp_path, monkeypatch
):
    titles = []

    def samples_figure(images, title, *args, **kwargs):
        titles.append(title)
        return real(images, title, *args, **kwargs)

    real = callbacks.samples_figure
    monkeypatch.setattr(callbacks, "samples_figure", samples_figure)
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), f"model={model}", "model.hidden=[32]", "logger=csv"],
        run_dir=tmp_path,
    )
    metrics = train(cfg)
    assert metrics["family"] == model and math.isfinite(metrics["test/mse"])
    for name in {"loss", "recon", *terms}:
        assert math.isfinite(metrics[f"test/{name}"]), name
    logged = (next(tmp_path.rglob("metrics.csv"))).read_text().splitlines()[0].split(",")
    assert {f"{stage}/{name}" for stage in ("train", "val") for name in terms} <= set(logged)
    for name in FIGURES:
        png = matplotlib.image.imread(tmp_path / "figures" / f"{name}.png")
        assert png.shape[0] > 200 and png.shape[1] > 200
    assert titles and all(sampler in title for title in titles)
    label = {"sparse": "Sparse AE", "contractive": "CAE", "wae": "WAE-MMD", "rae": "RAE"}[model]
    assert all(f"\n{label} 784-32-2 · " in title for title in titles)

    run = load_run(
        tmp_path, data_root=str(tiny_root), device="cpu"
    )  # the notebook API and the export read it as data
    assert type(run.model).family == model and run.sample(4, sampler="normal").shape == (
        4,
        1,
        28,
        28,
    )
    out = export_run(tmp_path, "torchscript", tmp_path / "export")
    pixels = torch.rand(3, 1, 28, 28)
    codes = torch.jit.load(str(out / "encoder.pt"))(pixels)
    assert torch.allclose(codes, run.encode(pixels), atol=1e-6)
    assert torch.allclose(
        torch.jit.load(str(out / "decoder.pt"))(codes), run.decode(codes), atol=1e-6
    )


def test_a_sweep_over_the_four_families_ends_with_their_comparison(tiny_root, tmp_path):
    result = run_train_cli(
        ["-m", "model=sparse,contractive,wae,rae", *tiny_overrides(tiny_root),
         "model.hidden=[32]", "callbacks=none", "logger=none", "latent_metrics=false"],
        logs=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "multiruns").iterdir()
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["family"] for row in rows) == ["contractive", "rae", "sparse", "wae"]
    assert all(row["status"] == "ok" and math.isfinite(float(row["test/mse"])) for row in rows)
    for name in ("scatter", "reconstructions", "interpolation", "samples"):
        assert matplotlib.image.imread(sweep / "comparison" / f"{name}.png").shape[0] > 200


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"beta": "abc"}, "model.beta='abc' is not a number >= 0: use e.g. model.beta=1."),
        ({"beta": -1.0}, "model.beta=-1.0 is not a number >= 0"),
        ({"kl_warmup_steps": -5}, "model.kl_warmup_steps=-5 is not a whole number >= 0"),
        ({"kl_warmup_steps": 2.5}, "model.kl_warmup_steps=2.5 is not a whole number >= 0"),
    ],
)
def test_a_vaes_own_knobs_are_checked_when_it_is_built(knobs, message):
    from ae_lightning.errors import UserError
    from ae_lightning.models.vae import VariationalAutoencoder

    with pytest.raises(UserError) as refused:
        VariationalAutoencoder(bottleneck=2, hidden=[8], **knobs)
    assert str(refused.value).startswith(message)


def checksums(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.sparsity=l2", "model.sparsity='l2' is not a choice: use one of l1, kl."),
        ("model.sparsity_target=1.5", "model.sparsity_target=1.5 is not a firing rate in"),
        ("model.mmd_weight=-1", "model.mmd_weight=-1 is negative: use e.g. 10."),
        ("model.kl_warmup_steps=abc", "model.kl_warmup_steps='abc' is not a whole number >= 0"),
    ],
)
def test_a_bad_family_knob_is_one_sentence_before_training(override, message, tiny_root, tmp_path):
    owners = {"mmd": "wae", "beta": "vae", "kl_warmup": "vae"}
    model = next((name for key, name in owners.items() if key in override), "sparse")
    before = checksums(tiny_root)
    result = run_train_cli(
        [*tiny_overrides(tiny_root), f"model={model}", override], logs=tmp_path / "logs"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "logs" / "runs").exists() or not any(
        (tmp_path / "logs" / "runs").iterdir()
    )
    assert checksums(tiny_root) == before
