"""`logger=mlflow`: a local MLflow store, read back with MLflow's own client."""

import pytest

from conftest import run_train_cli, tiny_overrides


def test_mlflow_store_holds_metrics_hyperparameters_and_figures(tiny_root, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as logger=mlflow sets for the run
    result = run_train_cli(
        [*tiny_overrides(tiny_root), "logger=mlflow", "trainer.max_epochs=2",
         "figures.every_n_epochs=1", "~callbacks.projector"],
        logs=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()

    client = mlflow.MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    experiment = client.get_experiment_by_name("ae-lightning")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["run_dir"] == str(run_dir)
    assert run.data.params["bottleneck"] == "2" and run.data.params["max_epochs"] == "2"
    assert run.data.metrics["test/mse"] > 0 and "test/knn_acc" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "val/mse")
    assert [m.step for m in history] == [9, 19]  # the last step of each 10-step epoch

    final = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    names = ("scatter", "reconstructions", "interpolation", "samples", "manifold")
    assert final == {f"figures/{name}.png" for name in names}
    per_epoch = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert sum("figures~scatter+step+" in p and p.endswith(".png") for p in per_epoch) == 2
