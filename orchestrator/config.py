"""The trial config: one YAML schema for `orchestrator.train` and (plus `search`) for sweeps.

Every key, its type and its default lives in the dataclasses below; their comments are
the reference documentation (README.md shows a full file). `load_config` checks the
whole file before anything is started and raises `ConfigError` naming the dotted path
of the first bad key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import relora


class ConfigError(ValueError):
    """A bad config value; ``str(error)`` is one line that starts with the dotted path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@dataclass(frozen=True)
class ModelConfig:
    name: str = "llama-tiny"  # one of relora.MODEL_SHAPES


@dataclass(frozen=True)
class DataConfig:
    # Where the text comes from:
    #   "builtin"            the offline corpus shipped with every CPython (docs and docstrings)
    #   "file"               local files: `paths` (.txt, .jsonl/.json, .parquet)
    #   "hub"                a Hugging Face hub dataset: `hub_path` (+ `hub_name`, `hub_split`)
    source: Literal["builtin", "file", "hub"] = "builtin"
    paths: list[str] = field(default_factory=list)
    hub_path: str = ""
    hub_name: str = ""
    hub_split: str = "train"
    streaming: bool = False  # stream a large hub dataset instead of downloading it whole
    max_documents: int = 0  # 0: all; with streaming, how many documents to take
    text_column: str = "text"
    # "bpe": a byte-level BPE trained on the corpus with `tokenizers` (cached); anything
    # else is a hub tokenizer name or a local tokenizer directory.
    tokenizer: str = "bpe"
    vocab_size: int = 4096  # for tokenizer: bpe
    seq_len: int = 128  # tokens per packed block
    validation_fraction: float = 0.05  # of the documents, held out before packing
    cache_dir: str = "~/.cache/relora-sweeps/data"  # on a cluster: a shared path


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10  # linear warmup at the start of training
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # 0: off


@dataclass(frozen=True)
class TrainConfig:
    total_steps: int = 100  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, over all workers
    micro_batch_size: int = 8  # sequences per worker per forward pass
    eval_every: int = 20  # steps between validation passes (and the last step)
    eval_blocks: int = 64  # validation blocks per pass (0: the whole split)
    checkpoint_every: int = 20  # steps between DeepSpeed checkpoints
    log_every: int = 5  # steps between train-loss reports
    update_rank_threshold: float = 0.1  # singular values above this count towards the update rank


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[1, 2, 3] = 2
    # "auto": bf16 on GPUs, fp32 on CPUs (gloo); or force one of them.
    precision: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool | Literal["auto"] = "auto"  # auto: GPUs if the Ray cluster has them
    # GPUs per worker when it uses them: 1 (one DeepSpeed rank per GPU), or a fraction to
    # pack the workers of small models onto one GPU. Never more: add workers instead.
    gpus_per_worker: float = 1.0
    cpus_per_worker: int = 1
    # Extra Ray resources each worker asks for: a custom resource of some nodes, or
    # {"accelerator_type:H100": 0.001} to pick a GPU type on a mixed cluster.
    resources_per_worker: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    name: str = "relora"
    storage_path: str = "./runs"  # local folder, shared filesystem or s3://... on a cluster
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    checkpoints_to_keep: int = 2


@dataclass(frozen=True)
class TrialConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    relora: relora.ReLoRAConfig = field(default_factory=relora.ReLoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per worker per optimizer step: global / (micro * workers)."""
        return self.train.global_batch_size // (self.train.micro_batch_size * self.scaling.num_workers)


# --- loading -------------------------------------------------------------------------


def _check_type(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check_type(value, option, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"has the wrong type: {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _check_type(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, f"must have {len(args)} items, got {len(value)}")
            return tuple(_check_type(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        items = [_check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(path, f"must be true or false, got {value!r}")
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(path, f"must be a number, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(path, f"must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", f"must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{path}.{key}" if path else str(key), f"unknown key; known keys: {sorted(fields)}")
    values = {key: _check_type(value, hints[key], f"{path}.{key}" if path else key) for key, value in data.items()}
    try:
        return cls(**values)
    except ValueError as error:  # relora.ReLoRAConfig validates itself and names the field
        message = str(error)
        name = message.split(" ", 1)[0]
        raise ConfigError(f"{path}.{name}" if name in fields else path, message) from None


def check_positive(values: dict[str, float]) -> None:
    """Raise `ConfigError` for the first dotted path whose value is not positive."""
    for path, value in values.items():
        if value <= 0:
            raise ConfigError(path, f"must be positive, got {value!r}")


def _check_relations(cfg: TrialConfig) -> None:
    t, r, d = cfg.train, cfg.relora, cfg.data
    check_positive(
        {
            "train.total_steps": t.total_steps,
            "train.global_batch_size": t.global_batch_size,
            "train.micro_batch_size": t.micro_batch_size,
            "train.eval_every": t.eval_every,
            "train.checkpoint_every": t.checkpoint_every,
            "train.log_every": t.log_every,
            "data.seq_len": d.seq_len,
            "scaling.num_workers": cfg.scaling.num_workers,
            "scaling.cpus_per_worker": cfg.scaling.cpus_per_worker,
            "optim.lr": cfg.optim.lr,
        }
    )
    if not 0 < cfg.scaling.gpus_per_worker <= 1:
        raise ConfigError(
            "scaling.gpus_per_worker",
            "must lie in (0, 1]: one DeepSpeed rank uses one GPU (add workers for more), "
            f"got {cfg.scaling.gpus_per_worker}",
        )
    per_step = t.micro_batch_size * cfg.scaling.num_workers
    if t.global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size",
            f"must be a multiple of train.micro_batch_size * scaling.num_workers = {per_step}, "
            f"got {t.global_batch_size}",
        )
    if r.low_rank and r.warm_start_steps >= t.total_steps:
        raise ConfigError(
            "relora.warm_start_steps", f"must be < train.total_steps = {t.total_steps}, got {r.warm_start_steps}"
        )
    if not 0 <= cfg.optim.warmup_steps < t.total_steps:
        raise ConfigError("optim.warmup_steps", f"must lie in [0, train.total_steps = {t.total_steps})")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must lie in [0, 1], got {cfg.optim.min_lr_ratio}")
    if not 0.0 < d.validation_fraction < 1.0:
        raise ConfigError("data.validation_fraction", f"must lie in (0, 1), got {d.validation_fraction}")
    if cfg.model.name not in relora.MODEL_SHAPES:
        raise ConfigError(
            "model.name", f"unknown model {cfg.model.name!r}; choose one of {sorted(relora.MODEL_SHAPES)}"
        )
    if d.source == "file":
        if not d.paths:
            raise ConfigError("data.paths", "must list at least one file when data.source is 'file'")
        for i, p in enumerate(d.paths):
            path = Path(p).expanduser()
            if not path.is_file():
                raise ConfigError(f"data.paths[{i}]", f"no such file: {path}")
            if path.suffix not in (".txt", ".jsonl", ".json", ".parquet"):
                raise ConfigError(
                    f"data.paths[{i}]", f"unsupported file type {path.suffix!r} (txt, jsonl, json, parquet)"
                )
    if d.source == "hub" and not d.hub_path:
        raise ConfigError("data.hub_path", "must name a hub dataset when data.source is 'hub'")
    if d.tokenizer == "bpe" and d.vocab_size < 300:
        raise ConfigError("data.vocab_size", f"must be at least 300 for a byte-level BPE, got {d.vocab_size}")
    if cfg.deepspeed.zero_stage == 3:
        raise ConfigError(
            "deepspeed.zero_stage",
            "stage 3 is refused: a ReLoRA restart rewrites every target weight from B @ A, which under "
            "ZeRO-3 means gathering and re-scattering every partitioned weight and rewriting the adapters' fp32 "
            "master partitions at each restart; use stage 1 or 2 (see README)",
        )


def config_from_dict(data: dict) -> TrialConfig:
    """Build and check a ``TrialConfig``; raises ``ConfigError`` naming the bad key."""
    cfg = _build(TrialConfig, data or {}, "")
    _check_relations(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(str(path), f"is not valid YAML: {error}".replace("\n", " ")) from None
    return data or {}


def load_config(path: str | Path, storage: str | None = None, overrides: Sequence[str] = ()) -> TrialConfig:
    """Read and check a trial config file (a sweep file's `search` block is not allowed here).

    ``storage`` (the CLI's `--storage`, else `$RELORA_STORAGE`) replaces `run.storage_path`;
    ``overrides`` are the CLI's `--set key.path=value`, checked like the file itself."""
    data = with_overrides(load_yaml(path), overrides)
    if isinstance(data, dict) and "search" in data:
        raise ConfigError("search", "belongs in a sweep file; run it with `python -m orchestrator.sweep`")
    return config_from_dict(with_storage(data, storage))


def set_dotted(config: dict, path: str, value: Any) -> dict:
    """A copy of ``config`` with ``value`` at the dotted ``path``."""
    out = copy.deepcopy(config)
    node = out
    *parents, leaf = path.split(".")
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parents[: depth + 1]), f"is a value, not a section: cannot set {path}")
    node[leaf] = value
    return out


def with_overrides(data: Any, overrides: Sequence[str]) -> Any:
    """``data`` with each `key.path=value` of the CLI's `--set` applied; values are YAML scalars
    or flow collections (`--set relora.rank=64`, `--set optim.betas=[0.9,0.99]`)."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path or any(not part for part in path.split(".")):
            raise ConfigError("--set", f"expects key.path=value, got {item[:200]!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(path, f"--set value is not valid YAML: {text[:200]!r}") from None
        data = set_dotted(data if isinstance(data, dict) else {}, path, value)
    return data


def with_storage(data: Any, storage: str | None) -> Any:
    """``data`` with `run.storage_path` set to ``storage`` (or `$RELORA_STORAGE`), if either is given.

    A cluster sets `RELORA_STORAGE` on its head (see cluster.yaml), so the same sweep file
    writes to a local folder on a laptop and to shared storage on the cluster."""
    storage = storage or os.environ.get("RELORA_STORAGE")
    if not storage or not isinstance(data, dict):
        return data
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    return {**data, "run": {**run, "storage_path": storage}}


def config_to_dict(cfg: TrialConfig) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
