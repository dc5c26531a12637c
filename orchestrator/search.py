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

A variant's value may be a grid of its own: the variant then stands for one trial config per
value, named after it (`galore lr=0.01`, `galore lr=0.003`). That gives each method its own
LR grid in one sweep, as a fair comparison of methods needs:

      variants:
        galore: {relora.method: galore, optim.lr: {grid: [0.01, 0.003]}}
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import ConfigDict, Field

from orchestrator.config import (
    SPEC_RULES,
    STEPS,
    ConfigError,
    RegistryName,
    ResourceAmounts,
    TrialConfig,
    Workers,
    check_environment,
    config_from_dict,
    config_to_dict,
    known_key,
    replace_values,
    set_dotted,
    shown,
    validate,
)

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
MAX_CHECKED_COMBINATIONS = 4096
# What a trial reports and a sweep may rank by: losses (mode min) or throughput (mode max).
Metric = Literal["val_ppl", "val_loss", "train_loss", "tokens_per_s"]
METRICS = get_args(Metric)
VARIANT = "variant"
# What ASHA counts time in: the step, carried only by evaluations outside a re-warm (a restart's
# or the switch's; `ReLoRAConfig.rewarming_after`). A rung is judged on a trial's first settled
# evaluation at or past it, never inside the loss spike that follows a restart.
SETTLED_STEP = "settled_step"


@dataclass(frozen=True)
class SchedulerSpec:
    type: Literal["asha", "none"] = "asha"
    grace_period: Annotated[int, Field(gt=0, le=STEPS)] = 20  # steps every trial runs before ASHA may stop it
    reduction_factor: Annotated[int, Field(ge=2, le=100)] = 2  # ASHA keeps 1 / reduction_factor at each rung


@dataclass(frozen=True)
class ResourcesSpec:
    num_workers: Workers = 2  # Ray Train workers per trial
    gpus_per_worker: float = 0  # 0: CPUs only; 1: a GPU per worker; a fraction shares one
    cpus_per_worker: Annotated[int, Field(gt=0, le=1024)] = 1
    resources_per_worker: ResourceAmounts = field(default_factory=dict)  # extra Ray resources

    def __post_init__(self) -> None:
        if not 0 <= self.gpus_per_worker <= 1:
            raise ConfigError(
                "search.resources.gpus_per_worker",
                "must lie in [0, 1]: one DeepSpeed rank uses one GPU (add workers for more), "
                f"got {self.gpus_per_worker}",
            )
        if 0 < self.gpus_per_worker < 1 and self.num_workers > 1:
            raise ConfigError(
                "search.resources.gpus_per_worker",
                f"a fraction ({self.gpus_per_worker}) packs one-worker trials onto one GPU; "
                f"{self.num_workers} workers per trial need a whole GPU each "
                "(NCCL refuses two ranks of one process group on one GPU)",
            )


@dataclass(frozen=True)
class SearchSpec:
    __pydantic_config__: ClassVar[ConfigDict] = SPEC_RULES
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted.key -> {distribution: values}
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {dotted.key: value}, a grid
    num_samples: Annotated[int, Field(gt=0, le=100_000)] = 1
    metric: Metric = "val_ppl"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search_alg: Literal["random", "optuna"] = "random"
    max_concurrent_trials: Annotated[int, Field(gt=0, le=1024)] = 2
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    register_model: RegistryName | Literal[""] = ""  # "" : <run.name>-best


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep: the base trial, resolved once, and the search over it."""

    base_config: TrialConfig  # every default filled in, with the search's resources applied
    search: SearchSpec

    @property
    def grid_size(self) -> int:
        sizes = [len(d["grid"]) for d in self.search.params.values() if "grid" in d]
        return math.prod(sizes) * max(1, len(self.search.variants))

    @property
    def num_trials(self) -> int:
        return self.grid_size * self.search.num_samples

    @property
    def token_budget(self) -> int:
        """The most training tokens any trial consumes (swept steps and batch sizes at their edges)."""
        return max(self.trial(params).token_budget for params in _edge_samples(self.search))

    @property
    def engines(self) -> list[str]:
        """The engines the trials run on (train.engine auto: a GaLore variant's is ddp)."""
        return sorted({self.trial(params).engine for params in _edge_samples(self.search)})

    def trial(self, params: dict) -> TrialConfig:
        """The config of one sample of the search space (Tune's ``trial.config``)."""
        return resolve_trial(self.base_config, params, self.search.variants)


def _overrides(params: dict, variants: dict) -> dict:
    """A sample's values by dotted path, its variant's (if any) first."""
    params = dict(params)
    if VARIANT in params:
        params = {**variants[params.pop(VARIANT)], **params}
    return params


def resolve_trial(base: TrialConfig, params: dict, variants: dict) -> TrialConfig:
    """``base`` with a sample's values applied: typed replaces of values checked at load time."""
    return replace_values(base, _overrides(params, variants))


def _check_distribution(path: str, dist: dict) -> list:
    """The values a distribution can take at its edges (all of them for grid/choice)."""
    where = f"search.params.{path}"
    if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(where, f"must be one mapping of {{{' | '.join(DISTRIBUTIONS)}: ...}}, got {shown(dist)}")
    kind, values = next(iter(dist.items()))
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise ConfigError(where, f"{kind} needs a non-empty list, got {shown(values)}")
        return values
    numbers = isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not (numbers and len(values) == 2 and all(math.isfinite(v) for v in values)):
        raise ConfigError(where, f"{kind} needs [low, high], two finite numbers, got {shown(values)}")
    low, high = values
    if not low < high:
        raise ConfigError(where, f"{kind} needs low < high, got {shown(values)}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(where, f"loguniform needs low > 0, got {shown(low)}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in values):
            raise ConfigError(where, f"randint needs integers, got {shown(values)}")
        return [low, high - 1]  # Tune's randint excludes high
    return [low, high]


# Sections fixed for the whole sweep: the data is prepared once, the run names the sweep's
# storage, and workers and GPUs are `search.resources`.
FIXED_SECTIONS = ("data", "run", "scaling")


def _check_swept_key(where: str, path: str) -> None:
    if not known_key(path):
        raise ConfigError(where, "is not a config key (use a dotted path such as relora.rank)")
    if path.split(".")[0] in FIXED_SECTIONS:
        raise ConfigError(
            where,
            f"cannot vary per trial: {', '.join(FIXED_SECTIONS)} are one for the whole sweep "
            "(workers and GPUs go in search.resources)",
        )


def _check_swept_keys(search: SearchSpec) -> None:
    for path in search.params:
        _check_swept_key(f"search.params.{path}", path)
    for variant, overrides in search.variants.items():
        for path in overrides:
            _check_swept_key(f"search.variants.{variant}.{path}", path)
            if path in search.params:
                raise ConfigError(
                    f"search.params.{path}", f"is also set by variant {variant!r}: set it in one place only"
                )


def expand_variants(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each variant with ``{grid: [...]}`` values as one variant per combination of them, named
    ``<variant> <key>=<value> ...`` after the last part of each gridded key."""
    expanded: dict[str, dict[str, Any]] = {}
    for name, overrides in variants.items():
        grids = {}
        for path, value in overrides.items():
            if isinstance(value, dict):
                grid = value.get("grid")
                if set(value) != {"grid"} or not isinstance(grid, list) or not grid:
                    raise ConfigError(
                        f"search.variants.{name}.{path}",
                        f"takes a value, or {{grid: [values]}} to try each, got {shown(value)}",
                    )
                grids[path] = grid
        for values in itertools.product(*grids.values()):
            label = " ".join(f"{path.rsplit('.', 1)[-1]}={v}" for path, v in zip(grids, values, strict=True))
            full_name = f"{name} {label}" if label else name
            if full_name in expanded:
                raise ConfigError(f"search.variants.{name}", f"names the trial config {full_name!r} twice")
            expanded[full_name] = {**overrides, **dict(zip(grids, values, strict=True))}
    return expanded


def _check_search_against(search: SearchSpec, base: TrialConfig) -> None:
    """What the search block must respect of the trial it sweeps."""
    sched, total = search.scheduler, base.train.total_steps
    if sched.type == "asha" and sched.grace_period >= total:
        raise ConfigError("search.scheduler.grace_period", f"must be < train.total_steps = {total}")
    r = base.relora
    if sched.type == "asha" and r.low_rank and 0 < r.warm_start_steps >= sched.grace_period:
        raise ConfigError(
            "search.scheduler.grace_period",
            f"must exceed relora.warm_start_steps = {r.warm_start_steps}: trials share the warm start, "
            "so ASHA cannot tell them apart before it ends",
        )
    if search.search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("search.search_alg", "optuna is not installed (pip install optuna), or use random")


def _edge_samples(search: SearchSpec) -> Iterator[dict]:
    """Every combination of the swept values at their edges."""
    edges = {path: _check_distribution(path, dist) for path, dist in search.params.items()}
    if search.variants:
        edges[VARIANT] = list(search.variants)
    count = math.prod(len(values) for values in edges.values())
    if count > MAX_CHECKED_COMBINATIONS:
        raise ConfigError(
            "search.params",
            f"spans {count} combinations of values at their edges; every one is checked before "
            f"the sweep starts, and at most {MAX_CHECKED_COMBINATIONS} can be: sweep fewer keys at once",
        )
    for values in itertools.product(*edges.values()):
        yield dict(zip(edges, values, strict=True))


def _check_samples(search: SearchSpec, base: dict) -> None:
    """Every edge sample validated as a trial config of its own, so no trial fails at start."""
    for params in _edge_samples(search):
        config = base
        for path, value in _overrides(params, search.variants).items():
            config = set_dotted(config, path, value)
        try:
            _check_search_against(search, config_from_dict(config))  # a swept total_steps meets ASHA too
        except ConfigError as error:
            swept = ", ".join(f"{k}={v!r}" for k, v in params.items())
            where = f"search.params.{error.path}" if error.path in params else error.path
            raise ConfigError(where, f"{error.message} (with {swept})") from None


def with_resources(trial: dict, resources: ResourcesSpec) -> dict:
    """The trial config with `search.resources` in its `scaling` section."""
    scaling = {
        "num_workers": resources.num_workers,
        "cpus_per_worker": resources.cpus_per_worker,
        "use_gpu": resources.gpus_per_worker > 0,
        "resources_per_worker": dict(resources.resources_per_worker),
    }
    if resources.gpus_per_worker > 0:
        scaling["gpus_per_worker"] = resources.gpus_per_worker
    given = trial.get("scaling") if isinstance(trial.get("scaling"), dict) else {}
    for key, value in given.items():  # never silently beaten by search.resources
        if key in scaling and value != scaling[key] or key == "gpus_per_worker" and value != resources.gpus_per_worker:
            raise ConfigError(
                f"scaling.{key}",
                f"is set by search.resources in a sweep file (which gives {shown(scaling.get(key, 0))}, "
                f"not {shown(value)}): set it there",
            )
    for key, value in scaling.items():
        trial = set_dotted(trial, f"scaling.{key}", value)
    return trial


def load_sweep(data: Any) -> SweepSpec:
    """Check a sweep file's content whole (the trial, the search block, every edge sample and the
    files it reads) and resolve it once. Raises `ConfigError` naming the dotted path."""
    if not isinstance(data, dict) or "search" not in data:
        raise ConfigError("search", "a sweep file needs a `search` block (use orchestrator.train for one trial)")
    trial = {key: value for key, value in data.items() if key != "search"}
    search = validate(SearchSpec, {} if data["search"] is None else data["search"], "search")
    search = dataclasses.replace(search, variants=expand_variants(search.variants))
    base = config_from_dict(with_resources(trial, search.resources))
    _check_search_against(search, base)
    _check_swept_keys(search)
    _check_samples(search, config_to_dict(base))
    check_environment(base)
    return SweepSpec(base_config=base, search=search)


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
