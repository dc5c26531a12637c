"""The MLflow callback against real stores: SQLite, and a real server stopped and started again."""

from types import SimpleNamespace

import pytest
from conftest import start_mlflow_server
from mlflow.tracking import MlflowClient

from orchestrator.tracking import SWEEP_TAG, TRIAL_ID_TAG, MlflowTuneCallback, SweepTracker, is_transient


def _callback(uri: str, **kwargs) -> MlflowTuneCallback:
    tracker = SweepTracker(uri, experiment="e", sweep_name="s")
    callback = MlflowTuneCallback(
        tracker, lambda trial: {"relora": {"rank": 4}}, metric="val_ppl", mode="min", **kwargs
    )
    callback.retry_delays_s = (0.2, 0.5)
    return callback


def test_a_trial_never_waits_on_a_stopped_server_and_loses_nothing_when_it_returns(tmp_path, monkeypatch):
    """A real `mlflow server`, stopped and started again on the same port and store."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    trial = SimpleNamespace(trial_id="t1", error_msg="")
    with start_mlflow_server(tmp_path) as uri:
        callback = _callback(uri)
        callback.on_trial_start(0, [], trial)
        callback.on_trial_result(0, [], trial, {"step": 10, "val_ppl": 90.0, "train_loss": 5.0})
        callback.flush()
    # The server is down: Tune's hooks only queue; the recorder thread keeps trying.
    for step in (20, 30):
        callback.on_trial_result(0, [], trial, {"step": step, "val_ppl": 100.0 - step, "train_loss": 5.0})
    callback.on_trial_complete(0, [], trial)
    assert callback._events.unfinished_tasks >= 1, "the hooks returned before MLflow took their events"
    with start_mlflow_server(tmp_path, port=int(uri.rsplit(":", 1)[1])):
        callback.flush()
        client = MlflowClient(uri)
        run_id = callback.run_ids["t1"]
        assert [m.step for m in client.get_metric_history(run_id, "val_ppl")] == [10, 20, 30]
        run = client.get_run(run_id)
        assert run.data.params["relora.rank"] == "4" and run.data.tags["status"] == "early-stopped"
        assert run.info.status == "FINISHED" and callback.dropped == []


def test_a_call_that_can_never_succeed_is_dropped_with_a_warning_and_the_rest_goes_on(tmp_path, caplog):
    callback = _callback(f"sqlite:///{tmp_path}/mlflow.db")
    trial = SimpleNamespace(trial_id="t1", error_msg="")
    callback.on_trial_start(0, [], trial)
    callback.flush()
    run_id = callback.run_ids["t1"]
    # MLflow refuses to change a logged param; a missing folder (as after a full disk) fails the
    # same way at every try. Neither is retried, neither stops what comes after.
    assert callback._call("log_param", run_id, "relora.rank", "8") is None
    assert callback._call("log_artifact", run_id, str(tmp_path / "gone.txt")) is None
    checkpoint = tmp_path / "checkpoint_000007"  # a final checkpoint whose files are gone
    checkpoint.mkdir()
    callback.on_trial_result(0, [], trial, {"step": 10, "val_ppl": 50.0, "event": "restart", "restarts": 1})
    callback.on_trial_result(0, [], trial, {"step": 20, "event": "done", "checkpoint_path": str(checkpoint)})
    callback.on_trial_complete(0, [], trial)
    callback.flush()
    run = callback.client.get_run(run_id)
    assert run.data.params["relora.rank"] == "4" and run.data.tags["merges"] == "1"
    assert run.data.tags["status"] == "completed" and run.info.status == "FINISHED"
    assert [m.value for m in callback.client.get_metric_history(run_id, "val_ppl")] == [50.0]
    dropped = [d.split(":")[0] for d in callback.dropped]
    assert dropped == ["log_param", "log_artifact", "_log_model"]
    assert "failed for good" in caplog.text and "it is dropped" in caplog.text


def test_transient_failures_are_told_from_permanent_ones():
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, REQUEST_LIMIT_EXCEEDED

    assert is_transient(ConnectionError("refused")) and is_transient(requests.ConnectionError("reset"))
    assert is_transient(MlflowException("server error", error_code=INTERNAL_ERROR))
    assert is_transient(MlflowException("slow down", error_code=REQUEST_LIMIT_EXCEEDED))  # 429
    assert not is_transient(MlflowException("changed param", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(OSError(28, "No space left on device")) and not is_transient(ValueError("bad"))


def test_a_restored_tuner_records_through_the_live_callback_and_tuner_pkl_holds_no_tracking_uri(tmp_path):
    import pickle

    secret_uri = f"sqlite:///{tmp_path}/first.db?token=SECRET"
    first = _callback(secret_uri.split("?")[0], live_key="test-sweep")
    first.tracker.tracking_uri = secret_uri  # as a URI with credentials would be
    stored = pickle.dumps([first])
    assert b"SECRET" not in stored and b"first.db" not in stored
    second = _callback(f"sqlite:///{tmp_path}/second.db", live_key="test-sweep")  # the resumed driver's
    (restored,) = pickle.loads(stored)
    assert restored is second
    unregistered = _callback(f"sqlite:///{tmp_path}/third.db")
    with pytest.raises(TypeError, match="live_key"):
        pickle.dumps(unregistered)


def test_credentials_never_reach_mlflow_params():
    from orchestrator.tracking import params_of

    config = {"run": {"storage_path": "s3://AKIAEXAMPLE:wJalrSECRET@bucket/sweeps?secret_key=abc&region=eu"}}
    (param,) = params_of(config)
    assert param.key == "run.storage_path"
    assert "AKIAEXAMPLE" not in param.value and "wJalrSECRET" not in param.value and "abc" not in param.value
    assert param.value.startswith("s3://***@bucket/sweeps") and "region=eu" in param.value


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
    first.flush()

    resumed = MlflowTuneCallback(tracker, lambda trial: {}, metric="val_ppl", mode="min", storage=str(tmp_path))
    resumed.on_trial_start(0, [], trial)
    resumed.on_trial_result(
        0, [], trial, {"step": 20, "event": "resume", "from_step": 20, "resumed_from": str(checkpoint)}
    )
    resumed.on_trial_result(0, [], trial, {"step": 20, "val_ppl": 79.0})  # a repeated report: not logged again
    resumed.on_trial_result(0, [], trial, {"step": 25, "train_loss": 6.0})
    resumed.flush()
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


def test_a_resumed_sweep_records_on_the_tracking_server_it_was_resumed_with(local_ray, tmp_path):
    """A real Tuner, stored and restored: the restored callbacks are the driver's new ones."""
    from ray import tune

    def fails_once(config: dict) -> None:  # defined here: Ray's workers get it by value
        """Dies after its first report the first time the sweep runs, then completes."""
        import os

        import ray.tune

        marker = os.path.join(config["marker_dir"], str(config["x"]))
        ray.tune.report({"step": 1, "val_ppl": 10.0 + config["x"]})
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("the first run dies here")
        ray.tune.report({"step": 2, "val_ppl": 5.0 + config["x"]})

    first_uri, second_uri = f"sqlite:///{tmp_path}/first.db", f"sqlite:///{tmp_path}/second.db"
    (tmp_path / "markers").mkdir()
    space = {"x": tune.grid_search([1, 2]), "marker_dir": str(tmp_path / "markers")}
    first = _callback(first_uri, live_key="sweep")
    run_config = tune.RunConfig(name="resume", storage_path=str(tmp_path / "ray"), callbacks=[first])
    tune.Tuner(fails_once, param_space=space, run_config=run_config).fit()
    first.flush()
    errored = first.client.search_runs([first.tracker.experiment_id], filter_string="tags.status = 'errored'")
    assert len(errored) == 2
    assert b"first.db" not in (tmp_path / "ray" / "resume" / "tuner.pkl").read_bytes()

    second = _callback(second_uri, live_key="sweep")  # the resumed driver's, on another server
    restored = tune.Tuner.restore(str(tmp_path / "ray" / "resume"), fails_once, resume_errored=True)
    restored.fit()
    second.flush()
    finished = "metrics.best_val_ppl > 0"  # a trial's end writes its best value
    runs = second.client.search_runs([second.tracker.experiment_id], filter_string=finished)
    assert len(runs) == 2, "the restored Tuner's trials are recorded by the new driver's callback"
    assert sorted(r.data.metrics["best_val_ppl"] for r in runs) == [6.0, 7.0]
    first_runs = first.client.search_runs([first.tracker.experiment_id], filter_string="metrics.best_val_ppl < 10")
    assert not first_runs, "nothing of the resumed sweep went to the first server"


def byte_level_bpe(texts: list[str], vocab_size: int):
    """A small real tokenizer, trained here (the data pipeline's trains on a Ray Dataset)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 endpoint (moto's server on a local port) with one bucket: what cluster.yaml's
    storage is. Yields the bucket's URI as Ray Train and pyarrow take it."""
    import boto3
    from conftest import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": endpoint,  # where MLflow's own loaders find the bucket
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="sweeps")
    yield f"s3://sweeps/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
    server.stop()


def test_a_model_on_object_storage_is_linked_and_registered_by_reference_never_copied(s3_bucket, tmp_path):
    """A trial whose checkpoints are in S3: its end reads only the history from the bucket; the
    merged model (saved there by rank 0 as an MLflow model) is linked to the run by its URI and
    registered from it, through a real MLflow server, and MLflow's own API loads it from S3."""
    import json

    import mlflow
    import pyarrow.fs

    from orchestrator.data import builtin_documents
    from orchestrator.report import register_best, trial_rows
    from orchestrator.tracking import MODEL_URI_TAG, save_merged_model
    from relora import build_model

    tokenizer = byte_level_bpe(builtin_documents(), vocab_size=300)
    checkpoint = tmp_path / "checkpoint_000003"
    save_merged_model(build_model("llama-tiny", vocab_size=len(tokenizer)), tokenizer, checkpoint / "merged")
    history = [{"step": 10, "val_ppl": 40.0}, {"step": 20, "val_ppl": 30.0, "event": "done"}]
    (checkpoint / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    fs, root = pyarrow.fs.FileSystem.from_uri(s3_bucket)
    remote = f"{root}/trial_1/checkpoint_000003"
    pyarrow.fs.copy_files(str(checkpoint), remote, pyarrow.fs.LocalFileSystem(), fs)

    with start_mlflow_server(tmp_path / "mlflow") as uri:
        callback = _callback(uri, storage=s3_bucket)
        trial = SimpleNamespace(trial_id="t1", error_msg="")
        callback.on_trial_start(0, [], trial)
        for row in history:
            callback.on_trial_result(0, [], trial, {**row, "checkpoint_path": remote})
        callback.on_trial_complete(0, [], trial)
        callback.flush()
        assert callback.dropped == []
        run = callback.client.get_run(callback.run_ids["t1"])
        assert run.data.tags[MODEL_URI_TAG] == f"s3://{remote}/merged"  # no endpoint or credentials in it
        assert "logged_model_id" not in run.data.tags and not callback.client.search_logged_models(
            [callback.tracker.experiment_id]
        ), "nothing was uploaded"
        assert {a.path for a in callback.client.list_artifacts(run.info.run_id)} == {"config.yaml", "history.jsonl"}

        rows = trial_rows(callback.client, callback.tracker.experiment_id, "s", [], "val_ppl")
        best, version = register_best(callback.client, rows, "s-best", "min")
        assert best["run_id"] == run.info.run_id and version == 1
        assert callback.client.get_model_version("s-best", "1").source == f"s3://{remote}/merged"
        mlflow.set_tracking_uri(uri)
        try:
            generate = mlflow.transformers.load_model("models:/s-best/1")
        finally:
            mlflow.set_tracking_uri(None)
        assert len(generate("To be", max_new_tokens=3, do_sample=False)[0]["generated_text"]) > len("To be")
