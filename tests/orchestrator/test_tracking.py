"""The MLflow callback against a real (SQLite) store, with the server made to fail for a while."""

from types import SimpleNamespace

from orchestrator.tracking import SWEEP_TAG, TRIAL_ID_TAG, MlflowTuneCallback, SweepTracker


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


def test_reports_a_killed_driver_never_logged_are_recovered_from_the_checkpoint(tmp_path):
    """The sweep driver was killed after the trial's step-20 checkpoint but before its reports of
    steps 15-20 reached MLflow. The resumed trial starts after 20 and never reports them again:
    the callback logs them from the checkpoint's history, and logs nothing twice."""
    import json

    tracker = SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", experiment="e", sweep_name="s")
    history = [
        {"step": s, "train_loss": 9.0 - s / 10, **({"val_ppl": 99.0 - s} if s % 10 == 0 else {})}
        for s in (5, 10, 15, 20)
    ]
    checkpoint = tmp_path / "checkpoint_000002"
    checkpoint.mkdir()
    (checkpoint / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))

    first = MlflowTuneCallback(tracker, lambda trial: {}, metric="val_ppl", mode="min", storage=str(tmp_path))
    trial = SimpleNamespace(trial_id="t1", error_msg="")
    for row in history[:2]:  # what the first driver logged before it died
        first.on_trial_result(0, [], trial, row)

    resumed = MlflowTuneCallback(tracker, lambda trial: {}, metric="val_ppl", mode="min", storage=str(tmp_path))
    resumed.on_trial_start(0, [], trial)
    resumed.on_trial_result(
        0, [], trial, {"step": 20, "event": "resume", "from_step": 20, "resumed_from": str(checkpoint)}
    )
    resumed.on_trial_result(0, [], trial, {"step": 20, "val_ppl": 79.0})  # a repeated report: not logged again
    resumed.on_trial_result(0, [], trial, {"step": 25, "train_loss": 6.0})
    run_id = resumed.run_ids["t1"]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "train_loss")] == [5, 10, 15, 20, 25]
    assert [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "val_ppl")] == [(10, 89.0), (20, 79.0)]


def test_a_fresh_sweep_leaves_the_earlier_runs_out_of_its_record(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = SweepTracker(uri, "e", "s")
    child = first.client.create_run(first.experiment_id, tags={SWEEP_TAG: "s", TRIAL_ID_TAG: "old"}).info.run_id
    assert SweepTracker(uri, "e", "s").parent_id == first.parent_id  # a resume finds its parent again
    fresh = SweepTracker(uri, "e", "s", fresh=True)
    assert fresh.parent_id != first.parent_id
    retired = fresh.client.get_run(child).data.tags[SWEEP_TAG]
    assert retired.startswith("s@") and fresh.client.get_run(first.parent_id).data.tags[SWEEP_TAG] == retired
