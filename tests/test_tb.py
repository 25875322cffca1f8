"""The pieces behind what TensorBoard shows, each on plain values."""

import torch

from ae_lightning.tb import (
    differing_knobs,
    final_scalars,
    knob_value,
    metrics_table,
    monospace_table,
    padded_codes,
    tensorboard_tag,
    write_experiment,
    write_session,
)


def test_codes_of_any_width_reach_three_columns_without_moving():
    for width in (1, 2, 3, 10):
        codes = torch.randn(50, width)
        padded, added = padded_codes(codes)
        assert padded.shape == (50, max(3, width)) and added == max(0, 3 - width)
        assert torch.equal(padded[:, :width], codes) and not padded[:, width:].any()


def test_final_metrics_get_grouped_tags_and_skip_what_lightning_logged():
    metrics = {"test/mse": 0.02, "best_val/mse": 0.03, "train_time_s": 7.5, "epochs": 3,
               "test/knn_acc": 0.9, "epoch_times_s": [1.0], "test_checkpoint": "b"}  # fmt: skip
    assert final_scalars(metrics, logged={"test/mse"}) == {
        "val/best_mse": 0.03, "time/train_s": 7.5, "test/knn_acc": 0.9,
    }  # fmt: skip


def test_whole_numbers_read_as_whole_numbers_in_hparams():
    assert [knob_value(v) for v in (2, 128.0, 0.001, 0.0, "relu", True)] == [
        "2", "128", 0.001, 0.0, "relu", True,
    ]  # fmt: skip


def test_summary_table_keeps_headers_whole_in_a_code_block():
    markdown = "| run | test/mse |\n|---|---|\n| model=linear bottleneck=2 | 0.0552 |\n"
    text = monospace_table(markdown)
    assert text.startswith("```") and text.endswith("```")
    header, rule, row = text.strip("`\n").splitlines()
    assert header.split() == ["run", "test/mse"] and row.index("0.0552") == header.index("test")


def read_hparams(log_dir):
    """Experiment and session start of ``log_dir``, as TensorBoard's event reader finds them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(log_dir))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    return (
        metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG]),
        metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG]),
        metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG]),
    )


def test_only_knobs_whose_values_differ_become_hparams_columns(tmp_path):
    # linear vs hidden1024: lr differs through the model's config, not an override.
    # `model` fixes `hidden` and `family`; `recipe` tells the third run apart (its scheduler).
    rows = [
        {"model": "linear", "bottleneck": 2, "lr": 0.003, "activation": "relu", "seed": 0,
         "hidden": "[]", "recipe": "adam lr=0.003", "family": "ae"},
        {"model": "hidden1024", "bottleneck": 2, "lr": 0.001, "activation": "relu", "seed": 0,
         "hidden": "[1024]", "recipe": "adam lr=0.001"},
        {"model": "hidden1024", "bottleneck": 2.0, "lr": 0.001, "activation": "relu", "seed": 0,
         "data.val_size": "100", "hidden": "[1024]", "recipe": "adam lr=0.001, cosine"},
    ]  # fmt: skip
    differing = differing_knobs(rows)
    assert list(differing) == ["model", "lr", "data.val_size", "recipe"]
    assert differing["model"] == ["linear", "hidden1024"] and differing["lr"] == [0.003, 0.001]
    write_experiment(tmp_path, differing)
    write_experiment(tmp_path, {"model": ["linear", "hidden1024"]})  # replaces the first
    assert len(list(tmp_path.glob("*.ae-hparams"))) == 1
    write_session(tmp_path, rows[0], step=7, trial="model=linear")
    experiment, start, end = read_hparams(tmp_path)
    assert [info.name for info in experiment.hparam_infos] == ["model"]
    assert list(experiment.hparam_infos[0].domain_discrete.values) != []
    tags = {m.display_name: m.name.tag for m in experiment.metric_infos}
    assert tags["test/mse"] == "zfinal/test/mse" and tags["val/best_mse"] == "zfinal/val/best_mse"
    assert start.group_name == "model=linear"
    assert start.hparams["bottleneck"].string_value == "2"  # whole numbers read as such
    assert start.hparams["lr"].number_value == 0.003
    assert end.status == 1  # STATUS_SUCCESS: the row reads as a finished run


def test_metrics_table_opens_on_the_main_metrics():
    metrics = {f"test/mse_digit{d}": 0.01 * d for d in range(10)}
    metrics.update({"test/probe_acc": 0.8, "test/mse": 0.03, "best_val/mse": 0.031,
                    "epochs": 2, "family": "ae", "test/knn_acc": 0.9})  # fmt: skip
    rows = [line.split(" | ")[0].lstrip("| ") for line in metrics_table(metrics).splitlines()[2:]]
    assert rows[:4] == ["test/mse", "val/best\\_mse", "test/knn\\_acc", "test/probe\\_acc"]
    assert rows[4:] == sorted(rows[4:]) and "test/mse\\_digit0" in rows[4:]


def test_text_tab_summary_leaves_out_columns_every_row_agrees_on():
    markdown = ("| run | dataset | test/mse | error |\n|---|---|---|---|\n"
                "| a | mnist | 0.05 |  |\n| b | mnist | 0.06 |  |\n")  # fmt: skip
    header = monospace_table(markdown, drop_constant=True).strip("`\n").splitlines()[0]
    assert header.split() == ["run", "test/mse"]
    assert monospace_table(markdown).strip("`\n").splitlines()[0].split()[1] == "dataset"
    reordered = monospace_table(markdown, first=["test/mse", "absent"]).strip("`\n")
    assert reordered.splitlines()[0].split() == ["run", "test/mse", "dataset", "error"]
    assert reordered.splitlines()[2].split() == ["a", "0.05", "mnist"]


def test_tensorboard_tags_put_the_curves_first():
    """Time Series expands the first two tag groups by name: they must be train/ and val/."""
    logged = ["epoch", "lr-Adam", "lr-Adam/pg1", "time/epoch_s", "train/mse", "val/mse",
              "test/mse", "val/best_mse", "time/train_s", "test/mse_digit3"]  # fmt: skip
    tags = {name: tensorboard_tag(name) for name in logged}
    assert tags["epoch"] is None  # every chart's x axis already
    assert tags["lr-Adam"] == "train/lr" and tags["lr-Adam/pg1"] == "train/lr/pg1"
    assert tags["time/epoch_s"] == "train/epoch_s" and tags["val/mse"] == "val/mse"
    assert tags["test/mse"] == "zfinal/test/mse" and tags["time/train_s"] == "zfinal/time/train_s"
    groups = sorted({t.split("/")[0] for t in tags.values() if t} | {"views", "versus"})
    assert groups == ["train", "val", "versus", "views", "zfinal"]
