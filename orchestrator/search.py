"""The sweep spec: a trial config plus a `search` block, checked whole before Ray starts.

    search:
      params:                       # distributions over any config key, by dotted path
        relora.rank: {grid: [32, 64, 128]}
        optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
        relora.reset_method: {choice: [magnitude, random]}
      num_samples: 1                # samples of the non-grid distributions (per grid point)
      metric: val_ppl               # what ASHA and "best" look at
      mode: min
      scheduler: {type: asha, grace_period: 40, reduction_factor: 2}   # or {type: none}
      search_alg: random            # or optuna
      max_concurrent_trials: 2
      resources: {num_workers: 2, gpus_per_worker: 0, cpus_per_worker: 1, resources_per_worker: {}}
      register_model: ""            # registry name of the best model ("" = <run.name>-best)

Named variants sweep several keys together (an ablation table), as a grid over names:

      variants:
        full:   {relora.method: full}
        relora: {}
        no-reset: {relora.reset_ratio: 0.0}
"""

from __future__ import annotations

import itertools
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

from orchestrator.config import ConfigError, TrialConfig, _build, check_positive, config_from_dict, set_dotted

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
MAX_CHECKED_COMBINATIONS = 4096
# What a trial reports and a sweep may rank by: losses (mode min) or throughput (mode max).
METRICS = ("val_ppl", "val_loss", "train_loss", "tokens_per_s")


@dataclass(frozen=True)
class SchedulerSpec:
    type: Literal["asha", "none"] = "asha"
    grace_period: int = 20  # steps every trial runs before ASHA may stop it
    reduction_factor: int = 2  # ASHA keeps 1 / reduction_factor at each rung


@dataclass(frozen=True)
class ResourcesSpec:
    num_workers: int = 2  # Ray Train workers per trial
    gpus_per_worker: float = 0  # 0: CPUs only; 1: a GPU per worker; a fraction shares one
    cpus_per_worker: int = 1
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # extra Ray resources


@dataclass(frozen=True)
class SearchSpec:
    params: dict = field(default_factory=dict)
    variants: dict = field(default_factory=dict)  # name -> {dotted.key: value}, swept as a grid
    num_samples: int = 1
    metric: str = "val_ppl"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search_alg: Literal["random", "optuna"] = "random"
    max_concurrent_trials: int = 2
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    register_model: str = ""


@dataclass(frozen=True)
class SweepSpec:
    base: dict  # the trial config, as written (with the resources applied)
    base_config: TrialConfig
    search: SearchSpec

    @property
    def grid_size(self) -> int:
        sizes = [len(d["grid"]) for d in self.search.params.values() if "grid" in d]
        return math.prod(sizes) * max(1, len(self.search.variants))

    @property
    def num_trials(self) -> int:
        return self.grid_size * self.search.num_samples


def _key_exists(path: str) -> bool:
    cls: Any = TrialConfig
    for part in path.split("."):
        if not is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in {f.name for f in fields(cls)}:
            return False
        cls = hints[part]
    return not is_dataclass(cls)


VARIANT = "variant"


def trial_config_dict(base: dict, params: dict, variants: dict | None = None) -> dict:
    """The resolved trial config of one sample of the search space."""
    config = base
    params = dict(params)
    if VARIANT in params:
        params = {**(variants or {})[params.pop(VARIANT)], **params}
    for path, value in params.items():
        config = set_dotted(config, path, value)
    return config


def _check_distribution(path: str, dist: Any) -> list:
    """The values a distribution can take at its edges (all of them for grid/choice)."""
    where = f"search.params.{path}"
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(where, f"must be one mapping of {{{' | '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
    kind, values = next(iter(dist.items()))
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise ConfigError(where, f"{kind} needs a non-empty list, got {values!r}")
        return values
    if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)):
        raise ConfigError(where, f"{kind} needs [low, high], got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(where, f"{kind} needs low < high, got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(where, f"loguniform needs low > 0, got {low!r}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in values):
            raise ConfigError(where, f"randint needs integers, got {values!r}")
        return [low, high - 1]  # Tune's randint excludes high
    return [low, high]


def load_sweep(data: dict) -> SweepSpec:
    """Check a sweep file's content: the trial config, the search block, and every
    combination of the swept values at their edges. Raises `ConfigError` naming the path."""
    if not isinstance(data, dict) or "search" not in data:
        raise ConfigError("search", "a sweep file needs a `search` block (use orchestrator.train for one trial)")
    data = dict(data)
    search = _build(SearchSpec, data.pop("search") or {}, "search")
    check_positive(
        {
            "search.num_samples": search.num_samples,
            "search.max_concurrent_trials": search.max_concurrent_trials,
            "search.resources.num_workers": search.resources.num_workers,
            "search.resources.cpus_per_worker": search.resources.cpus_per_worker,
            "search.scheduler.grace_period": search.scheduler.grace_period,
        }
    )
    if search.scheduler.reduction_factor < 2:
        raise ConfigError("search.scheduler.reduction_factor", "must be at least 2")
    if search.metric not in METRICS:
        raise ConfigError("search.metric", f"must be one of {list(METRICS)}, got {search.metric!r}")

    if search.search_alg == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError("search.search_alg", "optuna is not installed (pip install optuna), or use random")
    r = search.resources
    base = set_dotted(data, "scaling.num_workers", r.num_workers)
    base = set_dotted(base, "scaling.cpus_per_worker", r.cpus_per_worker)
    if not 0 <= r.gpus_per_worker <= 1:
        raise ConfigError(
            "search.resources.gpus_per_worker",
            f"must lie in [0, 1]: one DeepSpeed rank uses one GPU (add workers for more), got {r.gpus_per_worker}",
        )
    base = set_dotted(base, "scaling.use_gpu", r.gpus_per_worker > 0)
    if r.gpus_per_worker > 0:
        base = set_dotted(base, "scaling.gpus_per_worker", r.gpus_per_worker)
    base = set_dotted(base, "scaling.resources_per_worker", dict(r.resources_per_worker))
    base_config = config_from_dict(base)
    if search.scheduler.type == "asha" and search.scheduler.grace_period >= base_config.train.total_steps:
        total = base_config.train.total_steps
        raise ConfigError("search.scheduler.grace_period", f"must be < train.total_steps = {total}")

    r = base_config.relora
    if search.scheduler.type == "asha" and r.low_rank and 0 < r.warm_start_steps >= search.scheduler.grace_period:
        raise ConfigError(
            "search.scheduler.grace_period",
            f"must exceed relora.warm_start_steps = {r.warm_start_steps}: trials share the warm start, "
            "so ASHA cannot tell them apart before it ends",
        )
    edges = {}
    for path, dist in search.params.items():
        if not isinstance(path, str) or not _key_exists(path):
            raise ConfigError(f"search.params.{path}", "is not a config key (use a dotted path such as relora.rank)")
        if path.startswith("scaling."):
            raise ConfigError(f"search.params.{path}", "set workers and GPUs in search.resources, not per trial")
        edges[path] = _check_distribution(path, dist)
    if not isinstance(search.variants, dict):
        raise ConfigError("search.variants", "must map variant names to {dotted.key: value} overrides")
    for variant, overrides in search.variants.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"search.variants.{variant}", "must be a mapping of {dotted.key: value}")
        for path in overrides:
            if not _key_exists(path) or path.startswith("scaling."):
                raise ConfigError(f"search.variants.{variant}.{path}", "is not a config key a trial may set")
    if search.variants:
        edges[VARIANT] = list(search.variants)
    combinations = list(itertools.islice(itertools.product(*edges.values()), MAX_CHECKED_COMBINATIONS))
    for values in combinations:
        params = dict(zip(edges, values, strict=True))
        try:
            config_from_dict(trial_config_dict(base, params, search.variants))
        except ConfigError as error:
            swept = ", ".join(f"{k}={v!r}" for k, v in params.items())
            raise ConfigError(
                f"search.params.{error.path}" if error.path in params else error.path,
                f"{str(error).split(': ', 1)[1]} (with {swept})",
            ) from None
    return SweepSpec(base=base, base_config=base_config, search=search)


def tune_param_space(spec: SweepSpec) -> dict:
    """The `search.params` as Ray Tune distributions, keyed by dotted path."""
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    space = {path: make[kind](values) for path, dist in spec.search.params.items() for kind, values in dist.items()}
    if spec.search.variants:
        space[VARIANT] = tune.grid_search(list(spec.search.variants))
    return space
