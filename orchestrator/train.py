"""One trial without a sweep: `python -m orchestrator.train CONFIG.yaml`.

Checks the config, prepares (or reuses) the tokenized data, then runs a Ray Train
`TorchTrainer` whose workers run `orchestrator.worker`. Running the same config again
resumes the run from its last checkpoint (Ray Train restores a run by its storage path
and name); `--fresh` starts over under a new name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from orchestrator.config import (
    ConfigError,
    TrialConfig,
    check_storage,
    check_token_budget,
    check_tracking_uri,
    config_to_dict,
    default_tracking_uri,
    load_config,
    local_path,
    redact,
)
from orchestrator.config import ScalingConfig as ScalingSpec
from orchestrator.data import PreparedData, prepare_data

log = logging.getLogger("orchestrator.train")


REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_INTERVAL_S = "0.25"


# Where `ray up` leaves the autoscaler's config on the head (both cluster files start Ray with it).
AUTOSCALING_CONFIG = "~/ray_bootstrap_config.yaml"


def cluster_capacity(current: dict[str, float], config_path: str | None = None) -> dict[str, float]:
    """What the cluster has now plus what its autoscaler may add (each worker type at its
    max_workers): an autoscaling cluster starts with no GPU nodes at all."""
    try:
        config = yaml.safe_load(Path(config_path or AUTOSCALING_CONFIG).expanduser().read_text())
    except (OSError, yaml.YAMLError):
        return current
    capacity = dict(current)
    node_types = config.get("available_node_types") if isinstance(config, dict) else None
    head = config.get("head_node_type") if isinstance(config, dict) else None
    for name, node_type in (node_types or {}).items():
        if name == head or not isinstance(node_type, dict):
            continue
        for resource, amount in (node_type.get("resources") or {}).items():
            capacity[resource] = capacity.get(resource, 0) + amount * node_type.get("max_workers", 0)
    return capacity


def check_cluster_resources(scaling: ScalingSpec, cluster: dict[str, float], *, where: str = "scaling") -> None:
    """On a cluster, refuse a trial that could never be placed: Ray would wait for it forever."""
    cluster = cluster_capacity(cluster)
    wanted = {"CPU": scaling.num_workers * scaling.cpus_per_worker + 1}
    if scaling.use_gpu is True:
        wanted["GPU"] = scaling.num_workers * scaling.gpus_per_worker
    for name, amount in scaling.resources_per_worker.items():
        wanted[name] = scaling.num_workers * amount
    for name, amount in wanted.items():
        if amount > cluster.get(name, 0):
            raise ConfigError(
                where,
                f"one trial needs {amount:g} {name}, and the whole cluster has or can add "
                f"{cluster.get(name, 0):g} (its nodes, plus each autoscaled worker type at its max_workers)",
            )


def init_ray(address: str | None, cfg: TrialConfig) -> None:
    """Join a cluster, or start a local Ray sized for this trial.

    A local Ray declares at least one logical CPU more than the workers take. Logical
    CPUs are scheduling slots, not cores: the Train controller needs one of its own, and
    on a 2-core machine declaring only the physical cores leaves a new worker group
    waiting forever for the slots of the one before it.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        check_cluster_resources(cfg.scaling, ray.cluster_resources())
        return
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1
    ray.init(num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False)


def local_cpu_limit() -> int:
    """Logical CPUs are scheduling slots, not cores; past this many a laptop only thrashes."""
    return max(64, 16 * (os.cpu_count() or 1))


def check_local_resources(cfg: TrialConfig) -> None:
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1
    if needed > local_cpu_limit():
        raise ConfigError(
            "scaling.num_workers",
            f"the trial needs {needed} logical CPUs, more than this machine's limit of {local_cpu_limit()} "
            f"({os.cpu_count()} cores): lower it, or run on a cluster (--address / RAY_ADDRESS)",
        )


def storage_uri(storage: str) -> str:
    """A URI as it is; a local path made absolute (Ray Train and the workers need one)."""
    if "\x00" in storage:
        raise ConfigError("run.storage_path", "holds a NUL byte")
    return storage if "://" in storage else str(local_path(storage, "run.storage_path").resolve())


def scaling_config(cfg: TrialConfig, use_gpu: bool):
    """Ray Train's workers for a trial: one DeepSpeed rank each, with its CPUs, GPU share and extras."""
    from ray.train import ScalingConfig

    gpus = {"GPU": cfg.scaling.gpus_per_worker} if use_gpu else {}
    resources = {"CPU": cfg.scaling.cpus_per_worker, **gpus, **cfg.scaling.resources_per_worker}
    return ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def make_trainer(
    cfg: TrialConfig,
    data: PreparedData,
    *,
    name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    warm_start: str | None = None,
    stop_at: int | None = None,
):
    """The `TorchTrainer` for one trial: N DeepSpeed workers, checkpoints, retries.

    ``warm_start`` (a checkpoint holding `warm_start/`) starts the run at the switch to
    low rank; ``stop_at`` ends it early, to make such a warm start."""
    import ray
    from ray.train.torch import TorchTrainer

    from orchestrator.worker import train_loop_per_worker

    # Ray Train's controller takes a worker's report only when it polls, every 2 s by default, and a
    # worker's next report waits until the last one is taken: a trial that reports more often than
    # that stalls on each report (a 70-step test trial: 34 s of steps became 9 s). Poll faster unless
    # the user chose a value; Ray hands the variable on to the controller and the workers.
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_INTERVAL_S)
    use_gpu = cfg.scaling.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    env = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trial": cfg,  # resolved and checked on the driver; workers take it as it is
            "data": dataclasses.asdict(data),
            "warm_start": warm_start,
            "stop_at": stop_at,
        },
        scaling_config=scaling_config(cfg, use_gpu),
        run_config=run_config(cfg, name, storage_path, env, callbacks),
    )


def run_config(cfg: TrialConfig, name: str | None, storage_path: str | None, env: dict, callbacks: list | None):
    """Where the run writes, how many checkpoints it keeps and how often Ray Train retries it."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name or cfg.run.name,
        storage_path=storage_uri(storage_path or cfg.run.storage_path),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        worker_runtime_env={"env_vars": env},
        callbacks=callbacks or [],
    )


def read_history(checkpoint_path: str) -> list[dict]:
    """Every report of a run, from the `history.jsonl` its workers keep in each checkpoint."""
    from ray.train import Checkpoint

    with Checkpoint(checkpoint_path).as_directory() as local:
        return [json.loads(line) for line in (Path(local) / "history.jsonl").read_text().splitlines()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="trial config YAML (see README.md for every key)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming a run of the same name")
    parser.add_argument("--storage", help="where the run writes (default: $RELORA_STORAGE, else run.storage_path)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. relora.rank=64"
    )
    parser.add_argument("--verbose", action="store_true", help="also print Ray Train's log line for every report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.storage, args.set)
        check_storage(storage_uri(cfg.run.storage_path))
        tracking_uri = absolute_tracking_uri(args.tracking_uri or default_tracking_uri())
        check_tracking_uri(tracking_uri, "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI")
        if not (args.address or os.environ.get("RAY_ADDRESS")):
            check_local_resources(cfg)
        from orchestrator.console import configure as configure_console

        configure_console(verbose=args.verbose)  # before Ray starts: its workers inherit it
        init_ray(args.address, cfg)
        data = prepare_data(cfg.data, storage_uri(cfg.run.storage_path), token_target=cfg.token_budget)
        check_token_budget(cfg.token_budget, data.train_blocks, cfg.data)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2

    print(
        f"data: {data.train_blocks} train / {data.validation_blocks} validation blocks of {data.seq_len} tokens "
        f"({'cache hit' if data.cache_hit else 'prepared'}) at {redact(data.path)}"
    )
    name = f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}" if args.fresh else cfg.run.name
    from ray.train import TrainingFailedError

    from orchestrator.tracking import MlflowTrainCallback, TrialTracker, results_url

    record = MlflowTrainCallback(
        tracking_uri, cfg.run.name, name, config_to_dict(cfg), storage=storage_uri(cfg.run.storage_path)
    )
    try:
        result = make_trainer(cfg, data, name=name, callbacks=[record]).fit()
    except TrainingFailedError as error:  # out of retries; running the command again resumes
        tracker = TrialTracker(tracking_uri, cfg.run.name, name)
        run_id = tracker.child_run(name, name)
        tracker.client.set_tag(run_id, "status", "errored")
        tracker.client.set_tag(run_id, "stop_reason", redact(str(error))[:5000])
        tracker.client.set_terminated(run_id, "FAILED")
        print(f"trial failed: {error}", file=sys.stderr)
        return 1
    tracker = TrialTracker(tracking_uri, cfg.run.name, name)
    run_page = f"#/experiments/{tracker.experiment_id}/runs/{tracker.child_run(name, name)}"
    final = result.metrics
    if final.get("stop_reason"):
        print(f"trial stopped: {final['stop_reason']}", file=sys.stderr)
        return 1
    print(f"done: final val loss {final['final_val_loss']:.4f}, val ppl {final['final_val_ppl']:.2f}")
    print(
        f"merged model (load with AutoModelForCausalLM.from_pretrained): {redact(result.checkpoint.path)}/merged/model"
    )
    base = redact(tracking_uri) if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    if not tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow run (mlflow ui --backend-store-uri {redact(tracking_uri)}): {base}/{run_page}")
    else:
        print(f"MLflow run: {base.rstrip('/')}/{run_page}")
    print(f"  its curves: {results_url(tracker.experiment_id, 'val_ppl', 'min', base=base)}")
    return 0


def absolute_tracking_uri(uri: str) -> str:
    """A local MLflow store as an absolute path: Ray Train logs from its controller actor,
    whose working directory is not this one."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


if __name__ == "__main__":
    sys.exit(main())
