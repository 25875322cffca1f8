import shutil
import struct
from pathlib import Path

import pytest
import torch

from ae_lightning.data import (
    EpochPermutation,
    MNISTDataModule,
    MNISTFileError,
    MNISTNotFoundError,
    load_mnist,
)
from ae_lightning.errors import UserError
from conftest import TINY_TEST, TINY_TRAIN, run_train_cli, tiny_overrides


def test_tiny_idx_files_load_through_torchvision(tiny_root):
    images, labels = load_mnist(tiny_root, train=True, download=False)
    assert images.shape == (TINY_TRAIN, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (TINY_TRAIN,) and set(labels.tolist()) <= set(range(10))
    test_images, _ = load_mnist(tiny_root, train=False, download=False)
    assert test_images.shape == (TINY_TEST, 28, 28)


def test_split_is_seeded_disjoint_and_keeps_the_official_test_set(tiny_root):
    dm = MNISTDataModule(root=str(tiny_root), val_size=100, batch_size=32, download=False)
    dm.setup()
    train, val = dm.split("train")[0], dm.split("val")[0]
    assert len(train) == TINY_TRAIN - 100 and len(val) == 100
    assert len(dm.split("test")[0]) == TINY_TEST
    again = MNISTDataModule(root=str(tiny_root), val_size=100, seed=123, download=False)
    torch.testing.assert_close(again.split("val")[0], val)  # `seed` does not move the split
    flat = lambda t: {bytes(row.numpy()) for row in t.flatten(1)}  # noqa: E731
    assert not flat(train) & flat(val)


def test_batches_cover_an_epoch_and_become_unit_floats(tiny_root):
    dm = MNISTDataModule(root=str(tiny_root), val_size=100, batch_size=64, download=False)
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 8  # 500 = 7 x 64 + 52, last partial batch kept
    assert batches[-1][0].shape == (500 - 7 * 64, 28, 28)
    assert sum(len(b[1]) for b in batches) == 500
    x, y = dm.on_after_batch_transfer(batches[0], 0)
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and y.dtype == torch.int64
    dm.drop_last = True
    assert len(dm.train_dataloader()) == 7


def test_each_epoch_has_its_own_reproducible_order():
    sampler = EpochPermutation(100, seed=7, shuffle=True)
    first = sampler.indices(torch.device("cpu")).clone()
    sampler.set_epoch(1)
    second = sampler.indices(torch.device("cpu"))
    assert sorted(first.tolist()) == list(range(100)) and not torch.equal(first, second)
    sampler.set_epoch(0)
    assert torch.equal(sampler.indices(torch.device("cpu")), first)


def test_ranks_get_disjoint_equal_shards_of_each_epoch():
    shards = [EpochPermutation(103, seed=1, shuffle=True, rank=r, world_size=2) for r in (0, 1)]
    for shard in shards:
        shard.set_epoch(3)
    a, b = (set(s.indices(torch.device("cpu")).tolist()) for s in shards)
    assert len(a) == len(b) == 51 and not a & b


def test_both_loaders_serve_the_same_minibatches_and_resume_at_the_same_one(tiny_root):
    """A torch DataLoader (``data.loader=dataloader``) serves the in-memory loader's epoch,
    and a checkpointed loader state resumes both at the next unseen minibatch, once."""
    epochs = {}
    for loader in ("memory", "dataloader"):
        dm = MNISTDataModule(root=str(tiny_root), val_size=100, batch_size=64, download=False,
                             loader=loader)  # fmt: skip
        dm.setup()
        train = dm.train_dataloader()
        train.sampler.set_epoch(2)
        served = iter(train)
        first_three = [next(served) for _ in range(3)]
        state = train.state_dict()
        assert state == {"epoch": 2, "minibatches": 3}
        resumed = dm.train_dataloader()
        resumed.load_state_dict(state)
        resumed.sampler.set_epoch(2)
        rest = list(resumed)
        assert resumed.state_dict() == {"epoch": 2, "minibatches": 8}
        assert len(list(resumed)) == 8  # the skip held for the resumed epoch only
        epochs[loader] = first_three + rest
    assert len(epochs["memory"]) == 8 and sum(len(y) for _, y in epochs["memory"]) == 500
    for (x, y), (x_memory, y_memory) in zip(epochs["dataloader"], epochs["memory"], strict=True):
        assert torch.equal(x, x_memory) and torch.equal(y, y_memory)


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_a_crafted_loader_state_cannot_move_an_epoch_start(tiny_root, loader):
    """A checkpoint's loader state is data: a negative count resumes at the epoch's start,
    and anything but two whole numbers is one sentence, not a traceback."""
    dm = MNISTDataModule(root=str(tiny_root), val_size=100, batch_size=64, download=False,
                         loader=loader)  # fmt: skip
    dm.setup()
    train = dm.train_dataloader()
    train.load_state_dict({"epoch": 0, "minibatches": -3})
    assert sum(len(y) for _, y in train) == 500
    for bad in (
        {"epoch": "0", "minibatches": 1},
        {"epoch": 0},
        [0, 1],
        {"epoch": 0.5, "minibatches": 1},
    ):
        with pytest.raises(UserError, match="loader state .* resume from a checkpoint"):
            train.load_state_dict(bad)


def test_a_failed_download_leaves_no_empty_folders_behind(tmp_path, monkeypatch):
    """torchvision makes root/MNIST/raw before it tries its mirrors; offline every try
    fails, and a mistyped data.root= used to leave that empty tree behind."""
    import os
    from urllib.error import URLError

    import torchvision

    def offline(self):
        os.makedirs(self.raw_folder, exist_ok=True)
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    kept = tmp_path / "kept"  # a folder the user made stays
    kept.mkdir()
    for root in (tmp_path / "new" / "data", kept):
        with pytest.raises(MNISTNotFoundError, match=r"the download failed \(URLError\)"):
            load_mnist(root, train=True, download=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert not any(kept.iterdir())


def test_missing_data_offline_names_the_folder_and_the_fixes(tmp_path):
    with pytest.raises(MNISTNotFoundError) as err:
        load_mnist(tmp_path / "nowhere", train=True, download=False)
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "data.root=" in message and "AE_DATA_ROOT" in message


def test_real_mnist_loads_in_memory(mnist_root):
    dm = MNISTDataModule(root=str(mnist_root), download=False)
    dm.setup()
    assert len(dm.split("train")[0]) == 55_000 and len(dm.split("val")[0]) == 5_000
    test_images, test_labels = dm.split("test")
    assert test_images.shape == (10_000, 28, 28) and test_images.dtype == torch.uint8
    assert test_labels[:5].tolist() == [7, 2, 1, 0, 4]  # the official test set, in order


def reshaped_copy(tiny_root, tmp_path, height: int, width: int) -> Path:
    """A copy of the tiny MNIST whose image headers say ``height x width``: the same bytes per
    image, so the file size still matches its header."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    for prefix in ("train", "t10k"):
        path = root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte"
        data = bytearray(path.read_bytes())
        data[8:16] = struct.pack(">II", height, width)
        path.write_bytes(bytes(data))
    return root


def test_idx_images_of_another_shape_are_one_sentence_before_training(tiny_root, tmp_path):
    root = reshaped_copy(tiny_root, tmp_path, 14, 56)
    result = run_train_cli([*tiny_overrides(root), "callbacks=minimal"], logs=tmp_path / "logs")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    assert f"{path} holds images of 14x56 pixels" in line and "not the 28x28" in line
    assert not list((tmp_path / "logs").rglob("*.ckpt"))


def test_idx_files_of_different_counts_are_refused_from_their_headers(tiny_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = labels.read_bytes()
    count = struct.unpack(">I", data[4:8])[0]
    labels.write_bytes(data[:4] + struct.pack(">I", count - 1) + data[8:-1])
    with pytest.raises(MNISTFileError, match=rf"holds {count} images but {labels} holds"):
        load_mnist(root, train=False, download=False)
