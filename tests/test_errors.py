"""Bad input stops before training with one sentence (value + fix), exit 2, no traceback."""

import pytest

from ae_lightning.config import validate_config
from ae_lightning.data import IDX_IMAGES, MNISTFileError, check_idx_file, load_mnist
from ae_lightning.errors import UserError
from conftest import compose_cfg, run_train_cli, tiny_overrides, write_tiny_mnist

BAD_VALUES = [
    ("bottleneck=0", "bottleneck=0 is not a positive whole number"),
    ("bottleneck=-3", "bottleneck=-3 is not a positive whole number"),
    ("bottleneck=abc", "bottleneck='abc' is not a positive whole number"),
    ("bottleneck=2.5", "bottleneck=2.5 is not a positive whole number"),
    ("model.hidden=[1024,0]", "model.hidden=[1024, 0] has the size 0"),
    ("model.hidden=[-5]", "has the size -5"),
    ("model.optimizer.lr=-0.1", "model.optimizer.lr=-0.1 is not a positive number"),
    ("model.optimizer.lr=fast", "model.optimizer.lr='fast' is not a positive number"),
    ("model.optimizer.weight_decay=-1", "model.optimizer.weight_decay=-1 is not a non-negative"),
    ("data.batch_size=0", "data.batch_size=0 is not a positive whole number"),
    ("data.batch_size=70000", "data.batch_size=70000 is larger than the 59900 training images"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 is not a positive whole number"),
    ("data.val_size=60000", "data.val_size=60000 must be a whole number between 1 and 59999"),
    ("engine.steps_per_call=0", "engine.steps_per_call=0 is not a positive whole number"),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_config_values_are_one_sentence_with_the_fix(override, message, tiny_root, tmp_path):
    cfg = compose_cfg([*tiny_overrides(tiny_root), override], run_dir=tmp_path)
    with pytest.raises(UserError) as err:
        validate_config(cfg)
    assert message in str(err.value) and "use e.g." in str(err.value)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")  # one sentence


@pytest.mark.parametrize(
    "override", ["bottleneck=abc", "model.hidden=[1024,0]", "data.batch_size=0"]
)
def test_bad_values_on_the_command_line_exit_2_before_training(override, tiny_root, tmp_path):
    result = run_train_cli([*tiny_overrides(tiny_root), override], logs=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "use e.g." in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_too_big_a_batch_for_the_data_actually_there(tiny_root, tmp_path):
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "data.batch_size=550"], logs=tmp_path
    )  # the tiny set has 500 training images
    assert result.returncode == 2 and "does not fit the 600 training images" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_limit_on_a_small_split_is_one_sentence(tiny_root, tmp_path):
    """The tiny validation split is one batch of 100: a fifth of it is no batch, which
    Lightning refused with a traceback before the first step (train's tenth now counts
    minibatches, with engine.steps_per_call=1)."""
    result = run_train_cli([*tiny_overrides(tiny_root), "debug=limit"], logs=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.splitlines()[-1] == (
        "error: trainer.limit_val_batches=0.2 of the val split's 1 batch(es) is less than one "
        "batch (Lightning counts batches, not images): raise it, e.g. "
        "trainer.limit_val_batches=1.0, or give a whole number of batches."
    )
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing trained
    fine = run_train_cli(
        [*tiny_overrides(tiny_root), "debug=limit", "trainer.limit_val_batches=1.0",
         "trainer.limit_test_batches=1.0", "trainer.max_epochs=1", "callbacks=minimal"],
        logs=tmp_path / "fine",
    )  # fmt: skip
    assert fine.returncode == 0, fine.stderr[-2000:]


def test_unknown_model_lists_the_choices(tmp_path):
    result = run_train_cli(["model=nosuch"], logs=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'model/nosuch'" in result.stderr
    assert "hidden1024" in result.stderr and "linear" in result.stderr


def test_missing_data_offline_names_the_folder_and_both_fixes(tmp_path):
    root = tmp_path / "empty"
    result = run_train_cli([f"data.root={root}", "data.download=false"], logs=tmp_path)
    assert result.returncode == 2
    assert str(root / "MNIST" / "raw") in result.stderr
    assert "data.root=" in result.stderr and "AE_DATA_ROOT" in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_logs_folder_is_one_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_train_cli(["trainer.max_epochs=1"], logs=blocker / "logs")
    assert result.returncode == 2
    assert f"the logs folder {blocker / 'logs'} cannot be written" in result.stderr
    assert "AE_LOGS_DIR" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def broken_root(tmp_path):
    return write_tiny_mnist(tmp_path / "broken")


def test_wrong_magic_number_names_the_file_and_the_fix(broken_root):
    path = broken_root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + path.read_bytes()[4:])
    with pytest.raises(MNISTFileError, match="magic number 0x00000801, expected 0x00000803"):
        load_mnist(broken_root, train=True, download=False)


def test_truncated_file_names_the_file_and_the_fix(broken_root, tmp_path):
    path = broken_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    result = run_train_cli([f"data.root={broken_root}", "data.download=false"], logs=tmp_path)
    assert result.returncode == 2 and str(path) in result.stderr
    assert "truncated or corrupted" in result.stderr and "delete it" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.mkdir()  # a folder where the file should be: unreadable as a file even for root
    with pytest.raises(MNISTFileError, match="cannot be read"):
        check_idx_file(path, IDX_IMAGES)


def test_divergence_stops_the_run_and_keeps_what_was_logged(tiny_root, tmp_path):
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "model=hidden1024", "model.optimizer.lr=1e3",
         "trainer.max_epochs=5"],
        logs=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Training diverged" in result.stderr and "model.optimizer.lr=" in result.stderr
    assert "Traceback" not in result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # the last good epoch
