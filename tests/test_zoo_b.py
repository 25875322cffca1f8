"""IWAE, VampPrior and VQ-VAE against their papers' maths; the test NLL against a closed form;
binarised data; the IWAE paper's setting composed and shortened; tiny real runs."""

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback
from torch.distributions import Bernoulli, MultivariateNormal, Normal

from ae_lightning import runfolder
from ae_lightning.api import load_run
from ae_lightning.compare import summary_rows, write_summary
from ae_lightning.data import MNISTDataModule
from ae_lightning.export import export_run
from ae_lightning.latent import evaluation_subset, importance_sampled_nll
from ae_lightning.models.ae import Autoencoder
from ae_lightning.models.iwae import ImportanceWeightedAutoencoder
from ae_lightning.models.vae import VariationalAutoencoder
from ae_lightning.models.vamp import VampPriorAutoencoder
from ae_lightning.objectives import (
    importance_weighted_bound,
    straight_through,
    vector_quantise,
    vq_losses,
)
from ae_lightning.runfolder import RunRecord as ComparedRun
from ae_lightning.train import train
from conftest import compose_cfg, run_train_cli, tiny_overrides

FIGURES = {"reconstructions", "scatter", "interpolation", "samples", "manifold"}


def test_iwae_with_one_sample_is_the_vae_loss_exactly():
    torch.manual_seed(0)
    iwae = ImportanceWeightedAutoencoder(samples=1, bottleneck=3, hidden=[8])
    vae = VariationalAutoencoder(bottleneck=3, hidden=[8])
    vae.load_state_dict(iwae.state_dict())
    x = torch.rand(6, 1, 28, 28)
    torch.manual_seed(1)
    iwae_loss, terms = iwae.training_loss(x)
    torch.manual_seed(1)
    vae_loss, _ = vae.training_loss(x)
    assert torch.equal(iwae_loss, vae_loss) and torch.equal(terms["bound"], -vae_loss)
    log_weights = torch.randn(6, 1)  # L_1 is the log weight itself: the ELBO's estimate
    assert torch.equal(importance_weighted_bound(log_weights), log_weights[:, 0])


def test_iwae_bound_is_log_mean_exp_and_tighter_with_more_samples():
    log_weights = torch.tensor([[0.0, math.log(3.0)], [-1.0, -1.0]])
    expected = torch.tensor([math.log(2.0), -1.0])  # log((1 + 3) / 2), log(e^-1)
    assert torch.allclose(importance_weighted_bound(log_weights), expected)
    torch.manual_seed(0)
    model = ImportanceWeightedAutoencoder(samples=50, bottleneck=2, hidden=[8]).eval()
    x = torch.rand(4, 1, 28, 28).round()
    with torch.no_grad():
        weights = model.log_weights(x.repeat(50, 1, 1, 1), 50)  # 50 repeats of 50 samples
    bounds = {k: importance_weighted_bound(weights[:, :k]).mean() for k in (1, 5, 50)}
    assert bounds[1] < bounds[5] < bounds[50]  # Burda et al.'s theorem 1, on average


def test_vq_quantises_to_the_nearest_entry_with_a_straight_through_gradient():
    torch.manual_seed(0)
    codebooks = torch.randn(2, 5, 3, requires_grad=True)  # 2 groups of 3 dims, 5 entries
    z = torch.randn(4, 6, requires_grad=True)
    quantised, indices, _ = vector_quantise(z, codebooks)
    for b in range(4):
        for g in range(2):
            part = z[b, 3 * g : 3 * g + 3]
            nearest = min(
                range(5), key=lambda c: float((part - codebooks[g, c]).square().sum().detach())
            )
            assert indices[b, g] == nearest
            assert torch.equal(quantised[b, 3 * g : 3 * g + 3], codebooks[g, nearest])

    upstream = torch.randn(4, 6)  # the gradient arriving at the decoder input
    passed = straight_through(z, quantised)
    assert torch.allclose(passed, quantised)  # z + (e - z): e up to rounding
    (passed * upstream).sum().backward()
    assert torch.equal(z.grad, upstream) and codebooks.grad is None  # unchanged, to z only

    z.grad = None
    codebook, commitment = vq_losses(z, quantised)
    squared = (z - quantised).square().sum(1).mean()
    assert torch.allclose(codebook, squared) and torch.allclose(commitment, squared)
    codebook.backward()  # ||sg[z] - e||^2 moves the entries only
    assert z.grad is None and codebooks.grad.abs().sum() > 0
    codebooks.grad = None
    commitment.backward()  # ||z - sg[e]||^2 moves the encoder only
    assert codebooks.grad is None
    assert torch.allclose(z.grad, 2 * (z - quantised).detach() / 4)


def test_vamp_log_prior_is_the_mixture_of_the_pseudo_inputs_posteriors():
    torch.manual_seed(0)
    model = VampPriorAutoencoder(pseudo_inputs=3, bottleneck=2, hidden=[8])
    z = torch.randn(4, 2)
    means, log_vars = model.encoder.distribution(model.pseudo_inputs_images())
    expected = []
    for point in z:
        density = 0.0
        for k in range(3):
            component = 1.0
            for d in range(2):
                var = math.exp(log_vars[k, d].item())
                diff = point[d].item() - means[k, d].item()
                component *= math.exp(-(diff**2) / (2 * var)) / math.sqrt(2 * math.pi * var)
            density += component / 3
        expected.append(math.log(density))
    assert torch.allclose(model.prior_log_density(z), torch.tensor(expected), atol=1e-5)
    # The KL term is the one-sample estimate log q(z|x) - log p(z) at the sampled code.
    mean, log_var = torch.zeros(4, 2), torch.zeros(4, 2)
    log_q = Normal(0.0, 1.0).log_prob(z).sum(1)
    kl = model._kl(mean, log_var, z)
    assert kl.item() == pytest.approx((log_q - torch.tensor(expected)).mean().item(), abs=1e-5)


def linear_gaussian(pixels: int = 4, codes: int = 2, noise: float = 0.5):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I): the marginal is N(b, WW^T + s^2 I)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(pixels, codes, generator=generator, dtype=torch.float64)
    bias = torch.randn(pixels, generator=generator, dtype=torch.float64)
    marginal = MultivariateNormal(bias, weight @ weight.T + noise**2 * torch.eye(pixels))
    # The exact posterior, widened 1.5x: a proposal that is good but not perfect.
    covariance = torch.linalg.inv(torch.eye(codes) + weight.T @ weight / noise**2)
    proposal_scale = 1.5 * torch.linalg.cholesky(covariance)

    def log_weights(x: torch.Tensor, k: int) -> torch.Tensor:
        mean = (x - bias) @ weight @ covariance.T / noise**2  # (B, z)
        q = MultivariateNormal(mean, scale_tril=proposal_scale)
        z = q.sample((k,))  # (k, B, z)
        likelihood = Normal(z @ weight.T + bias, noise).log_prob(x).sum(-1)
        prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
        return (likelihood + prior - q.log_prob(z)).T  # (B, k)

    return marginal, log_weights


def test_nll_estimator_recovers_the_linear_gaussian_marginal():
    marginal, log_weights = linear_gaussian()
    torch.manual_seed(0)
    x = marginal.sample((16,))
    exact = -marginal.log_prob(x).mean().item()
    estimate = importance_sampled_nll(log_weights, x, samples=5000, max_rows=7000)
    assert estimate == pytest.approx(exact, abs=0.01)
    # One weight per image is a looser bound (Jensen): higher on average over many draws.
    one_sample = importance_sampled_nll(log_weights, x.repeat(500, 1), samples=1)
    assert one_sample > exact + 0.01


def test_nll_chunks_combine_exactly_and_a_family_without_likelihood_gives_none():
    def log_weights(x: torch.Tensor, k: int) -> torch.Tensor:  # the same draws in any chunking
        return (x.flatten(1)[:, :1] + torch.log(torch.arange(1.0, k + 1))).double()

    x = torch.rand(5, 1, 28, 28)
    whole = importance_sampled_nll(log_weights, x, samples=8)
    parts = importance_sampled_nll(log_weights, x, samples=8, max_rows=8 * 2)  # 2 images
    assert parts == pytest.approx(whole, abs=1e-12)
    ae = compose_model("linear")
    assert importance_sampled_nll(ae.log_weights, x, samples=4) is None


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_the_negative_elbo_and_the_nll_are_one_density(likelihood):
    """The training objective and test/nll measure the same p(x|z): the one-sample negative
    ELBO, averaged over many draws, sits above the importance-sampled NLL by a few nats
    (Jensen), never hundreds (a constant in one and not the other)."""
    torch.manual_seed(0)
    model = VariationalAutoencoder(bottleneck=2, hidden=[8], likelihood=likelihood).eval()
    x = torch.rand(4, 1, 28, 28).round()
    with torch.no_grad():
        nelbo = torch.stack(
            [model.evaluation_terms(x)["nelbo"] for _ in range(400)]
        ).mean().item()  # fmt: skip
        one_weight = -model.log_weights(x, 4000).double().mean().item()  # also -ELBO
    nll = importance_sampled_nll(model.log_weights, x, samples=4000)
    assert nelbo == pytest.approx(one_weight, rel=0.005)  # two estimates of one mean
    assert nll < nelbo < nll + 25


def test_the_nll_subset_is_random_fixed_and_whole_when_asked():
    subset = evaluation_subset(10_000, 500)
    assert len(subset) == len(set(subset.tolist())) == 500 and torch.all(subset.diff() > 0)
    assert torch.equal(subset, evaluation_subset(10_000, 500))  # every run, the same images
    assert subset.max() > 9_000 and subset.min() < 1_000  # spread over the file, not its head
    assert torch.equal(evaluation_subset(20, None), torch.arange(20))
    assert torch.equal(evaluation_subset(20, 50), torch.arange(20))


def compose_model(name: str):
    return instantiate(compose_cfg([f"model={name}"]).model, _convert_="all")


def test_batched_nll_equals_a_per_image_loop_on_a_tiny_vae():
    torch.manual_seed(0)
    model = VariationalAutoencoder(bottleneck=2, hidden=[8]).eval()
    x = torch.rand(3, 1, 28, 28).round()
    samples = 3000
    batched = importance_sampled_nll(model.log_weights, x, samples=samples, max_rows=2000)
    looped = []
    with torch.no_grad():
        for image in x:  # one image at a time, the densities from torch.distributions
            mean, log_var = model.encoder.distribution(image.unsqueeze(0))
            q = Normal(mean[0], torch.exp(0.5 * log_var[0]))
            z = q.sample((samples,))  # (k, z): this image's samples
            pixels = Bernoulli(logits=model.decoder.logits(z).flatten(1))
            weights = (
                pixels.log_prob(image.flatten()).sum(1)
                + Normal(0.0, 1.0).log_prob(z).sum(1)
                - q.log_prob(z).sum(1)
            )
            stacked = weights.double()
            looped.append(-(torch.logsumexp(stacked, 0) - math.log(samples)).item())
    assert batched == pytest.approx(sum(looped) / len(looped), abs=0.2)  # sampling noise


def tiny_module(tiny_root, binarize: str) -> MNISTDataModule:
    module = MNISTDataModule(
        root=str(tiny_root), download=False, val_size=100, batch_size=50, binarize=binarize
    )
    module.setup()
    return module


def test_static_binarisation_is_reproducible_on_every_split(tiny_root):
    first, again = tiny_module(tiny_root, "static"), tiny_module(tiny_root, "static")
    grey = tiny_module(tiny_root, "none")
    for split in ("train", "val", "test"):
        images, labels = first.split(split)
        assert torch.equal(images, again.split(split)[0])  # the fixed seed
        assert set(images.unique().tolist()) <= {0, 255}
        assert torch.equal(labels, grey.split(split)[1])
        assert (images[grey.split(split)[0] == 0] == 0).all()  # a black pixel stays black


class FirstBatchPerEpoch(Callback):
    """Keeps each epoch's first training minibatch as the module received it, and the
    training-split indices it holds."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            x = batch[0][0] if isinstance(batch, list) else batch[0]
            loader = trainer.train_dataloader
            order = loader.sampler.indices(x.device)[: len(x)]
            self.batches.append((x.clone(), order.clone()))


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_overfit_batches_serve_the_same_batches_every_epoch(tiny_root, loader):
    """debug=overfit (Trainer(overfit_batches=N)): can the model learn N batches? Only if
    every epoch serves those same N, unshuffled."""
    module = MNISTDataModule(
        root=str(tiny_root), download=False, val_size=100, batch_size=50, loader=loader
    )
    seen = []

    class Batches(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            x = batch[0][0] if isinstance(batch, list) else batch[0]
            seen.append((trainer.current_epoch, x))

    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Batches()],
        overfit_batches=2,
    )  # fmt: skip
    trainer.fit(Autoencoder(bottleneck=2, hidden=[8]), datamodule=module)
    epochs = [[x for epoch, x in seen if epoch == e] for e in range(3)]
    assert [len(batches) for batches in epochs] == [2, 2, 2]
    for later in epochs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(epochs[0], later, strict=True))
    first_images = module.probe_images(50, "train")[0]  # the split's first images, in order
    assert torch.equal(epochs[0][0], first_images)


def test_dynamic_binarisation_redraws_training_minibatches_but_not_the_test_split(tiny_root):
    first, again = tiny_module(tiny_root, "dynamic"), tiny_module(tiny_root, "dynamic")
    grey = tiny_module(tiny_root, "none")
    assert torch.equal(first.split("test")[0], again.split("test")[0])
    assert set(first.split("val")[0].unique().tolist()) <= {0, 255}
    # evaluation (kNN, probe, samplers, figures) sees one fixed binary draw of the training
    # split, like the images the model trains and is tested on; training draws per batch
    train_view = first.split("train")[0]
    assert set(train_view.unique().tolist()) <= {0, 255}
    assert torch.equal(train_view, again.split("train")[0])
    assert (train_view[grey.split("train")[0] == 0] == 0).all()

    capture = FirstBatchPerEpoch()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[capture],
        limit_train_batches=1, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(VariationalAutoencoder(bottleneck=2, hidden=[8]), datamodule=first)
    (epoch0, order0), (epoch1, order1) = capture.batches
    assert set(epoch0.unique().tolist()) <= {0.0, 1.0}
    shared = [i for i in order0.tolist() if i in set(order1.tolist())]
    assert shared, "the two epochs' first minibatches share no image"
    rows0 = [order0.tolist().index(i) for i in shared]
    rows1 = [order1.tolist().index(i) for i in shared]
    assert not torch.equal(epoch0[rows0], epoch1[rows1])  # the same images, new draws


def test_iwae_paper_composes_with_its_schedule_shortened():
    cfg = compose_cfg(["experiment=iwae_paper", "model.samples=50", "schedule_passes=13"])
    model = cfg.model
    assert model._target_.endswith("ImportanceWeightedAutoencoder") and model.samples == 50
    assert list(model.hidden) == [200, 200] and model.activation == "tanh"
    assert cfg.bottleneck == 50 and cfg.data.batch_size == 20 and cfg.data.binarize == "dynamic"
    assert model.optimizer.eps == 1e-4 and list(model.optimizer.betas) == [0.9, 0.999]
    assert cfg.trainer.max_epochs == 13 and cfg.eval.nll_samples == 5000
    assert compose_cfg(["experiment=iwae_paper", "model=vae"]).model._target_.endswith(
        "VariationalAutoencoder"
    )
    # One optimizer step per pass of the 3280: stage i holds 3^i steps at 1e-3 * 10^(-i/7).
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = instantiate(model.scheduler)(optimizer, total_steps=3280)
    lrs = []
    for _ in range(3280):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-3 * 10 ** (-i / 7) for i in range(8) for _ in range(3**i)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_a_resumed_geometric_schedule_keeps_the_stages_it_started_with():
    """A resume that trains on (twice the epochs) builds its schedule over the longer run;
    the restored state's stages decide, so the lr never jumps back up to an earlier stage's."""
    from ae_lightning.system import GeometricStagesLR

    def stepped(total_steps, steps, state=None):
        optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
        scheduler = GeometricStagesLR(optimizer, total_steps=total_steps, stages=3, growth=3.0,
                                      decay=0.5)  # fmt: skip
        if state is not None:
            scheduler.load_state_dict(state)
        lrs = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
        return scheduler, lrs

    # 13 steps: stages end at 1, 4 and 13 steps (1:3:9), at lr 1e-3, 5e-4, 2.5e-4
    first, before = stepped(13, 6)
    state = torch.load(_saved(first.state_dict()), weights_only=True)  # as a checkpoint holds it
    _, after = stepped(26, 20, state)  # over 26 steps, step 6 would be back in stage 1
    assert before[-1] == pytest.approx(2.5e-4)
    assert after == pytest.approx([2.5e-4] * 20)


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("vae", ["model=vae"]),
        ("iwae", ["experiment=iwae_paper", "schedule_passes=2", "data.batch_size=50"]),
        ("vamp", ["model=vamp", "model.pseudo_inputs=10"]),
        ("vqvae", ["model=vqvae", "model.codebook_size=16"]),
    ],
)
def test_family_trains_tests_and_draws_every_figure(family, extra, tiny_root, tmp_path):
    cfg_overrides = [
        *tiny_overrides(tiny_root), *extra, "bottleneck=2", "model.hidden=[8]",
        "logger=none", "latent_metrics=false", "eval.nll_samples=20", "eval.nll_images=50",
    ]  # fmt: skip
    metrics = train(compose_cfg(cfg_overrides, run_dir=tmp_path))
    assert metrics["family"] == family
    tested = {k: v for k, v in metrics.items() if k.startswith("test/")}
    assert "test/mse" in tested and all(math.isfinite(v) for v in tested.values())
    assert ("test/nll" in metrics) == (family != "vqvae")  # the likelihood families only
    if "test/nll" in metrics:
        assert metrics["test/nll"] > 0
        assert (
            json.loads((tmp_path / "metrics.json").read_text())["test/nll"] == metrics["test/nll"]
        )
        compared = ComparedRun(tmp_path, metrics=runfolder.metrics(tmp_path), label=family)
        write_summary(summary_rows([compared]), tmp_path)  # the sweep's and ae-compare's table
        header, _, row = (tmp_path / "summary.md").read_text().splitlines()[:3]
        column = [c.strip() for c in header.split("|")].index("test/nll")
        assert float(row.split("|")[column]) == pytest.approx(metrics["test/nll"], abs=1e-3)
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} >= FIGURES
    if family == "vae":
        return  # (the older family's own tests cover the rest)

    run = load_run(tmp_path, device="cpu")  # the notebook API: the family's own prior
    assert run.sample(4, sampler="prior").shape == (4, 1, 28, 28)
    export_run(tmp_path, "torchscript", out=tmp_path / "exported")
    encoder = torch.jit.load(str(tmp_path / "exported" / "encoder.pt"))
    pixels = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(encoder(pixels), run.encode(pixels), rtol=0, atol=1e-5)
    if family == "vqvae":  # the quantiser's nearest-entry search exports to ONNX too
        ort = pytest.importorskip("onnxruntime")
        export_run(tmp_path, "onnx", out=tmp_path / "onnx")
        (codes,) = ort.InferenceSession(str(tmp_path / "onnx" / "encoder.onnx")).run(
            None, {"images": pixels.numpy()}
        )
        torch.testing.assert_close(torch.from_numpy(codes), run.encode(pixels), atol=1e-5, rtol=0)

    more = f"trainer.max_epochs={metrics['epochs'] + 1}"
    resumed = train(compose_cfg([*cfg_overrides, f"resume={tmp_path}", more], tmp_path))
    assert resumed["epochs"] == metrics["epochs"] + 1 and math.isfinite(resumed["test/mse"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.binarize=sometimes", "data.binarize='sometimes'"),
        ("eval.nll_samples=-1", "eval.nll_samples=-1"),
        ("model.groups=3", "model.groups=3"),
    ],
)
def test_a_bad_zoo_value_is_one_sentence_before_training(override, named, tiny_root, tmp_path):
    model = ["model=vqvae", "model.hidden=[8]"] if override.startswith("model.") else []
    result = run_train_cli(
        [*tiny_overrides(tiny_root), *model, "bottleneck=2", override, "logger=none"],
        logs=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], result.stderr[-2000:]
    assert not list((tmp_path / "runs").glob("*/checkpoints"))  # nothing trained
