"""The benchmarks run end to end on tiny data and write well-formed results (no timings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROJECT, tiny_overrides

SPEED_KEYS = {
    "reference_epoch_s", "plain_epoch_s", "framework_epoch_s", "framework_vs_plain",
    "speedup_vs_reference", "peak_rss_mb",
}  # fmt: skip


def run_bench(script, *args):
    result = subprocess.run(
        [sys.executable, str(PROJECT / "bench" / script), *args],
        capture_output=True, text=True, timeout=600, cwd=PROJECT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_speed_benchmark_writes_json_for_each_model(tiny_root, tmp_path):
    out = tmp_path / "speed.json"
    result = run_bench(
        "speed.py", "--device", "cpu", "--epochs", "2", "--batch-size", "50", "--val-size", "100",
        "--reference-workers", "1", "--data-root", str(tiny_root), "--json", str(out),
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"linear", "hidden1024"} and data["train_images"] == 500
    for name, row in data["models"].items():
        assert set(row) >= SPEED_KEYS, name
        assert all(row[key] > 0 for key in SPEED_KEYS)
        assert len(row["framework_epochs_s"]) == 2
        ratio = row["framework_epoch_s"] / row["plain_epoch_s"]
        assert abs(row["framework_vs_plain"] - ratio) < 0.01
    assert "| hidden1024 |" in result.stdout


def test_speed_benchmark_refuses_a_missing_gpu_or_too_few_epochs(tiny_root):
    result = subprocess.run(
        [sys.executable, str(PROJECT / "bench" / "speed.py"), "--epochs", "1"],
        capture_output=True, text=True, cwd=PROJECT,
    )  # fmt: skip
    assert result.returncode == 2 and "--epochs 1" in result.stderr


def test_quality_benchmark_reports_each_model_beside_pca(tiny_root, tmp_path):
    out, table = tmp_path / "quality.json", tmp_path / "quality.md"
    run_bench(
        "quality.py", "--epochs", "1", "--batch-size", "50", "--val-size", "100",
        "--data-root", str(tiny_root), "--json", str(out), "--markdown", str(table),
        "--runs-dir", str(tmp_path / "runs"), "--sections", "workflow",
    )  # fmt: skip
    rows = json.loads(out.read_text())["models"]
    assert [(r["model"], r["bottleneck"]) for r in rows] == [
        ("linear", 2), ("hidden1024", 2), ("hidden1024", 10),
    ]  # fmt: skip
    for row in rows:
        assert 0 < row["test_mse"] < 0.5 and 0 < row["pca_test_mse"] < 0.5
    assert rows[2]["pca_test_mse"] < rows[0]["pca_test_mse"]  # more components, less error
    assert "| hidden1024 | 10 |" in table.read_text()


@pytest.mark.slow  # a benchmark's smoke test: run with -m slow
def test_quality_benchmark_puts_the_vae_beside_a_plain_loop_and_deep30_beside_its_default(
    tiny_root, tmp_path
):
    out, table = tmp_path / "quality.json", tmp_path / "quality.md"
    run_bench(
        "quality.py", "--epochs", "1", "--deep-epochs", "1", "--batch-size", "50",
        "--val-size", "100", "--data-root", str(tiny_root), "--json", str(out),
        "--markdown", str(table), "--sections", "vae", "deep30",
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert [r["bottleneck"] for r in results["vae"]] == [2, 20]
    for row in results["vae"]:
        assert row["test_nelbo"] > 0 and row["plain_test_nelbo"] > 0
        assert abs(row["nelbo_vs_plain"] - row["test_nelbo"] / row["plain_test_nelbo"]) < 1e-3
    assert [r["recipe"] for r in results["deep30"]] == ["default recipe", "experiment=deep30"]
    assert "elu" in results["deep30"][1]["recipe_words"]  # the recipe is named in words
    assert "cosine" in results["deep30"][1]["recipe_words"]
    assert "| 20 |" in table.read_text() and "| experiment=deep30 |" in table.read_text()


@pytest.mark.slow  # a benchmark's smoke test: run with -m slow
def test_speed_benchmark_with_a_competitor_times_each_thread_count(tiny_root, tmp_path):
    out = tmp_path / "speed.json"
    result = run_bench(
        "speed.py", "--device", "cpu", "--epochs", "2", "--rounds", "1", "--models", "linear",
        "--batch-size", "50", "--val-size", "100", "--reference-workers", "1",
        "--data-root", str(tiny_root), "--json", str(out), "--competitor",
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["flush_denormals"] is True
    situations = data["threads"]["linear"]
    assert set(situations) == {"idle", "contended"}
    for row in situations.values():
        assert row["threads_auto_epoch_s"] > 0 and row["threads_1_epoch_s"] > 0
        assert row["best_forced_epoch_s"] > 0 and row["plain_default_threads_epoch_s"] > 0
        ratio = row["threads_auto_epoch_s"] / row["best_forced_epoch_s"]
        assert abs(row["auto_vs_best"] - ratio) < 0.01
    assert "| linear | contended |" in result.stdout
    # The busy neighbour ran during the contended runs only, and was stopped.
    assert "competitor_pid" not in situations["idle"]
    assert not Path(f"/proc/{situations['contended']['competitor_pid']}").exists()


@pytest.mark.slow  # a benchmark's smoke test: run with -m slow
def test_quality_benchmark_checks_iwae_and_vqvae_against_plain_loops_and_the_iwae_paper(
    tiny_root, tmp_path
):
    out, table = tmp_path / "quality.json", tmp_path / "quality.md"
    run_bench(
        "quality.py", "--epochs", "1", "--batch-size", "50", "--val-size", "100",
        "--data-root", str(tiny_root), "--json", str(out), "--markdown", str(table),
        "--sections", "iwae", "vqvae", "iwae_paper", "--paper-passes", "1",
        "--nll-samples", "5",
    )  # fmt: skip
    results = json.loads(out.read_text())
    iwae, vqvae = results["iwae"], results["vqvae"]
    assert iwae["test_bound"] < 0 and iwae["plain_test_bound"] < 0  # log-likelihood bounds
    assert abs(iwae["bound_vs_plain"] - iwae["test_bound"] / iwae["plain_test_bound"]) < 1e-3
    assert 0 < vqvae["test_mse"] < 0.5 and 0 < vqvae["plain_test_mse"] < 0.5
    paper = results["iwae_paper"]
    assert [r["model"] for r in paper] == ["VAE k=1", "IWAE k=5", "IWAE k=50"]
    assert [r["paper_nll"] for r in paper] == [86.76, 85.54, 84.78]
    assert all(r["test_nll"] > 0 and r["nll_samples"] == 5 for r in paper)
    assert "| IWAE k=50 |" in table.read_text()


def test_quality_benchmark_tables_every_family_and_draws_their_samples_side_by_side(
    tiny_root, tmp_path
):
    from ae_lightning.models import families

    out, table, runs = tmp_path / "quality.json", tmp_path / "quality.md", tmp_path / "runs"
    run_bench(
        "quality.py", "--epochs", "1", "--batch-size", "50", "--val-size", "100",
        "--data-root", str(tiny_root), "--json", str(out), "--markdown", str(table),
        "--runs-dir", str(runs), "--sections", "families", "--family-bottlenecks", "4",
        "--family-nll-samples", "5", "--family-nll-images", "20",
    )  # fmt: skip
    rows = json.loads(out.read_text())["families"]
    assert [r["family"] for r in rows] == list(families())
    by_family = {r["family"]: r for r in rows}
    for family in ("vae", "iwae", "vamp"):  # a likelihood: an NLL, in nats
        assert by_family[family]["nll"] > 0
    for family in ("ae", "sparse", "contractive", "wae", "rae", "vqvae"):
        assert by_family[family]["nll"] is None
    assert by_family["ae"]["config"] == "hidden1024"
    assert "vq 2x512" in by_family["vqvae"]["recipe_words"]  # one codebook per 2 dims
    for row in rows:
        assert 0 < row["mse"] < 0.5 and row["epoch_s"] > 0 and row["fd_samples"] > 0
    text = table.read_text()
    assert "| vqvae | 4 |" in text and "| ae | 4 |" in text and "| - |" in text
    assert (runs / "families_z4" / "comparison" / "samples.png").stat().st_size > 10_000


def test_the_families_table_takes_chosen_families_and_nll_subsets_compare_them(tiny_root, tmp_path):
    out, runs = tmp_path / "quality.json", tmp_path / "runs"
    run_bench(
        "quality.py", "--epochs", "1", "--batch-size", "50", "--val-size", "100",
        "--data-root", str(tiny_root), "--json", str(out), "--runs-dir", str(runs),
        "--sections", "families", "--families", "vae", "--family-bottlenecks", "2",
        "--family-nll-samples", "5", "--family-nll-images", "20",
    )  # fmt: skip
    assert [r["family"] for r in json.loads(out.read_text())["families"]] == ["vae"]
    result = subprocess.run(
        [sys.executable, str(PROJECT / "bench" / "nll_subsets.py"),
         str(runs / "families_z2" / "vae_z2"), "--data-root", str(tiny_root),
         "--samples", "5", "--sizes", "10"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    nlls = json.loads(result.stdout.splitlines()[-1])
    assert {"first 10", "random 10"} <= set(nlls) and all(v > 0 for v in nlls.values())


def test_quality_benchmark_measures_the_sample_quality_floor_and_the_evaluators(
    tiny_root, tmp_path
):
    out = tmp_path / "quality.json"
    result = run_bench(
        "quality.py", "--val-size", "100", "--data-root", str(tiny_root), "--json", str(out),
        "--sections", "sample_quality", "evaluators", "--loop-images", "20",
    )  # fmt: skip
    results = json.loads(out.read_text())
    floor = results["sample_quality"]
    assert floor["images"] == 200 and 0 <= floor["classifier_test_acc"] <= 1
    assert abs(floor["fd_test_vs_itself"]) < 1e-4 < floor["fd_test_vs_train"]
    assert floor["fd_test_vs_its_binary_draw"] > 1e-4  # the noise binarised runs no longer score
    speed = results["evaluators"]
    assert (speed["batched_images"], speed["loop_images"]) == (200, 20)
    for name in ("features", "active_units"):
        row = speed[name]
        assert row["batched_images_per_s"] > 0 and row["loop_images_per_s"] > 0
        assert row["speedup"] == pytest.approx(
            row["batched_images_per_s"] / row["loop_images_per_s"], rel=0.05, abs=0.1
        )
    assert "| features |" in result.stdout and "Sample quality floor" in result.stdout


@pytest.mark.slow  # a benchmark's smoke test: run with -m slow
def test_startup_benchmark_times_each_command_beside_the_lightning_import(tiny_root, tmp_path):
    out = tmp_path / "startup.json"
    small = [f"--override={o}" for o in tiny_overrides(tiny_root)[2:]]  # root: --data-root
    result = run_bench("startup.py", "--repeats", "1", "--data-root", str(tiny_root),
                       "--json", str(out), *small)  # fmt: skip
    data = json.loads(out.read_text())
    rows = data["seconds"]
    assert "python train.py --help" in rows and "python train.py debug=fast" in rows
    assert all(len(times) == 1 and times[0] > 0 for times in rows.values())
    fast, lightning = rows["python train.py debug=fast"][0], rows[
        'python -c "import pytorch_lightning"'][0]  # fmt: skip
    assert data["debug_fast_vs_lightning_import"] == pytest.approx(fast / lightning, abs=0.01)
    assert "| `ae-export --help` |" in result.stdout


def test_denormal_benchmark_trains_both_float_modes_to_the_same_result(tiny_root, tmp_path):
    out = tmp_path / "denormals.json"
    result = run_bench(
        "denormals.py", "--epochs", "2", "--model", "linear", "--batch-size", "50",
        "--val-size", "100", "--data-root", str(tiny_root), "--json", str(out),
    )  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"flush", "no flush"}
    assert all(len(row["epoch_times_s"]) == 2 for row in runs.values())
    # Flushing changes the speed, not the maths (denormals are below float32's resolution
    # of these values): the same test MSE to the digits reported.
    assert runs["flush"]["test_mse"] == pytest.approx(runs["no flush"]["test_mse"], rel=1e-4)
    assert "| no flush |" in result.stdout
