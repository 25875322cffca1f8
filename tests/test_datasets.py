"""data=mnist|fashion_mnist|kmnist: torchvision's own loaders on tiny IDX files, named classes."""

import shutil

import pytest
import torch
from hydra.utils import instantiate

from ae_lightning.data import MNISTNotFoundError
from ae_lightning.plots import scatter_figure
from conftest import compose_cfg, tiny_overrides

FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}


@pytest.fixture(scope="module")
def three_datasets(tiny_root, tmp_path_factory):
    """One root holding the tiny IDX files in each dataset's torchvision folder."""
    root = tmp_path_factory.mktemp("three")
    for folder in FOLDERS.values():
        shutil.copytree(tiny_root / "MNIST" / "raw", root / folder / "raw")
    return root


@pytest.mark.parametrize(
    ("dataset", "first", "last"),
    [("mnist", "0", "9"), ("fashion_mnist", "T-shirt/top", "Ankle boot"), ("kmnist", "o", "wo")],
)
def test_each_dataset_loads_and_names_its_classes_in_the_legend(
    three_datasets, dataset, first, last
):
    cfg = compose_cfg([*tiny_overrides(three_datasets), f"data={dataset}"])
    data = instantiate(cfg.data)
    data.prepare_data()
    assert len(data.split("train")[0]) == 500 and len(data.split("test")[0]) == 200
    labels = torch.arange(10).repeat(3)
    fig = scatter_figure(
        torch.randn(30, 2), labels, "codes", class_names=data.class_names,
        label_word=data.label_word,
    )  # fmt: skip
    legend = [text.get_text() for text in fig.legends[0].texts]
    assert legend[0] == first and legend[-1] == last and len(legend) == 10
    assert fig.legends[0].get_title().get_text() == ("digit" if dataset == "mnist" else "class")


def test_a_missing_dataset_is_named_in_the_message(three_datasets, tmp_path):
    cfg = compose_cfg([*tiny_overrides(tmp_path), "data=kmnist"])
    with pytest.raises(MNISTNotFoundError, match=r"KMNIST was not found in .*KMNIST/raw"):
        instantiate(cfg.data).prepare_data()
