"""MLflow records of a sweep: one parent run, one nested child run per Tune trial.

All logging happens in the sweep driver, from a Ray Tune callback that sees every
report of every trial (rank 0's metrics, forwarded by Ray Train's `TuneReportCallback`),
so each metric is written once, whatever the number of workers. Tune runs callbacks on the
event loop that also carries every trial's reports, so the callback's hooks only queue what
they were given; one recorder thread writes it to MLflow in order, retrying through an
outage and dropping, with a warning, a call that can never succeed. No trial waits on MLflow.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import UserCallback
from ray.tune import Callback

from orchestrator.config import flatten, redact
from orchestrator.search import VARIANT

log = logging.getLogger(__name__)

CURVE_METRICS = (
    "train_loss",
    "lr",
    "val_loss",
    "val_ppl",
    "tokens_per_s",
    "mfu",
    "update_rank_max",
    "update_rank_mean",
    "merge_lost_share",
    # one worker's bytes, measured in each engine's second step (orchestrator.worker)
    "memory_params_bytes",
    "memory_grads_bytes",
    "memory_optimizer_bytes",
    "memory_total_bytes",
    "memory_device_peak_bytes",
)
TRIAL_ID_TAG = "tune_trial_id"
MODEL_URI_TAG = "model_uri"  # where a trial's merged MLflow model is, on object storage (registered by reference)
HISTORY_ARTIFACT = "history.jsonl"
SWEEP_TAG = "relora_sweep"
# What MLflow 3 names a model-training experiment. MLflow 3.17's UI opens on its GenAI view
# whatever the tag says (it picks the view from the URL's `workflowType`, else from what the
# browser chose last), so `results_url` is the link that opens the sweep on its training runs.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def results_url(experiment_id: str, metric: str, mode: str, base: str = "") -> str:
    """The MLflow UI page of an experiment's training runs, in the chart view. Sorting by the
    metric lists child runs flat (MLflow nests them only when sorted by start time), so every
    trial's curve is drawn without expanding its parent."""
    query = (
        f"workflowType=machine_learning&compareRunsMode=CHART&orderByKey=metrics.%60{metric}%60"
        f"&orderByAsc={'true' if mode == 'min' else 'false'}"
    )
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def curve_row(report: dict) -> dict[str, float]:
    """The MLflow metrics in one report (a Tune result or a history row), keyed as MLflow names them."""
    row = {k: float(report[k]) for k in CURVE_METRICS if isinstance(report.get(k), (int, float))}
    return {k: v for k, v in row.items() if math.isfinite(v)}


def layer_ranks(reports: list[dict]) -> dict[int, dict[str, int]]:
    """Per-layer update ranks by restart step, from the restart events among ``reports``. They are
    an artifact (`update_ranks/`), not metrics: at 350M they would be 168 curves per run."""
    ranks: dict[int, dict[str, int]] = {}
    for report in reports:
        layers = {k.removeprefix("update_rank/"): v for k, v in report.items() if k.startswith("update_rank/")}
        if layers and report.get("event") == "restart":
            ranks[int(report.get("at_step", report.get("step", 0)))] = layers
    return ranks


def config_yaml(config: dict) -> str:
    """A run's resolved config as YAML that `python -m orchestrator.train` takes as it is
    (credentials in URIs blanked, as in the params)."""
    import yaml

    def blank(value):
        if isinstance(value, dict):
            return {k: blank(v) for k, v in value.items()}
        if isinstance(value, list):
            return [blank(v) for v in value]
        return redact(value) if isinstance(value, str) else value

    return yaml.safe_dump(blank(config), sort_keys=False)


def model_requirements() -> list[str]:
    """What loading the logged model needs, pinned to what wrote it. Given explicitly: MLflow's
    inference of them loads the model once more, and adds a torchvision that is not installed."""
    import importlib.metadata as md

    packages = ("mlflow", "transformers", "torch", "tokenizers", "safetensors")
    return [f"{name}=={md.version(name).split('+')[0]}" for name in packages]


def save_merged_model(model, tokenizer, path: Path) -> None:
    """Save the merged model as an MLflow `transformers` model (`MLmodel`, `model/`,
    `components/tokenizer/`), on the worker that holds it: the driver then links or uploads
    files and never loads a model. `model/` also gets the tokenizer, so that it is a whole
    Hugging Face folder (`from_pretrained` needs no MLflow)."""
    import mlflow.transformers

    mlflow.transformers.save_model(
        {"model": model, "tokenizer": tokenizer},
        str(path),
        task="text-generation",
        pip_requirements=model_requirements(),
    )
    tokenizer.save_pretrained(Path(path) / "model")


def params_of(config: dict) -> list[mlflow.entities.Param]:
    """A resolved config as MLflow params: dotted keys, values cut to MLflow's limit, credentials blanked."""
    return [mlflow.entities.Param(key, redact(value)[:6000]) for key, value in flatten(config).items()]


def is_transient(error: Exception) -> bool:
    """Whether a failed MLflow call may succeed later: after a connection error, a timeout, a
    5xx or a 429. Not when MLflow refused it (another 4xx, such as a changed param value), nor
    after any other error (a full disk, a missing file): retrying those would never end."""
    import requests

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return not (400 <= status < 500) or status == 429
    return isinstance(error, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout))


class SweepTracker:
    """The parent run of a sweep, found again by name on resume (no duplicates)."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str, *, fresh: bool = False) -> None:
        self._open(tracking_uri, experiment)
        self.sweep_name = sweep_name
        if fresh:
            self.retire_earlier_runs()
        self.parent_id = self._find_or_create(
            f"tags.{SWEEP_TAG} = '{sweep_name}' and tags.sweep_role = 'parent'",
            run_name=sweep_name,
            tags={SWEEP_TAG: sweep_name, "sweep_role": "parent"},
        )

    def _open(self, tracking_uri: str, experiment: str) -> None:
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        for key, value in EXPERIMENT_KIND.items():
            self.client.set_experiment_tag(self.experiment_id, key, value)

    def retire_earlier_runs(self) -> int:
        """`--fresh`: an earlier sweep of this name keeps its runs, re-tagged `<name>@<time>`, so that
        the new sweep's summary, plots and registered model are its own."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        query = f"tags.{SWEEP_TAG} = '{self.sweep_name}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=50_000)
        for run in runs:
            self.client.set_tag(run.info.run_id, SWEEP_TAG, f"{self.sweep_name}@{stamp}")
        return len(runs)

    def _find_or_create(self, query: str, *, run_name: str, tags: dict) -> str:
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if runs:
            return runs[0].info.run_id
        return self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id

    def log_warm_start(self, key: str, config: dict, history: list[dict], checkpoint: str) -> str:
        """A run of its own for a shared warm start: its config, curves and checkpoint."""
        run_id = self._find_or_create(
            f"tags.{SWEEP_TAG} = '{self.sweep_name}' and tags.warm_start_key = '{key}'",
            run_name=f"warm-start-{key}",
            tags={
                SWEEP_TAG: self.sweep_name,
                "sweep_role": "warm_start",
                "warm_start_key": key,
                "mlflow.parentRunId": self.parent_id,
                "checkpoint": checkpoint,
            },
        )
        now = int(time.time() * 1000)
        params = params_of(config)
        metrics = [
            mlflow.entities.Metric(k, float(h[k]), now, int(h["step"]))
            for h in history
            for k in CURVE_METRICS
            if isinstance(h.get(k), (int, float)) and math.isfinite(h[k])
        ]
        for i in range(0, max(len(params), len(metrics)), 100):
            self.client.log_batch(run_id, params=params[i : i + 100], metrics=metrics[i : i + 100])
        self.client.log_text(run_id, config_yaml(config), "config.yaml")
        self.client.set_terminated(run_id)
        return run_id

    def child_run(self, trial_id: str, run_name: str) -> str:
        """The trial's child run: created once, reused when the sweep resumes."""
        return self._find_or_create(
            f"tags.{SWEEP_TAG} = '{self.sweep_name}' and tags.{TRIAL_ID_TAG} = '{trial_id}'",
            run_name=run_name,
            tags={SWEEP_TAG: self.sweep_name, TRIAL_ID_TAG: trial_id, "mlflow.parentRunId": self.parent_id},
        )


class TrialTracker(SweepTracker):
    """One trial without a sweep (`python -m orchestrator.train`): a top-level run of its own in
    the experiment ``run.name``, found again by its Ray Train run name when the trial resumes."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        self._open(tracking_uri, experiment)
        self.sweep_name, self.parent_id = run_name, None

    def child_run(self, trial_id: str, run_name: str) -> str:
        return self._find_or_create(
            f"tags.relora_trial = '{trial_id}'",
            run_name=run_name,
            tags={"relora_trial": trial_id, "sweep_role": "trial"},
        )


@dataclass(frozen=True)
class SingleRun:
    """What `MlflowTuneCallback` reads of a Tune trial, for a run that has no Tune."""

    trial_id: str

    def __str__(self) -> str:
        return self.trial_id


class MlflowTrainCallback(UserCallback):
    """Ray Train's side of a single trial: rank 0's reports go to its MLflow run through the
    same `MlflowTuneCallback` a sweep uses, so the run holds what a sweep's child run holds.

    Ray Train runs its callbacks in the run's controller actor; the MLflow client is made
    there, at the first report."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, config: dict, storage: str = "") -> None:
        self.tracking_uri, self.experiment, self.run = tracking_uri, experiment, SingleRun(run_name)
        self.config, self.storage = config, storage
        self._recorder: MlflowTuneCallback | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_recorder": None}

    def recorder(self) -> MlflowTuneCallback:
        if self._recorder is None:
            tracker = TrialTracker(self.tracking_uri, self.experiment, self.run.trial_id)
            self._recorder = MlflowTuneCallback(
                tracker, lambda _: self.config, metric="val_ppl", mode="min", storage=self.storage
            )
        return self._recorder

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        result = dict(metrics[0])
        if checkpoint is not None:
            result["checkpoint_path"] = checkpoint.path
        recorder = self.recorder()
        recorder.on_trial_result(0, [], self.run, result)
        if result.get("event") == "done" or result.get("stop_reason"):
            recorder.on_trial_complete(0, [], self.run)
            recorder.flush()  # the run's end: its record is whole before the controller exits


@dataclass(frozen=True)
class TrialSnapshot:
    """What the recorder thread needs of a Tune trial, read on Tune's loop (Tune mutates trials)."""

    trial_id: str
    name: str
    error_msg: str
    config: dict | None  # the resolved config, on the first event of the trial only
    warm_start: str | None
    variant: str | None = None  # the sweep's named variant the trial runs, if any (first event only)

    def __str__(self) -> str:
        return self.name


_LIVE_CALLBACKS: dict[str, MlflowTuneCallback] = {}


def live_callback(key: str) -> Callback:
    """What a pickled `MlflowTuneCallback` becomes when unpickled: the one this process made
    under ``key`` (a restored Tuner records through the driver's callback, with its tracking
    URI and storage), or a callback that records nothing where there is none."""
    callback = _LIVE_CALLBACKS.get(key)
    if callback is None:
        log.warning("no MLflow callback %r in this process: the restored sweep's trials are not recorded", key)
        return Callback()
    return callback


class MlflowTuneCallback(Callback):
    """Writes each trial's params, curves, status and merged checkpoint to its child run.

    Tune's hooks run on the loop that carries every trial's reports: they only snapshot the
    trial and queue the event. One recorder thread replays the events in order; an MLflow
    call that fails for a while (a server away, a 5xx) is retried until it goes through,
    one that can never succeed is dropped with an error in the log (and kept in `dropped`).
    `flush()` waits until the queue is written.
    """

    def __init__(
        self,
        tracker: SweepTracker,
        trial_configs,
        metric: str,
        mode: str,
        warm_start_of=None,
        storage: str = "",
        live_key: str | None = None,
    ) -> None:
        self.tracker = tracker
        self.storage = storage  # where checkpoint paths live (a local path, or a URI's filesystem)
        self.client = tracker.client
        self.trial_configs = trial_configs  # trial -> resolved config dict
        self.warm_start_of = warm_start_of or (lambda trial: None)  # trial -> shared warm-start key
        self.metric, self.mode = metric, mode
        self.run_ids: dict[str, str] = {}
        # trial -> MLflow key -> the steps its run holds: a resumed trial re-reports steps its run
        # may already have, and a killed driver may have lost reports its run never got.
        self.logged: dict[str, dict[str, set[int]]] = {}
        self.curves: dict[str, list[dict]] = {}
        self.last: dict[str, dict] = {}
        self.nodes: dict[str, set[str]] = {}  # trial -> Ray nodes its workers ran on
        self.resumes: dict[str, list[int]] = {}  # trial -> steps it resumed from a checkpoint at
        self.ranks: dict[str, dict[int, dict[str, int]]] = {}  # trial -> restart step -> layer -> rank
        self.dropped: list[str] = []  # the calls that could never succeed, and why
        self.retry_delays_s = (1, 2, 5, 10, 30)  # waits between tries while MLflow is away
        self._seen: set[str] = set()  # trials whose config went with an event (Tune's loop only)
        self._events: queue.Queue = queue.Queue()
        self._recorder: threading.Thread | None = None
        self.live_key = live_key
        if live_key:
            _LIVE_CALLBACKS[live_key] = self

    def __reduce__(self):
        """Tune pickles its callbacks into tuner.pkl: keep only the key, never the tracking URI
        (credentials and all) or a queue; unpickling resolves to the live callback."""
        if not self.live_key:
            raise TypeError("an MlflowTuneCallback without live_key cannot be stored in a Tuner")
        return live_callback, (self.live_key,)

    # --- the recorder thread -----------------------------------------------------------

    def _queue(self, handler, *args) -> None:
        if self._recorder is None or not self._recorder.is_alive():
            self._recorder = threading.Thread(target=self._record, name="mlflow-recorder", daemon=True)
            self._recorder.start()
        self._events.put((handler, args))

    def _record(self) -> None:
        while True:
            handler, args = self._events.get()
            try:
                handler(*args)
            except Exception:  # a bug here must not end the thread: later events still go out
                log.exception("recording %s in MLflow failed", handler.__name__)
            finally:
                self._events.task_done()

    def flush(self, warn_every_s: float = 60.0) -> None:
        """Wait until every queued event is in MLflow (or dropped), saying so while MLflow is away."""
        with self._events.all_tasks_done:
            while self._events.unfinished_tasks:
                if not self._events.all_tasks_done.wait(timeout=warn_every_s) and self._events.unfinished_tasks:
                    log.warning(
                        "waiting for MLflow at %s: %d trial events not written yet",
                        redact(self.tracker.tracking_uri),
                        self._events.unfinished_tasks,
                    )

    def _call(self, method, *args, **kwargs):
        """``MlflowClient.<method>`` (or ``method`` itself), retried while MLflow is away; None if dropped."""
        call = method if callable(method) else getattr(self.client, method)
        name = getattr(method, "__name__", method)
        for attempt in itertools.count():  # until it goes through or fails for good
            try:
                return call(*args, **kwargs)
            except Exception as error:
                if not is_transient(error):
                    log.error("MLflow call %s failed for good (%s); it is dropped", name, error)
                    self.dropped.append(f"{name}: {error}")
                    return None
                delay = self.retry_delays_s[min(attempt, len(self.retry_delays_s) - 1)]
                if attempt in (0, 10) or attempt % 100 == 0:
                    log.warning("MLflow call %s failed (%s); retrying every %s s, nothing is lost", name, error, delay)
                time.sleep(delay)

    def _run_id(self, trial: TrialSnapshot) -> str | None:
        if trial.trial_id not in self.run_ids:
            run_id = self._call(self.tracker.child_run, trial.trial_id, str(trial))
            if run_id is None:
                return None
            self.run_ids[trial.trial_id] = run_id
            run = self._call("get_run", run_id)  # a resumed sweep keeps what the run knew
            metrics = run.data.metrics if run else {}
            self.logged[trial.trial_id] = {
                key: {m.step for m in self._call("get_metric_history", run_id, key) or []} for key in metrics
            }
            tags = run.data.tags if run else {}
            self.nodes[trial.trial_id] = set(filter(None, tags.get("ray_nodes", "").split(",")))
            self.resumes[trial.trial_id] = [int(x) for x in filter(None, tags.get("resumed_at_steps", "").split(","))]
            if trial.config is not None:
                # The variant's name beside the config keys it set: the summary's column, and
                # one to filter and group runs by in the UI.
                variant = [mlflow.entities.Param(VARIANT, trial.variant)] if trial.variant else []
                params = params_of(trial.config) + variant
                for i in range(0, len(params), 100):
                    self._call("log_batch", run_id, params=params[i : i + 100])
                self._call("log_text", run_id, config_yaml(trial.config), "config.yaml")
            self._call("set_tag", run_id, "status", "running")
            if trial.warm_start:
                self._call("set_tag", run_id, "warm_start_key", trial.warm_start)
        return self.run_ids[trial.trial_id]

    # --- Tune hooks (on Tune's loop: snapshot and queue, nothing else) -------------------

    def _snapshot(self, trial) -> TrialSnapshot:
        first = trial.trial_id not in self._seen
        self._seen.add(trial.trial_id)
        return TrialSnapshot(
            trial_id=trial.trial_id,
            name=str(trial),
            error_msg=str(getattr(trial, "error_msg", "") or ""),
            config=self.trial_configs(trial) if first else None,
            warm_start=self.warm_start_of(trial) if first else None,
            variant=(getattr(trial, "config", None) or {}).get(VARIANT) if first else None,
        )

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._queue(self._run_id, self._snapshot(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._queue(self._record_result, self._snapshot(trial), dict(result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._queue(self._record_complete, self._snapshot(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._queue(self._record_error, self._snapshot(trial))

    # --- what each event writes (on the recorder thread) --------------------------------

    def _record_result(self, trial: TrialSnapshot, result: dict) -> None:
        run_id = self._run_id(trial)
        step = int(result.get("step", 0))
        self.curves.setdefault(trial.trial_id, []).append({"step": step, **curve_row(result)})
        self.last[trial.trial_id] = result
        if run_id:
            self._log_curves(trial, run_id, [result])
        if result.get("event") == "restart" and run_id:
            self._call("set_tag", run_id, "merges", str(result.get("restarts")))
            self.ranks.setdefault(trial.trial_id, {}).update(layer_ranks([result]))
            self._log_ranks(run_id, self.ranks[trial.trial_id])
        if result.get("nodes") and run_id:
            self.nodes.setdefault(trial.trial_id, set()).update(result["nodes"].split(","))
            self._call("set_tag", run_id, "ray_nodes", ",".join(sorted(self.nodes[trial.trial_id])))
        if result.get("event") == "resume" and run_id:
            # The trial's workers came back from a checkpoint: a lost worker or node (Ray
            # Train's FailureConfig), a retried trial, or a resumed sweep.
            steps = self.resumes.setdefault(trial.trial_id, [])
            steps.append(int(result["from_step"]))
            if result.get("resumed_from"):  # what was reported before the checkpoint, all of it
                history = self._history(result["resumed_from"])
                self._log_curves(trial, run_id, history)
                self.ranks.setdefault(trial.trial_id, {}).update(layer_ranks(history))
            self._call("set_tag", run_id, "resumes", str(len(steps)))
            self._call("set_tag", run_id, "resumed_at_steps", ",".join(map(str, steps)))

    def _record_complete(self, trial: TrialSnapshot) -> None:
        last = self.last.get(trial.trial_id, {})
        if last.get("event") == "done":
            self._finish(trial, "completed", "reached train.total_steps", checkpoint=last.get("checkpoint_path"))
        elif last.get("stop_reason"):
            self._finish(trial, "errored", last["stop_reason"])
        else:
            reason = f"stopped by ASHA at step {last.get('step')} ({self.metric} {self.best_value(trial.trial_id):.3f})"
            self._finish(trial, "early-stopped", reason)

    def _record_error(self, trial: TrialSnapshot) -> None:
        self._finish(trial, "errored", (trial.error_msg or "the trial raised an error")[:5000])

    def _finish(self, trial: TrialSnapshot, status: str, reason: str, checkpoint: str | None = None) -> None:
        run_id = self._run_id(trial)
        if run_id is None:
            return
        if checkpoint:
            try:
                self._log_checkpoint(trial, run_id, checkpoint)
            except Exception as error:  # the storage, not MLflow: the run's status still goes out
                log.error("could not log the merged checkpoint %s (%s)", redact(checkpoint), error)
                self.dropped.append(f"merged checkpoint {redact(checkpoint)}: {error}")
        self._call("set_tag", run_id, "status", status)
        self._call("set_tag", run_id, "stop_reason", redact(reason))
        best = self.best_value(trial.trial_id)
        if math.isfinite(best):
            self._call("log_metric", run_id, f"best_{self.metric}", best)
        self._call("set_terminated", run_id, "FAILED" if status == "errored" else "FINISHED")

    def _log_checkpoint(self, trial: TrialSnapshot, run_id: str, checkpoint: str) -> None:
        """The final checkpoint's reports, ranks and merged model, read where Ray Train keeps it:
        nothing is downloaded to the driver and no model is loaded here."""
        history = self._history(checkpoint)
        self._log_curves(trial, run_id, history)
        self._log_ranks(run_id, layer_ranks(history))
        if history:
            self._call("log_text", run_id, "".join(json.dumps(row) + "\n" for row in history), HISTORY_ARTIFACT)
        self._log_model(run_id, f"{checkpoint}/merged")

    def _log_model(self, run_id: str, merged: str) -> None:
        """The MLflow `transformers` model that rank 0 saved in `merged/`.

        On object storage it is linked by reference: its URI goes in the run's `model_uri` tag,
        and the sweep registers that URI (MLflow reads it from the bucket; no copy). On a local
        or shared disk, which MLflow cannot reference, its files are uploaded once, streamed, as
        a logged model of the run (its id in `logged_model_id`)."""
        if self._remote():
            uri = f"{self.storage.split('://', 1)[0]}://{merged}"
            self._call("set_tag", run_id, MODEL_URI_TAG, uri)
            return
        if not Path(merged).is_dir():
            log.error("the merged model %s is gone; it is not logged", redact(merged))
            self.dropped.append(f"_log_model: {redact(merged)} is gone")
            return
        if not (Path(merged) / "MLmodel").is_file():  # a checkpoint from before models were saved there
            self._call("log_artifacts", run_id, merged, "merged")
            return
        experiment_id = self.tracker.experiment_id
        model = self._call(
            "create_logged_model", experiment_id, name="model", source_run_id=run_id, model_type="transformers"
        )
        if model is None:
            return
        if self._call(self._upload_model, model.model_id, merged):
            self._call("finalize_logged_model", model.model_id, mlflow.entities.LoggedModelStatus.READY)
            self._call("set_tag", run_id, "logged_model_id", model.model_id)

    def _upload_model(self, model_id: str, folder: str) -> bool:
        self.client.log_model_artifacts(model_id, folder)
        return True

    def _remote(self) -> bool:
        """Whether checkpoints live on object storage (a URI), not on a disk this process sees."""
        return "://" in self.storage and not self.storage.startswith("file://")

    def _log_ranks(self, run_id: str, ranks: dict[int, dict[str, int]]) -> None:
        """`update_ranks/update_ranks.csv` and `.png`: layer x restart, rewritten at each restart."""
        if not ranks:
            return
        import tempfile

        from orchestrator.report import write_rank_artifacts

        with tempfile.TemporaryDirectory(prefix="relora-ranks-") as folder:
            write_rank_artifacts(ranks, Path(folder))
            self._call("log_artifacts", run_id, folder, "update_ranks")

    def _log_curves(self, trial, run_id: str, reports: list[dict]) -> None:
        """Log each (metric, step) of ``reports`` that the trial's run does not hold yet."""
        logged = self.logged.setdefault(trial.trial_id, {})
        now = int(time.time() * 1000)
        metrics = []
        for report in reports:
            step = int(report.get("step", 0))
            for key, value in curve_row(report).items():
                if step not in logged.setdefault(key, set()):
                    logged[key].add(step)
                    metrics.append(mlflow.entities.Metric(key, value, now, step))
        for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            self._call("log_batch", run_id, metrics=metrics[i : i + 1000])

    def _history(self, checkpoint: str) -> list[dict]:
        """The reports kept in a checkpoint (on local disk or object storage); none if unreadable."""
        import pyarrow.fs

        from orchestrator.worker import HISTORY, read_history_file

        try:
            if self._remote():
                fs, _ = pyarrow.fs.FileSystem.from_uri(self.storage)
                with fs.open_input_stream(f"{checkpoint}/{HISTORY}") as stream:
                    return [json.loads(line) for line in stream.read().decode().splitlines()]
            return read_history_file(checkpoint)
        except (OSError, ValueError) as error:
            log.warning("could not read the history of %s (%s); its curves may have gaps", checkpoint, error)
            return []

    def best_value(self, trial_id: str) -> float:
        values = [row[self.metric] for row in self.curves.get(trial_id, []) if self.metric in row]
        if not values:
            return math.nan
        return min(values) if self.mode == "min" else max(values)
