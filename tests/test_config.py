"""Every option of every config group composes, validates and instantiates."""

import pytest
import torch
from hydra.utils import instantiate
from pytorch_lightning import Trainer

from ae_lightning.config import validate_config
from ae_lightning.data import MNISTDataModule
from ae_lightning.models.ae import Autoencoder
from ae_lightning.record import describe_run
from ae_lightning.train import _instantiate_group
from conftest import CONF, compose_cfg

GROUPS = ["model", "data", "trainer", "callbacks", "logger", "experiment", "hparams_search"]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_instantiates(group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("AE_LOGS_DIR", str(tmp_path))  # logger=mlflow's store, not the checkout's
    cfg = compose_cfg([f"{group}={option}"], run_dir=tmp_path)
    validate_config(cfg)
    assert isinstance(instantiate(cfg.data), MNISTDataModule)
    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, Autoencoder) and model.bottleneck == cfg.bottleneck
    trainer_cfg = cfg.trainer
    if trainer_cfg.accelerator == "gpu" and not torch.cuda.is_available():
        trainer_cfg = compose_cfg(
            [f"{group}={option}", "trainer.accelerator=cpu"], tmp_path
        ).trainer
    assert isinstance(instantiate(trainer_cfg, logger=False), Trainer)
    _instantiate_group(cfg.callbacks)
    _instantiate_group(cfg.logger)


def test_the_documented_command_line_composes_as_written(tmp_path):
    cfg = compose_cfg(["model=hidden1024", "bottleneck=10"], run_dir=tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    assert model.bottleneck == 10 and model.hparams["hidden"] == [1024]
    assert model.encode.__self__.encoder.to_latent[0].out_features == 1024


def test_an_experiment_wins_over_the_top_level_defaults(tmp_path):
    """experiment=deep30 sets bottleneck: 30 at the top level, where train.yaml says 2."""
    cfg = compose_cfg(["experiment=deep30"], run_dir=tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    assert cfg.bottleneck == 30 and model.bottleneck == 30
    assert list(cfg.model.hidden) == [1000, 500, 250] and cfg.trainer.max_epochs == 150
    assert cfg.model.activation == "elu" and cfg.model.loss == "bce"
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.model.optimizer.lr == 2e-3 and cfg.model.optimizer.weight_decay == 0.2
    assert cfg.model.scheduler.T_max == 150  # the cosine decays over the whole run
    overridden = compose_cfg(["experiment=deep30", "bottleneck=10"], run_dir=tmp_path)
    assert overridden.bottleneck == 10  # the command line still wins


def test_the_recipe_in_words_names_what_differs_from_the_defaults(tmp_path):
    cfg = compose_cfg(["experiment=deep30", "data.batch_size=64"], run_dir=tmp_path)
    words = describe_run(cfg, instantiate(cfg.model, _convert_="all"))
    assert words["recipe"] == "adamw lr=0.002 wd=0.2, cosine, elu, batch 64, bce loss"
    plain = compose_cfg(["model=hidden1024"], run_dir=tmp_path)
    assert describe_run(plain, instantiate(plain.model, _convert_="all"))["recipe"] == (
        "adam lr=0.001"
    )


def test_hidden_sizes_from_the_command_line(tmp_path):
    cfg = compose_cfg(["model=deep", "model.hidden=[256,64]", "bottleneck=5"], run_dir=tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    assert model.hparams["hidden"] == [256, 64] and model.bottleneck == 5


def test_optimizer_is_a_partial_completed_by_the_module(tmp_path):
    cfg = compose_cfg(
        ["model.optimizer.lr=0.01", "model.optimizer.weight_decay=0"], run_dir=tmp_path
    )
    optimizer = instantiate(cfg.model, _convert_="all").configure_optimizers()
    assert optimizer.defaults["lr"] == 0.01 and optimizer.defaults["weight_decay"] == 0


@pytest.mark.parametrize(("model", "lr"), [("linear", 3e-3), ("hidden1024", 1e-3), ("deep", 1e-3)])
def test_each_model_has_its_tuned_learning_rate(model, lr, tmp_path):
    """linear needs 3e-3 to converge in 25 epochs; the hidden-layer models keep 1e-3."""
    cfg = compose_cfg([f"model={model}"], run_dir=tmp_path)
    optimizer = instantiate(cfg.model, _convert_="all").configure_optimizers()
    assert optimizer.defaults["lr"] == lr and optimizer.defaults["weight_decay"] == 0
