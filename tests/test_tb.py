"""The pieces behind what TensorBoard shows, each on plain values."""

import torch

from ae_lightning.tb import final_scalars, knob_value, monospace_table, padded_codes


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
