"""Every registered model family keeps the contract the rest of the package relies on.

The parameter lists come from ``ae_lightning.models.families()``: a new file in models/ is
tested here with no edit (``test_a_new_family_file_is_registered_and_tested`` shows it).
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ae_lightning.callbacks import SamplesFigure, describe
from ae_lightning.errors import UserError
from ae_lightning.limits import check_model_size
from ae_lightning.models import families, family_class
from ae_lightning.nets import PIXELS
from ae_lightning.runfolder import load_autoencoder
from ae_lightning.train import train
from conftest import CONF, PROJECT, compose_cfg, run_train_cli, tiny_overrides

DATA = Path(__file__).parent / "data"
NAMES = sorted(families())


def model_config(family: str) -> str:
    """The ``conf/model/<name>.yaml`` that names the family's class as its ``_target_``."""
    cls = families()[family]
    target = f"{cls.__module__}.{cls.__qualname__}"
    for path in sorted((CONF / "model").glob("*.yaml")):
        if (yaml.safe_load(path.read_text()) or {}).get("_target_") == target:
            return path.stem
    pytest.fail(f"no conf/model/*.yaml has _target_: {target}")


@pytest.mark.parametrize("family", NAMES)
def test_family_builds_with_defaults_and_keeps_the_contract(family):
    cls = families()[family]
    assert cls.family == family and family_class(family) is cls
    assert isinstance(cls().label, str) and cls().label  # builds with its defaults alone
    torch.manual_seed(0)
    model = cls(bottleneck=3, hidden=[8])
    x = torch.rand(4, 1, 28, 28)

    loss, terms = model.training_loss(x)
    assert loss.shape == () and math.isfinite(loss.item())
    assert terms and all(math.isfinite(value.item()) for value in terms.values())
    evaluation = model.evaluation_terms(x)
    assert "mse" in evaluation and all(math.isfinite(v.item()) for v in evaluation.values())

    codes = model.encode(x)
    assert codes.shape == (4, 3) and model.decode(codes).shape == (4, 1, 28, 28)
    prior = model.prior_sample(5, seed=1)
    if prior is not None:
        assert prior.shape == (5, 3) and prior.dtype == torch.float32
        assert torch.equal(prior, model.prior_sample(5, seed=1))  # the seed fixes the draws
        assert model.prior_description
    assert all(isinstance(word, str) for word in model.recipe_words())
    assert model.graph_blocker is None or isinstance(model.graph_blocker, str)
    extra = cls.extra_parameters(3, {}, PIXELS)  # the family's defaults
    counted = check_model_size(
        3, [8], None, PIXELS, "model", code_outputs=cls.code_outputs, extra_parameters=extra
    )
    assert counted == model.num_parameters  # the size limit's arithmetic matches the nets


@pytest.mark.parametrize("family", NAMES)
def test_family_trains_on_colour_images_of_another_size(family):
    """Custom data (``data=npz``, ``image_folder``) hands the model its own image shape:
    every family's nets and extra weights (a VampPrior's pseudo-inputs) follow it."""
    cls, shape = families()[family], (3, 8, 8)
    torch.manual_seed(0)
    model = cls(bottleneck=3, hidden=[8], image_shape=shape)
    x = torch.rand(4, *shape)
    loss, _ = model.training_loss(x)
    assert math.isfinite(loss.item())
    loss.backward()
    assert model.decode(model.encode(x)).shape == x.shape
    extra = cls.extra_parameters(3, {}, math.prod(shape))
    counted = check_model_size(
        3, [8], None, math.prod(shape), "model", code_outputs=cls.code_outputs,
        extra_parameters=extra,
    )  # fmt: skip
    assert counted == model.num_parameters


@pytest.mark.parametrize(
    "family", [name for name in NAMES if families()[name]().prior_sample(1) is not None]
)
def test_the_samples_figure_decodes_the_prior_and_says_whose(family):
    model = families()[family](bottleneck=2)
    figure = SamplesFigure(n=4, seed=3).make_figure(None, model, describe(model))
    title = figure.get_suptitle()
    assert f"{model.prior_description}, the {model.label}'s prior" in title
    assert title.endswith(f"{model.label} 784-2")


@pytest.mark.parametrize("family", NAMES)
def test_family_trains_and_its_checkpoint_round_trips_as_data(family, tiny_root, tmp_path):
    cfg = compose_cfg(
        [*tiny_overrides(tiny_root), f"model={model_config(family)}", "model.hidden=[8]",
         "callbacks=minimal", "logger=none", "latent_metrics=false"],
        run_dir=tmp_path,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["family"] == family and math.isfinite(metrics["test/mse"])

    path = tmp_path / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["model_family"] == family
    model = load_autoencoder(path)  # weights_only=True, the class picked by the family name
    assert type(model) is families()[family] and not model.training
    assert dict(model.hparams) == checkpoint["hyper_parameters"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in checkpoint["state_dict"].items())


@pytest.mark.parametrize("name", ["main_linear_ae", "main_vae"])
def test_checkpoints_of_older_code_load_and_reconstruct_as_before(name):
    """See tests/data/README.md: written by main before the families had files of their own."""
    expected = torch.load(DATA / "main_reconstructions.pt", weights_only=True)
    model = load_autoencoder(DATA / f"{name}.ckpt")
    assert model.family == {"main_linear_ae": "ae", "main_vae": "vae"}[name]
    with torch.no_grad():
        reconstructions = model(expected["images"])
    # To a few float32 ulps, not bit for bit: another CPU's matmul kernels round the last bit
    # differently from the machine that wrote the file; a wrongly mapped weight is far off.
    torch.testing.assert_close(reconstructions, expected[name], rtol=0, atol=1e-6)


def test_an_older_checkpoint_continues_and_one_of_another_family_is_refused(tiny_root, tmp_path):
    old_ae, old_vae = DATA / "main_linear_ae.ckpt", DATA / "main_vae.ckpt"
    before = {path: path.read_bytes() for path in (old_ae, old_vae)}
    common = [*tiny_overrides(tiny_root), "callbacks=minimal", "logger=none",
              "latent_metrics=false", "trainer.max_epochs=2"]  # fmt: skip
    refused = run_train_cli([*common, f"ckpt_path={old_vae}"], logs=tmp_path / "refused")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    said = "holds a model of the vae family but this config builds the ae family"
    assert len(errors) == 1 and said in errors[0]
    resumed = run_train_cli([*common, f"ckpt_path={old_ae}"], logs=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (run,) = (tmp_path / "resumed" / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["family"] == "ae" and metrics["global_step"] == 20  # epoch 2 after epoch 1
    assert {path: path.read_bytes() for path in before} == before  # the kept files untouched


def test_a_name_from_a_file_is_looked_up_never_imported(tmp_path):
    assert family_class("os") is None and family_class(["ae"]) is None
    assert family_class("ae_lightning.models.ae.Autoencoder") is None
    checkpoint = torch.load(DATA / "main_linear_ae.ckpt", weights_only=True)
    path = tmp_path / "other.ckpt"
    torch.save({**checkpoint, "model_family": "ae_lightning.models.ae.Autoencoder"}, path)
    with pytest.raises(UserError, match=r"unknown model family 'ae_lightning.models.ae.Autoe.*"
                       rf"knows {re.escape(str(NAMES))}"):  # fmt: skip
        load_autoencoder(path)


def test_no_module_outside_models_names_a_family():
    """Callers ask the model (the contract); a family name in their code is a missing method."""
    quoted = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in NAMES))
    package = PROJECT / "src" / "ae_lightning"
    hits = [
        f"{path.relative_to(package)}:{number}"
        for path in sorted(package.rglob("*.py"))
        if path.parent.name != "models"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if quoted.search(line.split("#")[0])
    ]
    assert hits == []


TOY_FAMILY = '''
from ae_lightning.models.ae import Autoencoder


class ToyAutoencoder(Autoencoder):
    """A throw-away family: the plain AE under another name."""

    family = "toy"
    label = "Toy"
'''


def test_a_new_family_file_is_registered_and_tested(tmp_path):
    """One file dropped into a copy of models/ is a family, and this file's tests take it."""
    package = tmp_path / "src" / "ae_lightning"
    shutil.copytree(
        PROJECT / "src" / "ae_lightning", package, ignore=shutil.ignore_patterns("__pycache__")
    )
    (package / "models" / "toy.py").write_text(TOY_FAMILY)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), str(PROJECT / "tests")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "keeps_the_contract"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"{len(NAMES) + 1} passed" in result.stdout  # every family here, and the toy
