"""The full-rank warm start, trained once per sweep and shared by every trial that can use it.

Two trials can share a warm start when everything that shapes its first
`relora.warm_start_steps` steps is the same: model, data, seed, optimizer (with the LR
envelope: `optim.*` and `train.total_steps`), batch sizes, DeepSpeed settings and the number
of workers (which fixes each worker's data shard). The warm start follows the plain cosine
envelope, so the restart period, the re-warm, the reset and the rank do not shape it: one warm
start serves a whole sweep over them. A hash of exactly those settings names the warm start, so it is computed once,
found again on resume, and reused by later sweeps of the same settings. A trial started
from it continues at the switch to low rank, exactly as its own warm start would have
ended: the switch re-creates the optimizer in both cases.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging

from orchestrator.config import TrialConfig, config_to_dict
from orchestrator.console import say
from orchestrator.data import PreparedData, storage_filesystem
from orchestrator.search import VARIANT, SweepSpec

log = logging.getLogger(__name__)

# Config keys that can change a warm start. Everything else (rank, alpha, reset ratio,
# eval and checkpoint cadence...) only matters after it.
SHAPING_PREFIXES = ("model.", "data.", "seed", "optim.", "deepspeed.", "scaling.num_workers")
SHAPING_KEYS = {
    "train.total_steps",
    "train.global_batch_size",
    "train.micro_batch_size",
    "train.engine",
    "relora.warm_start_steps",
}


def shapes_warm_start(path: str) -> bool:
    return path in SHAPING_KEYS or path.startswith(SHAPING_PREFIXES)


def warm_start_settings(cfg: TrialConfig) -> dict | None:
    """What shapes ``cfg``'s warm start (the data as configured), or None when it has none."""
    if not cfg.relora.low_rank or cfg.relora.warm_start_steps == 0:
        return None
    c = config_to_dict(cfg)
    # The engine only where it is not DeepSpeed's: the keys of existing DeepSpeed warm starts stay.
    engine = {} if cfg.engine == "deepspeed" else {"engine": cfg.engine}
    return {
        **engine,
        "model": c["model"],
        "data": c["data"],
        "seed": c["seed"],
        "optim": c["optim"],
        "deepspeed": c["deepspeed"],
        "workers": cfg.scaling.num_workers,
        "batch": [cfg.train.total_steps, cfg.train.global_batch_size, cfg.train.micro_batch_size],
        "steps": cfg.relora.warm_start_steps,
    }


def warm_start_key(cfg: TrialConfig, data: PreparedData) -> str | None:
    """The content address of ``cfg``'s warm start, or None when it has none. The prepared
    data's fingerprint stands for the data settings (a cache moved elsewhere keeps its key)."""
    settings = warm_start_settings(cfg)
    if settings is None:
        return None
    payload = {**settings, "data": data.fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def count_warm_starts(spec: SweepSpec) -> tuple[int, int]:
    """(distinct shared warm starts, trials that train their own) for ``--dry-run``."""
    configs = shareable_configs(spec)
    if not configs:  # a sampled setting shapes it: every low-rank trial with a warm start trains its own
        own = spec.num_trials if warm_start_settings(spec.base_config) is not None else 0
        return 0, own
    distinct = {json.dumps(s, sort_keys=True) for s in map(warm_start_settings, configs) if s is not None}
    return len(distinct), 0


def shareable_configs(spec: SweepSpec) -> list[TrialConfig]:
    """The configs of the grid points (and variants) of a sweep, when sampled distributions
    leave the warm start alone; else none (each trial then trains its own)."""
    sampled = [p for p, d in spec.search.params.items() if "grid" not in d and shapes_warm_start(p)]
    if sampled:
        log.info("no shared warm start: %s is sampled and shapes the warm start", sampled)
        return []
    grid = {p: d["grid"] for p, d in spec.search.params.items() if "grid" in d}
    if spec.search.variants:
        grid[VARIANT] = list(spec.search.variants)
    configs = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values, strict=True))
        configs.append(spec.trial(params))
    return configs


class WarmStartStore:
    """Finished warm starts under ``<storage>/warm-starts/<key>.json``, on any pyarrow filesystem."""

    def __init__(self, storage: str) -> None:
        self.fs, self.root = storage_filesystem(storage)
        self.root = f"{self.root}/warm-starts"
        self.fs.create_dir(self.root, recursive=True)

    def get(self, key: str) -> str | None:
        try:
            with self.fs.open_input_stream(f"{self.root}/{key}.json") as f:
                return json.loads(f.read())["checkpoint"]
        except FileNotFoundError:
            return None

    def put(self, key: str, checkpoint: str) -> None:
        with self.fs.open_output_stream(f"{self.root}/{key}.json") as f:
            f.write(json.dumps({"checkpoint": checkpoint}).encode())


def fit_warm_start(cfg: TrialConfig, data: PreparedData, key: str, storage: str) -> str:
    """Train one warm start as a Ray Train run of its own; returns its checkpoint's URI."""
    from orchestrator.train import make_trainer

    result = make_trainer(
        cfg, data, name=f"warm-starts/{key}", storage_path=storage, stop_at=cfg.relora.warm_start_steps
    ).fit()
    checkpoint = result.checkpoint.path
    if "://" in storage:  # Ray gives the path within the bucket; trials need the URI
        checkpoint = f"{storage.split('://', 1)[0]}://{checkpoint}"
    return checkpoint


def ensure_warm_starts(
    spec: SweepSpec, data: PreparedData, storage: str, tracker, max_concurrent: int | None = None
) -> dict[str, str]:
    """Train each distinct warm start of the sweep that is not stored yet, side by side; returns
    key -> checkpoint.

    Each is a Ray Train run driven from a Ray task of its own (no CPU: its workers hold the
    resources), so Ray places as many at once as the cluster has room for, and queues the rest.
    At most ``max_concurrent`` (the sweep's ``max_concurrent_trials``) are in flight."""
    import ray

    from orchestrator.train import read_history

    store = WarmStartStore(storage)
    found: dict[str, str] = {}
    todo: dict[str, TrialConfig] = {}
    for cfg in shareable_configs(spec):
        key = warm_start_key(cfg, data)
        if key is None or key in found or key in todo:
            continue
        checkpoint = store.get(key)
        if checkpoint is None:
            todo[key] = cfg
        else:
            say(f"warm start {key}: reused from {checkpoint}")
            found[key] = checkpoint
    limit = max_concurrent or spec.search.max_concurrent_trials
    fit = ray.remote(num_cpus=0, max_retries=0)(fit_warm_start)
    waiting, running = list(todo), {}
    if todo:
        steps = sorted({cfg.relora.warm_start_steps for cfg in todo.values()})
        say(
            f"warm starts: training {len(todo)} ({'/'.join(map(str, steps))} full-rank steps), "
            f"{min(limit, len(todo))} at a time: {', '.join(todo)}"
        )
    while waiting or running:
        while waiting and len(running) < limit:
            key = waiting.pop(0)
            running[fit.remote(todo[key], data, key, storage)] = key
        (done,), _ = ray.wait(list(running), num_returns=1)
        key = running.pop(done)
        checkpoint = ray.get(done)
        tracker.log_warm_start(key, config_to_dict(todo[key]), read_history(checkpoint), checkpoint)
        store.put(key, checkpoint)
        say(f"warm start {key}: done ({len(found) + 1} of {len(found) + len(waiting) + len(running) + 1})")
        found[key] = checkpoint
    return found
