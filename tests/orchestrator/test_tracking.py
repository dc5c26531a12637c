"""The MLflow callback against a real (SQLite) store, with the server made to fail for a while."""

from types import SimpleNamespace

from orchestrator.tracking import MlflowTuneCallback, SweepTracker


def test_a_briefly_unreachable_server_loses_nothing_and_raises_nothing(tmp_path):
    tracker = SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", experiment="e", sweep_name="s")
    callback = MlflowTuneCallback(tracker, lambda trial: {"relora": {"rank": 4}}, metric="val_ppl", mode="min")
    trial = SimpleNamespace(trial_id="t1", error_msg="")
    callback.on_trial_start(0, [], trial)

    real_log_batch = tracker.client.log_batch
    outage = {"calls": 0}

    def failing_log_batch(*args, **kwargs):
        outage["calls"] += 1
        raise ConnectionError("tracking server unreachable")

    tracker.client.log_batch = failing_log_batch
    for step in (10, 20):  # reports arrive while the server is away: no exception reaches Tune
        callback.on_trial_result(0, [], trial, {"step": step, "val_ppl": 100.0 - step, "train_loss": 5.0})
    assert outage["calls"] >= 1 and callback.pending

    tracker.client.log_batch = real_log_batch  # the server is back
    callback.on_trial_result(0, [], trial, {"step": 30, "val_ppl": 60.0, "train_loss": 4.0})
    assert not callback.pending
    run_id = callback.run_ids["t1"]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "val_ppl")] == [10, 20, 30]
    assert tracker.client.get_run(run_id).data.params["relora.rank"] == "4"


def test_a_call_mlflow_refuses_is_dropped_without_blocking_the_rest(tmp_path):
    tracker = SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", experiment="e", sweep_name="s")
    callback = MlflowTuneCallback(tracker, lambda trial: {"relora": {"rank": 4}}, metric="val_ppl", mode="min")
    trial = SimpleNamespace(trial_id="t1", error_msg="")
    callback.on_trial_start(0, [], trial)
    run_id = callback.run_ids["t1"]
    # MLflow refuses to change a logged param: that call can never succeed, at any retry.
    callback._call("log_param", run_id, "relora.rank", "8")
    callback.on_trial_result(0, [], trial, {"step": 10, "val_ppl": 50.0, "event": "restart", "restarts": 1})
    assert not callback.pending
    run = tracker.client.get_run(run_id)
    assert run.data.params["relora.rank"] == "4" and run.data.tags["merges"] == "1"
    assert [m.value for m in tracker.client.get_metric_history(run_id, "val_ppl")] == [50.0]


def test_credentials_never_reach_mlflow_params():
    from orchestrator.tracking import params_of

    config = {"run": {"storage_path": "s3://AKIAEXAMPLE:wJalrSECRET@bucket/sweeps?secret_key=abc&region=eu"}}
    (param,) = params_of(config)
    assert param.key == "run.storage_path"
    assert "AKIAEXAMPLE" not in param.value and "wJalrSECRET" not in param.value and "abc" not in param.value
    assert param.value.startswith("s3://***@bucket/sweeps") and "region=eu" in param.value


def test_checkpoint_downloads_are_deleted_once_the_calls_that_read_them_ran(tmp_path):
    tracker = SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", experiment="e", sweep_name="s")
    callback = MlflowTuneCallback(tracker, lambda trial: {"relora": {"rank": 4}}, metric="val_ppl", mode="min")
    trial = SimpleNamespace(trial_id="t1", error_msg="")
    callback.on_trial_start(0, [], trial)
    download = tmp_path / "relora-checkpoint-copy"  # what _local made of a checkpoint in object storage
    (download / "merged").mkdir(parents=True)
    callback.downloads.append(str(download))

    real_log_batch = tracker.client.log_batch
    tracker.client.log_batch = lambda *args, **kwargs: (_ for _ in ()).throw(ConnectionError("away"))
    callback.on_trial_result(0, [], trial, {"step": 10, "val_ppl": 90.0})
    callback.flush()
    assert callback.pending and download.is_dir(), "kept while a call may still need it"
    tracker.client.log_batch = real_log_batch
    callback.flush()
    assert not callback.pending and not download.exists() and not callback.downloads
