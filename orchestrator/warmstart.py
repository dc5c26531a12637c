"""The full-rank warm start, trained once per sweep and shared by every trial that can use it.

Two trials can share a warm start when everything that shapes its first
`relora.warm_start_steps` steps is the same: model, data, seed, optimizer, batch sizes,
the LR schedule, DeepSpeed settings and the number of workers (which fixes each worker's
data shard). A hash of exactly those settings names the warm start, so it is computed once,
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
    "relora.method",
    "relora.warm_start_steps",
    "relora.restart_every",
    "relora.restart_warmup_steps",
    "relora.jagged",
}


def shapes_warm_start(path: str) -> bool:
    return path in SHAPING_KEYS or path.startswith(SHAPING_PREFIXES)


def warm_start_key(cfg: TrialConfig, data: PreparedData) -> str | None:
    """The content address of ``cfg``'s warm start, or None when it has none."""
    if not cfg.relora.low_rank or cfg.relora.warm_start_steps == 0:
        return None
    c = config_to_dict(cfg)
    payload = {
        "model": c["model"],
        "data": data.fingerprint,
        "seed": c["seed"],
        "optim": c["optim"],
        "deepspeed": c["deepspeed"],
        "workers": cfg.scaling.num_workers,
        "batch": [cfg.train.total_steps, cfg.train.global_batch_size, cfg.train.micro_batch_size],
        "steps": cfg.relora.warm_start_steps,
        "lr": [cfg.relora.lr_restart_every, cfg.relora.restart_warmup_steps],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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


def ensure_warm_starts(spec: SweepSpec, data: PreparedData, storage: str, tracker) -> dict[str, str]:
    """Train each distinct warm start of the sweep that is not stored yet; returns key -> checkpoint."""
    from orchestrator.train import make_trainer, read_history

    store = WarmStartStore(storage)
    found: dict[str, str] = {}
    for cfg in shareable_configs(spec):
        key = warm_start_key(cfg, data)
        if key is None or key in found:
            continue
        checkpoint = store.get(key)
        if checkpoint is None:
            print(f"warm start {key}: {cfg.relora.warm_start_steps} full-rank steps, shared by the trials")
            result = make_trainer(
                cfg, data, name=f"warm-starts/{key}", storage_path=storage, stop_at=cfg.relora.warm_start_steps
            ).fit()
            checkpoint = result.checkpoint.path
            if "://" in storage:  # Ray gives the path within the bucket; trials need the URI
                checkpoint = f"{storage.split('://', 1)[0]}://{checkpoint}"
            tracker.log_warm_start(key, config_to_dict(cfg), read_history(checkpoint), checkpoint)
            store.put(key, checkpoint)
        else:
            print(f"warm start {key}: reused from {checkpoint}")
        found[key] = checkpoint
    return found
