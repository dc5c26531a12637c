"""The end-of-sweep report read back from a real MLflow store: best values by the sweep's mode."""

import math

from mlflow.tracking import MlflowClient

from orchestrator.report import readable_bytes, register_best, summary_table, trial_rows
from orchestrator.tracking import SWEEP_TAG, TRIAL_ID_TAG, MlflowTuneCallback, SweepTracker


def _store_with_two_trials(tmp_path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("e")
    for trial, values in (("a", [100.0, 300.0, 200.0]), ("b", [150.0, 250.0])):
        run = client.create_run(experiment, tags={SWEEP_TAG: "s", TRIAL_ID_TAG: trial, "status": "completed"})
        for step, value in enumerate(values):
            client.log_metric(run.info.run_id, "tokens_per_s", value, step=step)
        client.log_param(run.info.run_id, "relora.rank", trial)
    return client, experiment


def test_mode_max_takes_the_largest_value_as_best(tmp_path):
    client, experiment = _store_with_two_trials(tmp_path)
    rows = trial_rows(client, experiment, "s", ["relora.rank"], "tokens_per_s", mode="max")
    assert {r["trial"]: r["best"] for r in rows} == {"a": 300.0, "b": 250.0}
    assert "300.000" in summary_table(rows, ["relora.rank"], "tokens_per_s")
    rows = trial_rows(client, experiment, "s", ["relora.rank"], "tokens_per_s", mode="min")
    assert {r["trial"]: r["best"] for r in rows} == {"a": 100.0, "b": 150.0}
    assert not math.isnan(rows[0]["best"])


def test_mode_max_registers_the_largest_and_reports_it_per_trial(tmp_path):
    client, experiment = _store_with_two_trials(tmp_path)
    rows = trial_rows(client, experiment, "s", ["relora.rank"], "tokens_per_s", mode="max")
    best, version = register_best(client, rows, "fastest", "max")
    assert best["trial"] == "a" and version == 1
    assert client.get_model_version("fastest", "1").run_id == best["run_id"]

    tracker = SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", "e2", "s2")
    callback = MlflowTuneCallback(tracker, lambda trial: {}, metric="tokens_per_s", mode="max")
    callback.curves["t"] = [{"tokens_per_s": 5.0}, {"tokens_per_s": 9.0}, {"train_loss": 1.0}, {"tokens_per_s": 7.0}]
    assert callback.best_value("t") == 9.0


def test_the_best_logged_model_is_registered_from_a_store_that_is_not_the_default(tmp_path, monkeypatch):
    """`--tracking-uri sqlite:///elsewhere.db`: MLflow's SQL store resolves a `models:/<id>`
    source through the process's default store (./mlflow.db here), where the model is not."""
    from mlflow.entities import LoggedModelStatus

    client, experiment = _store_with_two_trials(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the default store, ./mlflow.db, is another database
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = trial_rows(client, experiment, "s", ["relora.rank"], "tokens_per_s", mode="max")
    best = next(r for r in rows if r["trial"] == "a")
    model = client.create_logged_model(experiment, name="model", source_run_id=best["run_id"])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    client.log_model_artifacts(model.model_id, str(tmp_path / "model"))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.set_tag(best["run_id"], "logged_model_id", model.model_id)

    assert register_best(client, rows, "fastest", "max") == (best, 1)
    version = client.get_model_version("fastest", "1")
    assert version.source == f"models:/{model.model_id}" and version.run_id == best["run_id"]
    assert client.get_model_version_download_uri("fastest", "1") == model.artifact_location


def test_the_summary_puts_each_trials_speed_and_memory_beside_its_result(tmp_path):
    """Mean tokens/s over a trial's reports and the memory its last engine measured;
    a trial without a cost metric gets a dash, and the CSV has the raw numbers."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("e")
    for trial, speeds, memory in (("full", [100.0, 300.0], [2.5e9, 4.0e9]), ("galore", [50.0], [])):
        run = client.create_run(experiment, tags={SWEEP_TAG: "s", TRIAL_ID_TAG: trial, "status": "completed"})
        client.log_param(run.info.run_id, "relora.method", trial)
        client.log_metric(run.info.run_id, "val_ppl", 20.0, step=10)
        for step, value in enumerate(speeds):
            client.log_metric(run.info.run_id, "tokens_per_s", value, step=step)
        for step, value in enumerate(memory):
            client.log_metric(run.info.run_id, "memory_total_bytes", value, step=step)
    rows = trial_rows(client, experiment, "s", ["relora.method"], "val_ppl")
    table = summary_table(rows, ["relora.method"], "val_ppl").splitlines()
    assert table[0].split() == ["trial", "relora.method", "best", "val_ppl", "tokens/s", "memory/worker", "status"]
    assert table[2].split() == ["full", "full", "20.000", "200", "4.0", "GB", "completed"]
    assert table[3].split() == ["galore", "galore", "20.000", "50", "-", "completed"]
    assert readable_bytes(512) == "512 B" and readable_bytes(1.3e6) == "1.3 MB"
