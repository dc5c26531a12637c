"""A sweep: `python -m orchestrator.sweep search_spaces/rank.yaml`.

The spec is checked whole before Ray starts. The data is prepared once. Ray Tune then
runs one trial per sample of the search space; each trial is a Ray Train job of DeepSpeed
workers (`orchestrator.train.make_trainer`), and ASHA stops the poor ones at eval points.
MLflow gets one parent run per sweep and one child per trial. At the end: a summary
table, plots on the parent run, and the best merged model in the Model Registry.

Running the same command again, or with `--resume`, continues an interrupted sweep:
finished trials are kept, unfinished ones resume from their checkpoints, and every trial
keeps its MLflow run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from orchestrator.config import (
    ConfigError,
    TrialConfig,
    check_storage,
    check_token_budget,
    check_tracking_uri,
    config_to_dict,
    default_tracking_uri,
    flatten,
    load_yaml,
    redact,
    registry_name,
    shown,
    with_overrides,
    with_storage,
)
from orchestrator.console import say
from orchestrator.data import PreparedData, cached_data, prepare_data
from orchestrator.search import SETTLED_STEP, SweepSpec, load_sweep, resolve_trial, tune_param_space
from orchestrator.train import check_cluster_resources, local_cpu_limit, storage_uri

log = logging.getLogger("orchestrator.sweep")


def tune_trial(
    params: dict, *, base: TrialConfig, variants: dict, data: PreparedData, storage: str, warm_starts: dict
) -> None:
    """One Tune trial: fit a TorchTrainer whose reports reach Tune (and from there MLflow).

    ``base`` is the sweep's trial config as the driver resolved it; the sample's values are
    applied to it, and the result goes to the workers unchanged."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.train import make_trainer
    from orchestrator.warmstart import warm_start_key

    context = ray.tune.get_context()
    cfg = resolve_trial(base, params, variants)
    # A stable run name per trial: a resumed sweep finds the trial's Ray Train run and its checkpoints.
    name = f"{context.get_experiment_name()}-trials/{context.get_trial_id()}"
    warm_start = warm_starts.get(warm_start_key(cfg, data))
    trainer = make_trainer(
        cfg, data, name=name, storage_path=storage, callbacks=[TuneReportCallback()], warm_start=warm_start
    )
    trainer.fit()


def storage_root(spec: SweepSpec) -> str:

    return storage_uri(spec.base_config.run.storage_path)


def describe(spec: SweepSpec) -> str:
    s = spec.search
    lines = [
        f"sweep {spec.base_config.run.name}: {spec.num_trials} trials "
        f"({spec.grid_size} grid points x {s.num_samples} samples), at most {s.max_concurrent_trials} at once"
    ]
    for path, dist in s.params.items():
        ((kind, values),) = dist.items()
        lines.append(f"  {path}: {kind} {values}")
    for variant, overrides in s.variants.items():
        lines.append(f"  variant {variant}: {overrides or 'the base config'}")
    scaling = spec.base_config.scaling  # what the trials will ask Ray for
    gpus = scaling.gpus_per_worker if scaling.use_gpu is True else 0
    workers = f"{scaling.num_workers} worker{'s' if scaling.num_workers != 1 else ''}"
    lines.append(
        f"  per trial: {workers} x ({scaling.cpus_per_worker} CPU, {gpus:g} GPU), "
        + " or ".join(
            f"DeepSpeed ZeRO-{spec.base_config.deepspeed.zero_stage}" if engine == "deepspeed" else "PyTorch DDP"
            for engine in spec.engines
        )
    )
    sched = s.scheduler
    lines.append(
        f"  scheduler: {sched.type}"
        + (
            f" on {s.metric} ({s.mode}), grace {sched.grace_period} steps, reduction {sched.reduction_factor};"
            f" rungs at steps {asha_rungs(spec)}, each judged on a trial's first evaluation at or past it"
            f" outside the {spec.base_config.relora.restart_warmup_steps} steps after a restart"
            if sched.type == "asha"
            else ""
        )
    )
    lines.append(f"  {describe_warm_starts(spec)}")
    data = spec.base_config.data
    repeats = f", at most {data.epochs:g} passes over the data" if data.epochs != 1 else ", each token once"
    lines.append(f"  token budget: {spec.token_budget:,} training tokens per trial at most{repeats}")
    lines.append(f"  storage: {redact(storage_root(spec))}/{spec.base_config.run.name}")

    return "\n".join(lines)


def describe_warm_starts(spec: SweepSpec) -> str:
    from orchestrator.warmstart import count_warm_starts

    shared, own = count_warm_starts(spec)
    steps = spec.base_config.relora.warm_start_steps
    if own:
        return f"warm starts: {own} ({steps} full-rank steps each; a sampled setting shapes them: one per trial)"
    if not shared:
        return "warm starts: none"
    return f"warm starts: {shared} ({steps} full-rank steps each, shared by the trials, trained side by side)"


def local_cpus_needed(spec: SweepSpec) -> int:
    """Logical CPUs a local Ray declares: a Tune actor and the workers of each concurrent trial."""
    r = spec.search.resources
    return spec.search.max_concurrent_trials * (1 + r.num_workers * r.cpus_per_worker) + 1


def check_local_resources(spec: SweepSpec) -> None:
    """Without a cluster, refuse a sweep that would oversubscribe this machine absurdly."""
    needed, limit = local_cpus_needed(spec), local_cpu_limit()
    if needed > limit:
        r = spec.search.resources
        key = (
            "search.resources.num_workers"
            if 1 + r.num_workers * r.cpus_per_worker > limit
            else "search.max_concurrent_trials"
        )
        raise ConfigError(
            key,
            f"the sweep needs {needed} logical CPUs at once, more than this machine's limit of {limit} "
            f"({os.cpu_count()} cores): lower it, or run on a cluster (--address / RAY_ADDRESS)",
        )


def init_ray(address: str | None, spec: SweepSpec) -> None:
    """Join a cluster (whose resources must fit a trial), or start a local Ray with enough
    logical CPUs for the concurrent trials.

    Each trial holds one CPU for its Tune actor and its Train workers hold their own
    placement group; logical CPUs are scheduling slots, not cores, so on a small machine we
    declare what the trials need rather than let the second trial wait for ever.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        check_cluster_resources(spec.base_config.scaling, ray.cluster_resources(), where="search.resources")
        return
    ray.init(num_cpus=max(os.cpu_count() or 1, local_cpus_needed(spec)))


# A custom resource that only the cluster's head node offers (cluster.yaml, cluster.local.yaml).
# Each trial's Tune actor asks for one unit of it, so the actors (each the driver of one trial's
# Ray Train job) live on the head: never on a GPU node, which they would keep from scaling down
# and whose loss would take the trial's driver with it.
TRIAL_DRIVER_RESOURCE = "relora_trial_driver"


def trial_actor_resources(cluster_resources: dict[str, float]) -> dict[str, float]:
    """What each trial's Tune actor asks for: a CPU, and a head-only slot where the cluster has one."""
    pin = {TRIAL_DRIVER_RESOURCE: 1} if cluster_resources.get(TRIAL_DRIVER_RESOURCE, 0) > 0 else {}
    return {"cpu": 1, **pin}


SPEC_RECORD = "relora-sweep.json"  # the spec a sweep started with, beside Tune's own state


def spec_record(spec: SweepSpec) -> dict:
    """What a resumed sweep must share with the one it resumes, flattened to dotted keys."""
    record = flatten({**config_to_dict(spec.base_config), "search": dataclasses.asdict(spec.search)})
    record.pop("run.storage_path")  # where the sweep lives, not what it is
    return json.loads(json.dumps(record, default=str))


def _record_path(spec: SweepSpec) -> tuple:
    from orchestrator.data import storage_filesystem

    fs, root = storage_filesystem(storage_root(spec))
    return fs, f"{root}/{spec.base_config.run.name}/{SPEC_RECORD}"


def check_unchanged(spec: SweepSpec) -> None:
    """Refuse to resume a sweep under the same run.name whose spec has changed since it started."""
    fs, path = _record_path(spec)
    try:
        with fs.open_input_stream(path) as f:
            stored = json.loads(f.read())
    except (FileNotFoundError, OSError):
        return  # a new sweep (or one from before the record): nothing to compare
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise ConfigError(
            "run.name", f"the stored record of this sweep ({path}) is not a spec record: --fresh starts over"
        )
    current = spec_record(spec)
    changed = sorted(key for key in stored.keys() | current.keys() if stored.get(key) != current.get(key))
    if changed:
        key = changed[0]
        raise ConfigError(
            key,
            f"differs from the sweep {spec.base_config.run.name!r} already stored (was {shown(stored.get(key))}, "
            f"now {shown(current.get(key))}; {len(changed)} keys differ): run it with --fresh to start over, "
            "or give it another run.name",
        )


def write_record(spec: SweepSpec) -> None:
    fs, path = _record_path(spec)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(spec_record(spec), indent=1, sort_keys=True).encode())


def make_trainable(spec: SweepSpec, data: PreparedData, warm_starts: dict):
    """`tune_trial` with the sweep's fixed arguments, asking for a trial driver's resources."""
    import ray
    from ray import tune

    trainable = tune.with_parameters(
        tune_trial,
        base=spec.base_config,
        variants=spec.search.variants,
        data=data,
        storage=storage_root(spec),
        warm_starts=warm_starts,
    )
    return tune.with_resources(trainable, trial_actor_resources(ray.cluster_resources()))


def make_callback(spec: SweepSpec, data: PreparedData, tracker, warm_starts: dict):
    """The MLflow callback: one child run per trial, with the trial's resolved config as params."""
    from orchestrator.tracking import MlflowTuneCallback
    from orchestrator.warmstart import warm_start_key

    def resolved_config(trial) -> dict:
        return config_to_dict(spec.trial(trial.config))

    def shared_warm_start(trial) -> str | None:
        key = warm_start_key(spec.trial(trial.config), data)
        return key if key in warm_starts else None

    s = spec.search
    return MlflowTuneCallback(
        tracker,
        resolved_config,
        metric=s.metric,
        mode=s.mode,
        warm_start_of=shared_warm_start,
        storage=storage_root(spec),
        live_key="sweep",  # what the callback stored in tuner.pkl resolves to when the sweep resumes
    )


def asha_rungs(spec: SweepSpec) -> list[int]:
    """The steps at which ASHA compares trials (as `make_scheduler`'s ASHA computes them)."""
    sched, max_t = spec.search.scheduler, spec.base_config.train.total_steps - 1
    count = int(math.log(max_t / sched.grace_period) / math.log(sched.reduction_factor) + 1)
    return [sched.grace_period * sched.reduction_factor**k for k in range(count)]


def make_scheduler(spec: SweepSpec):
    """ASHA on the sweep's metric at eval steps, or None.

    ASHA counts time in `SETTLED_STEP`, which only evaluations outside a re-warm carry: a
    trial whose rung falls inside the spike after one of its restarts is judged at its next
    settled evaluation instead. Aligning rungs to restarts cannot work when the trials restart
    at different periods, and hiding the metric would hide the curve from MLflow too."""
    from ray.tune.schedulers import ASHAScheduler

    s = spec.search
    if s.scheduler.type != "asha":
        return None
    return ASHAScheduler(
        metric=s.metric,
        mode=s.mode,
        time_attr=SETTLED_STEP,
        grace_period=s.scheduler.grace_period,
        reduction_factor=s.scheduler.reduction_factor,
        # Rungs lie strictly before the last step, and reaching max_t stops nothing: a
        # trial that got to the end always writes its merged checkpoint.
        max_t=spec.base_config.train.total_steps - 1,
        stop_last_trials=False,
    )


def make_search_alg(spec: SweepSpec):
    if spec.search.search_alg != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=spec.search.metric, mode=spec.search.mode)


def make_tuner(spec: SweepSpec, trainable, callback, resume: bool):
    """A new Tuner for the sweep, or the stored one when the sweep ran before (and ``resume``)."""
    from ray import tune

    from orchestrator.console import console_callback

    s = spec.search
    path = f"{storage_root(spec)}/{spec.base_config.run.name}"
    if resume and tune.Tuner.can_restore(path):
        say(f"resuming the sweep at {redact(path)}")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(spec),
        tune_config=tune.TuneConfig(
            scheduler=make_scheduler(spec),
            search_alg=make_search_alg(spec),
            num_samples=s.num_samples,
            max_concurrent_trials=s.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=spec.base_config.run.name,
            storage_path=storage_root(spec),
            callbacks=[callback, console_callback(s.metric, s.mode, total=spec.num_trials)],  # our lines
            verbose=1,
            # A trial whose Tune actor is lost with its node is run again; it resumes from
            # its Ray Train checkpoints (lost workers alone are Ray Train's FailureConfig).
            failure_config=tune.FailureConfig(max_failures=spec.base_config.run.max_failures),
        ),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="sweep YAML: a trial config plus a `search` block")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep (the default)")
    parser.add_argument("--fresh", action="store_true", help="never resume, even when the sweep exists")
    parser.add_argument("--storage", help="where trials write (default: $RELORA_STORAGE, else run.storage_path)")
    parser.add_argument("--dry-run", action="store_true", help="print the trials and resources, then exit")
    parser.add_argument(
        "--verbose", action="store_true", help="print everything (Ray, Tune, workers) here, not only to the log file"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, e.g. search.num_samples=4"
    )
    return parser.parse_args(argv)


def prepare(spec: SweepSpec) -> PreparedData:
    """The sweep's data, prepared on Ray Data into the sweep's storage, where every node reads
    it, and large enough for every trial (a hub source is read up to the token budget)."""
    cfg = spec.base_config.data
    data = prepare_data(cfg, storage_root(spec), token_target=spec.token_budget)
    check_token_budget(spec.token_budget, data.train_blocks, cfg)
    say(
        f"data: {data.train_blocks} train / {data.validation_blocks} validation blocks "
        f"({'cache hit' if data.cache_hit else 'prepared'})"
    )
    return data


def run_sweep(spec: SweepSpec, data: PreparedData, spec_file: str, args: argparse.Namespace, tracker) -> None:
    """Warm starts, then the trials; the MLflow callback has every result when it returns."""
    from orchestrator.warmstart import ensure_warm_starts

    tracker.client.log_artifact(tracker.parent_id, spec_file)
    warm_starts = ensure_warm_starts(spec, data, storage_root(spec), tracker)
    # Only eval steps carry val_ppl; Tune would otherwise reject every train-loss report.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    write_record(spec)
    callback = make_callback(spec, data, tracker, warm_starts)
    make_tuner(spec, make_trainable(spec, data, warm_starts), callback, resume=not args.fresh).fit()
    callback.flush()


def summarize(spec: SweepSpec, tracker) -> None:
    """The summary table, the plots on the parent run, and the best model in the registry."""
    from orchestrator.report import log_plots, log_summary, register_best, summary_table, trial_rows

    s, name = spec.search, spec.base_config.run.name
    swept = list(s.params) + (["variant"] if s.variants else [])
    rows = trial_rows(tracker.client, tracker.experiment_id, name, swept, s.metric, s.mode)
    say("")
    for line in summary_table(rows, swept, s.metric).splitlines():
        say(line)
    log_plots(tracker.client, tracker.parent_id, rows, swept, s.metric)
    log_summary(tracker.client, tracker.parent_id, rows, swept, s.metric, s.mode)
    registry = s.register_model or registry_name(name)
    registered = register_best(tracker.client, rows, registry, s.mode)
    if registered:
        best, version = registered
        best_value = f"{s.metric} {best['best']:.3f}"
        say(f"best trial {best['trial']} ({best_value}) registered as {registry} version {version}")


def print_results_link(tracking_uri: str, experiment_id: str, spec: SweepSpec) -> None:
    """Where to see the sweep: the MLflow UI's training runs, every trial's curve on one chart."""
    from orchestrator.tracking import results_url

    def page(base: str) -> str:
        return results_url(experiment_id, spec.search.metric, spec.search.mode, base=base)

    if tracking_uri.startswith(("http://", "https://")):
        say(f"\nopen the results: {page(redact(tracking_uri))}")
    else:
        say(f"\nopen the results: mlflow ui --backend-store-uri {redact(tracking_uri)}")
        say(f"  then {page('http://127.0.0.1:5000')}")


def check_before_work(spec: SweepSpec, args: argparse.Namespace, tracking_uri: str) -> None:
    """What the spec alone cannot tell: this machine, the storage, MLflow, an earlier sweep of the
    same name, and (when the data is cached already) whether it holds the token budget."""
    if not (args.address or os.environ.get("RAY_ADDRESS") or args.dry_run):  # a dry run starts nothing
        check_local_resources(spec)
    check_storage(storage_root(spec))
    check_tracking_uri(tracking_uri, "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI")
    if not args.fresh:
        check_unchanged(spec)
    cfg, budget = spec.base_config.data, spec.token_budget
    cached = cached_data(cfg, storage_root(spec), budget) or cached_data(cfg, None, budget)  # storage, or here
    if cached is not None:
        check_token_budget(budget, cached.train_blocks, cfg)


def log_file(spec: SweepSpec) -> Path:
    """Where everything but the product's own lines goes: beside the sweep's trials when the
    storage is a local or shared disk, else in the temp dir (the parent run gets a copy)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root, name = storage_root(spec), spec.base_config.run.name
    folder = Path(root) / f"{name}-logs" if "://" not in root else Path(tempfile.gettempdir()) / "relora-logs" / name
    return folder / f"sweep-{stamp}.log"


def main(argv: list[str] | None = None, *, release_terminal: bool = True) -> int:
    """The sweep. ``release_terminal=False`` (the command line) leaves the log in place of the
    process's output until it exits: Ray's threads and its shutdown at exit still print."""
    args = parse_args(argv)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        spec = load_sweep(with_storage(with_overrides(load_yaml(args.spec), args.set), args.storage))
        check_before_work(spec, args, tracking_uri)
        print(describe(spec), flush=True)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    from orchestrator.console import WarningsToTerminal, configure, terminal

    configure(verbose=args.verbose)  # before Ray starts: its workers inherit it
    if not args.verbose:
        terminal.capture(log_file(spec))
    warnings_handler = WarningsToTerminal()
    logging.getLogger("orchestrator").addHandler(warnings_handler)
    try:
        return run(spec, args, tracking_uri)
    except ConfigError as error:  # found once Ray and the data were up
        say(f"config error: {error}", error=True)
        return 2
    except Exception as error:  # the cause on the terminal, the traceback in the log
        traceback.print_exc()
        cause = (str(error).strip().splitlines() or [""])[0][:300]
        say(f"error: {type(error).__name__}: {cause}", error=True)
        return 1
    finally:
        logging.getLogger("orchestrator").removeHandler(warnings_handler)
        if terminal.log_path:
            say(f"full log: {terminal.log_path}")
        if release_terminal:
            terminal.release()


def run(spec: SweepSpec, args: argparse.Namespace, tracking_uri: str) -> int:
    """Ray, the data, the warm starts and the trials, then the summary and the link."""
    init_ray(args.address, spec)  # a cluster that cannot place a trial is refused here
    data = prepare(spec)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from orchestrator.tracking import SweepTracker

    name = spec.base_config.run.name
    tracker = SweepTracker(tracking_uri, experiment=name, sweep_name=name, fresh=args.fresh)
    run_sweep(spec, data, args.spec, args, tracker)
    summarize(spec, tracker)
    tracker.client.set_terminated(tracker.parent_id)
    print_results_link(tracking_uri, tracker.experiment_id, spec)
    from orchestrator.console import terminal

    if terminal.log_path:
        try:
            tracker.client.log_artifact(tracker.parent_id, terminal.log_path)
        except Exception as error:  # the log stays on disk; the sweep's record is whole
            log.warning("could not log %s to MLflow (%s)", terminal.log_path, error)
    return 0


if __name__ == "__main__":
    sys.exit(main(release_terminal=False))
