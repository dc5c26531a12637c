"""The trial config: one YAML schema for `orchestrator.train` and (plus `search`) for sweeps.

Every key, its type and its default lives in the dataclasses below; their comments are
the reference documentation (README.md shows a full file). `load_config` checks the
whole file before anything is started and raises `ConfigError` naming the dotted path
of the first bad key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import importlib.util
import json
import math
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

import relora


class ConfigError(ValueError):
    """A bad config value; ``str(error)`` is one line that starts with the dotted path."""

    def __init__(self, path: str, message: str) -> None:
        path, message = _cut(path, 200), _cut(message, 600)  # a hostile value never floods the terminal
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def _cut(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} chars)"


_URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)((?:key|token|secret|password|signature)[\w-]*=)[^&\s]+")


def redact(text: Any) -> str:
    """``text`` with credentials in URIs (`s3://KEY:SECRET@bucket`, `?secret_key=...`) blanked:
    what we print or log to MLflow never carries them."""
    return _SECRET_QUERY.sub(r"\1***", _URI_CREDENTIALS.sub("***@", str(text)))


def shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short."""
    return _cut(repr(value), 80)


# Strict types, unknown keys refused, no NaN or inf anywhere, and regexes with look-ahead.
SPEC_RULES = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, regex_engine="python-re")

# Bounds that no real run comes near, so that a typo fails here and not in Ray or Rust.
STEPS = 10**9
Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
Steps = Annotated[int, Field(gt=0, le=STEPS)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Workers = Annotated[int, Field(gt=0, le=4096)]
ResourceAmounts = dict[str, Annotated[float, Field(ge=0, le=1e6)]]
Text = Annotated[str, Field(min_length=1, max_length=1000)]
# A run or model name: a folder under the storage path and a value in MLflow filter strings,
# so no `..`, no leading `/`, no quotes or backslashes. Letters of any script are fine.
NAME_PATTERN = r"^(?!/)(?!.*(^|/)\.\.(/|$))[^'\"\\\x00-\x1f`]{1,200}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
# A Model Registry name: MLflow also refuses `/`, `:` and `%` there.
REGISTRY_NAME_PATTERN = r"^(?!.*\.\.)[^/:%'\"\\\x00-\x1f`]{1,200}$"
RegistryName = Annotated[str, Field(pattern=REGISTRY_NAME_PATTERN)]
RESERVED_RUN_NAMES = ("data", "warm-starts")  # folders of the storage path itself


def registry_name(run_name: str) -> str:
    """The default registry name of a sweep's best model: `<run.name>-best`, made one MLflow accepts."""
    return re.sub(r"[/:%]|\.\.", "-", run_name) + "-best"


@dataclass(frozen=True)
class ModelConfig:
    name: Text = "llama-tiny"  # one of relora.MODEL_SHAPES


@dataclass(frozen=True)
class DataConfig:
    # Where the text comes from:
    #   "builtin"            the offline corpus shipped with every CPython (docs and docstrings)
    #   "file"               local or shared files: `paths` (.txt, .jsonl/.json, .parquet, each
    #                        optionally .gz; globs such as /data/c4/*.jsonl.gz); one type per run
    #   "hub"                a Hugging Face hub dataset: `hub_path` (+ `hub_name`, `hub_split`)
    source: Literal["builtin", "file", "hub"] = "builtin"
    paths: Annotated[list[Text], Field(max_length=10_000)] = field(default_factory=list)
    hub_path: Annotated[str, Field(max_length=1000)] = ""
    hub_name: Annotated[str, Field(max_length=1000)] = ""
    hub_split: Text = "train"
    # Stream a large hub dataset instead of downloading it whole: it is read up to the run's
    # token budget (total_steps x global_batch_size x seq_len) plus the validation share.
    streaming: bool = False
    max_documents: Annotated[int, Field(ge=0, le=10**12)] = 0  # 0: all (or, streaming, the budget)
    text_column: Text = "text"
    # "bpe": a byte-level BPE trained on the corpus with `tokenizers` (cached); anything
    # else is a hub tokenizer name or a local tokenizer directory.
    tokenizer: Text = "bpe"
    vocab_size: Annotated[int, Field(gt=0, le=1_000_000)] = 4096  # for tokenizer: bpe
    seq_len: Annotated[int, Field(gt=0, le=131_072)] = 128  # tokens per packed block
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.05  # of the documents, held out before packing
    cache_dir: Text = "~/.cache/relora-sweeps/data"  # on a cluster: a shared path
    # Passes over the prepared training tokens a run may make. The paper trains on each token
    # once: a run that would need more is refused, unless this says to repeat them.
    epochs: Annotated[float, Field(gt=0, le=1000)] = 1.0


@dataclass(frozen=True)
class OptimConfig:
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.0
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    warmup_steps: Annotated[int, Field(ge=0, le=STEPS)] = 10  # linear warmup at the start of training
    min_lr_ratio: Fraction = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: Annotated[float, Field(ge=0, le=1e6)] = 1.0  # 0: off


@dataclass(frozen=True)
class TrainConfig:
    total_steps: Steps = 100  # optimizer steps
    global_batch_size: Annotated[int, Field(gt=0, le=2**20)] = 16  # sequences per optimizer step, over all workers
    micro_batch_size: Annotated[int, Field(gt=0, le=2**16)] = 8  # sequences per worker per forward pass
    eval_every: Steps = 20  # steps between validation passes (and the last step)
    eval_blocks: Annotated[int, Field(ge=0, le=STEPS)] = 64  # validation blocks per pass (0: the whole split)
    checkpoint_every: Steps = 20  # steps between DeepSpeed checkpoints
    log_every: Steps = 5  # steps between train-loss reports
    # Singular values of a merged update above this count towards its rank.
    update_rank_threshold: Annotated[float, Field(ge=0, le=1e6)] = 0.1
    # What runs the workers' steps: "deepspeed" (ZeRO, the `deepspeed` section), "ddp" (PyTorch
    # DistributedDataParallel: every rank holds the whole optimizer state), or "auto": ddp for
    # relora.method galore, which ZeRO cannot run, deepspeed for the rest.
    engine: Literal["auto", "deepspeed", "ddp"] = "auto"


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[1, 2, 3] = 2
    # "auto": bf16 on GPUs, fp32 on CPUs (gloo); or force one of them. Under train.engine ddp,
    # bf16 is autocast over fp32 weights.
    precision: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: Workers = 2
    use_gpu: bool | Literal["auto"] = "auto"  # auto: GPUs if the Ray cluster has them
    # GPUs per worker when it uses them: 1 (one DeepSpeed rank per GPU), or a fraction to
    # pack the workers of small models onto one GPU. Never more: add workers instead.
    gpus_per_worker: float = 1.0
    cpus_per_worker: Annotated[int, Field(gt=0, le=1024)] = 1
    # Extra Ray resources each worker asks for: a custom resource of some nodes, or
    # {"accelerator_type:H100": 0.001} to pick a GPU type on a mixed cluster.
    resources_per_worker: ResourceAmounts = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    name: Name = "relora"
    storage_path: Text = "./runs"  # local folder, shared filesystem or s3://... on a cluster
    max_failures: Annotated[int, Field(ge=-1, le=1000)] = (
        2  # worker-group restarts from the last checkpoint; -1: no limit
    )
    checkpoints_to_keep: Annotated[int, Field(gt=0, le=1000)] = 2


@dataclass(frozen=True)
class TrialConfig:
    """One trial, resolved: every default filled in and every relation between keys checked."""

    __pydantic_config__: ClassVar[ConfigDict] = SPEC_RULES
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    relora: relora.ReLoRAConfig = field(default_factory=relora.ReLoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def token_budget(self) -> int:
        """Training tokens the run consumes: total_steps x global_batch_size x seq_len."""
        return self.train.total_steps * self.train.global_batch_size * self.data.seq_len

    @property
    def engine(self) -> Literal["deepspeed", "ddp"]:
        """The engine `train.engine` resolves to: "auto" is ddp for GaLore, deepspeed otherwise."""
        if self.train.engine == "auto":
            return "ddp" if self.relora.method == "galore" else "deepspeed"
        return self.train.engine

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per worker per optimizer step: global / (micro * workers)."""
        return self.train.global_batch_size // (self.train.micro_batch_size * self.scaling.num_workers)

    def __post_init__(self) -> None:
        _check_relations(self)


def _check_data(d: DataConfig) -> None:
    """What the data section must say of itself, without looking at the disk."""
    if d.source == "file":
        if not d.paths:
            raise ConfigError("data.paths", "must list at least one file when data.source is 'file'")
        for i, p in enumerate(d.paths):  # whether they exist is `check_environment`'s
            path = Path(p).expanduser()
            if not path.name.removesuffix(".gz").endswith((".txt", ".jsonl", ".json", ".parquet")):
                raise ConfigError(
                    f"data.paths[{i}]", f"unsupported file type {path.suffix!r} (txt, jsonl, json, parquet)"
                )
    if ".." in Path(d.tokenizer).parts:
        raise ConfigError(
            "data.tokenizer", f"must be a hub name or a folder without '..' parts, got {shown(d.tokenizer)}"
        )
    kinds = {Path(p).name.removesuffix(".gz").rsplit(".", 1)[-1].replace("jsonl", "json") for p in d.paths}
    if d.source == "file" and len(kinds) > 1:
        raise ConfigError("data.paths", f"mixes file types {sorted(kinds)}: use one")
    if d.source == "hub" and not d.hub_path:
        raise ConfigError("data.hub_path", "must name a hub dataset when data.source is 'hub'")
    if d.tokenizer == "bpe" and d.vocab_size < 300:
        raise ConfigError("data.vocab_size", f"must be at least 300 for a byte-level BPE, got {d.vocab_size}")


def _check_bounds(cfg: TrialConfig) -> None:
    """Ranges of the library's own fields (relora.ReLoRAConfig checks only their signs)."""
    r = cfg.relora
    for key, value, limit in (
        ("relora.rank", r.rank, 65_536),
        ("relora.alpha", r.alpha, 1e6),
        ("relora.restart_every", r.restart_every, STEPS),
        ("relora.warm_start_steps", r.warm_start_steps, STEPS),
        ("relora.update_proj_gap", r.update_proj_gap, STEPS),
        ("optim.lr", cfg.optim.lr, 10.0),
    ):
        if value > limit:
            raise ConfigError(key, f"must be at most {limit:g}, got {shown(value)}")


def _check_run_name(name: str) -> None:
    parts = name.split("/")
    if any(part in ("", ".") for part in parts):
        raise ConfigError("run.name", f"needs a name in each '/'-separated part, got {shown(name)}")
    if parts[0] in RESERVED_RUN_NAMES:
        raise ConfigError("run.name", f"{shown(parts[0])} is a folder of the storage path itself; choose another")
    if any(len(part.encode()) > 200 for part in parts):
        raise ConfigError("run.name", f"each part must fit in a folder name (200 bytes), got {shown(name)}")


def _check_target_modules(cfg: TrialConfig) -> None:
    if len(set(cfg.relora.target_modules)) != len(cfg.relora.target_modules):
        raise ConfigError("relora.target_modules", f"names a module twice: {shown(list(cfg.relora.target_modules))}")
    for i, module in enumerate(cfg.relora.target_modules):
        if module not in relora.LLAMA_TARGET_MODULES:  # every model of relora.MODEL_SHAPES is a LLaMA
            raise ConfigError(
                f"relora.target_modules[{i}]",
                f"matches no linear layer of {cfg.model.name}, got {shown(module)}; "
                f"choose from {list(relora.LLAMA_TARGET_MODULES)}",
            )


def _check_method(cfg: TrialConfig) -> None:
    """GaLore's optimizer needs each gradient in its weight's shape, and its package installed."""
    if cfg.relora.method != "galore":
        return
    if cfg.engine == "deepspeed":
        raise ConfigError(
            "relora.method",
            "'galore' cannot run under DeepSpeed ZeRO, which flattens the 2-D gradients GaLore projects into "
            "partitions: set train.engine to ddp (or auto)",
        )
    if importlib.util.find_spec("galore_torch") is None:
        raise ConfigError("relora.method", "'galore' needs the galore-torch package: pip install galore-torch==1.0")


def _check_relations(cfg: TrialConfig) -> None:
    """What no single key's type can say; raises `ConfigError` naming the key to change."""
    t, r, d = cfg.train, cfg.relora, cfg.data
    if not 0 < cfg.scaling.gpus_per_worker <= 1:
        raise ConfigError(
            "scaling.gpus_per_worker",
            "must lie in (0, 1]: one DeepSpeed rank uses one GPU (add workers for more), "
            f"got {cfg.scaling.gpus_per_worker}",
        )
    if cfg.scaling.gpus_per_worker < 1 and cfg.scaling.num_workers > 1 and cfg.scaling.use_gpu is not False:
        # Ray packs a trial's fractional bundles onto one GPU, and NCCL refuses two ranks there.
        raise ConfigError(
            "scaling.gpus_per_worker",
            f"a fraction ({cfg.scaling.gpus_per_worker}) packs small one-worker trials onto one GPU; "
            f"a trial of {cfg.scaling.num_workers} workers needs a whole GPU each "
            "(NCCL refuses two ranks of one process group on one GPU)",
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
    if cfg.optim.warmup_steps >= t.total_steps:
        raise ConfigError(
            "optim.warmup_steps",
            f"must lie in [0, train.total_steps = {t.total_steps}), got {cfg.optim.warmup_steps}",
        )
    if cfg.model.name not in relora.MODEL_SHAPES:
        raise ConfigError(
            "model.name", f"unknown model {cfg.model.name!r}; choose one of {sorted(relora.MODEL_SHAPES)}"
        )
    _check_data(d)
    _check_target_modules(cfg)
    _check_bounds(cfg)
    _check_run_name(cfg.run.name)
    _check_method(cfg)
    if cfg.deepspeed.zero_stage == 3 and cfg.engine == "deepspeed":
        raise ConfigError(
            "deepspeed.zero_stage",
            "stage 3 is refused: a ReLoRA restart rewrites every target weight from B @ A, which under "
            "ZeRO-3 means gathering and re-scattering every partitioned weight and rewriting the adapters' fp32 "
            "master partitions at each restart; use stage 1 or 2 (see README)",
        )


# --- loading -------------------------------------------------------------------------
# pydantic validates the YAML as JSON data against the dataclasses above: strict types (no
# "8" for 8), unknown keys refused, and each __post_init__ run. Its first error becomes one
# `ConfigError` line: the dotted path, what the value must be, and the value given.


def _field_hints(cls: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dotted(root: type, loc: tuple) -> tuple[str, Any]:
    """The dotted path of a pydantic error location, and the type found there."""
    path, hint = "", root
    for item in loc:
        if isinstance(item, int):
            path, args = f"{path}[{item}]", typing.get_args(hint)
            hint = args[item] if item < len(args) and args[-1] is not Ellipsis else (args or (Any,))[0]
        elif item in _field_hints(hint):
            path, hint = f"{path}.{item}" if path else item, _field_hints(hint)[item]
        elif typing.get_origin(hint) is dict:
            path, hint = f"{path}.{item}" if path else item, typing.get_args(hint)[1]
        else:  # the member tag of a union: the path ends at the union's own key
            break
    return path, hint


def _as_config_error(error: ValidationError, root: type, prefix: str = "") -> ConfigError:
    first = error.errors()[0]
    path, hint = _dotted(root, first["loc"])
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a relation check, with its own full path
        return cause
    if isinstance(cause, relora.HyperparameterError):  # relora.ReLoRAConfig checks itself
        path, message = f"{path}.{cause.field}", cause.problem
    elif first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        parent_path, parent = _dotted(root, first["loc"][:-1])
        path = f"{parent_path}.{first['loc'][-1]}" if parent_path else str(first["loc"][-1])
        message = f"unknown key; known keys: {sorted(_field_hints(parent))}"
    elif first["type"] == "too_long" or (first["type"] == "missing" and isinstance(first["loc"][-1], int)):
        path, pair = _dotted(root, first["loc"][:-1] if first["type"] == "missing" else first["loc"])
        message = f"must have {len(typing.get_args(pair))} items, got {shown(first['input'])}"
    elif first["type"] == "string_pattern_mismatch":
        message = (
            f"must be a relative name without '..' parts, quotes or control characters, got {shown(first['input'])}"
        )
    else:  # a union fails once per member: say what each member would have taken
        same = [e for e in error.errors() if _dotted(root, e["loc"])[0] == path] or [first]
        wanted = list(dict.fromkeys(e["msg"].split(" should ", 1)[-1] for e in same))
        if all(w.startswith("be ") for w in wanted):
            wanted = ["be " + " or ".join(w[3:] for w in wanted)]
        message = f"must {' or '.join(wanted)}, got {shown(first['input'])}"
    if not path:
        path = "<root>"
    return ConfigError(f"{prefix}.{path}" if prefix and path != "<root>" else prefix or path, message)


def validate(cls: type, data: Any, prefix: str = "") -> Any:
    """``data`` (parsed YAML) as an instance of the config dataclass ``cls``, or `ConfigError`."""
    try:
        document = json.dumps(data, default=str)
    except (TypeError, ValueError) as error:
        raise ConfigError(prefix or "<root>", f"is not plain YAML data: {error}") from None
    try:
        return _adapter(cls).validate_json(document)
    except ValidationError as error:
        raise _as_config_error(error, cls, prefix) from None


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def local_path(text: str, where: str) -> Path:
    """``text`` as a path of this machine, ``~`` expanded; ConfigError for what no path can be."""
    if "\x00" in text:
        raise ConfigError(where, "holds a NUL byte")
    try:
        return Path(text).expanduser()
    except RuntimeError as error:  # ~nosuchuser/...
        raise ConfigError(where, f"{shown(text)}: {error}") from None


def check_environment(cfg: TrialConfig) -> None:
    """What the spec cannot know: whether its input files exist and its cache can be written here.

    Run once, before Ray starts; Tune actors and Train workers never repeat it."""
    cache = local_path(cfg.data.cache_dir, "data.cache_dir")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError("data.cache_dir", f"cannot be created: {error}") from None
    if not os.access(cache, os.W_OK):
        raise ConfigError("data.cache_dir", f"{cache} is not writable")
    if cfg.data.source != "file":
        return
    for i, p in enumerate(cfg.data.paths):
        path = local_path(p, f"data.paths[{i}]")
        if glob.has_magic(str(path)):
            matches = [Path(match) for match in glob.iglob(str(path)) if Path(match).is_file()]
            if not matches:
                raise ConfigError(f"data.paths[{i}]", f"matches no file: {path}")
        elif not path.is_file():
            raise ConfigError(f"data.paths[{i}]", f"no such file: {path}")
        else:
            matches = [path]
        _check_text_column(matches[0], cfg.data.text_column, f"data.paths[{i}]")


def _check_text_column(path: Path, column: str, where: str) -> None:
    """A JSON Lines or Parquet file must hold ``data.text_column`` (its first record, or its schema)."""
    name = path.name.removesuffix(".gz")
    try:
        if name.endswith(".jsonl"):
            import gzip

            with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
                first = next((line for line in f if line.strip()), "{}")
            keys = set(json.loads(first)) if first.lstrip().startswith("{") else set()
        elif name.endswith(".parquet"):
            import pyarrow.parquet

            keys = set(pyarrow.parquet.read_schema(path).names)
        else:
            return
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ConfigError(where, f"cannot be read: {_cut(str(error), 200)}") from None
    if column not in keys:
        raise ConfigError("data.text_column", f"{shown(column)} is not a column of {path}; it has {sorted(keys)[:20]}")


PROBE_SECONDS = 10


def _within(seconds: float, call, *args):
    """``call(*args)``, or TimeoutError when it has not returned in ``seconds`` (it runs on, orphaned)."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call, *args).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def check_storage(storage: str, where: str = "run.storage_path") -> None:
    """The storage path can be written: one probe file, made and removed, within PROBE_SECONDS."""
    import pyarrow.fs

    def probe() -> None:
        if "://" in storage:
            fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        else:
            fs, root = pyarrow.fs.LocalFileSystem(), str(Path(storage).expanduser().resolve())
        fs.create_dir(root, recursive=True)
        probe_path = f"{root}/.relora-write-probe-{os.getpid()}"
        with fs.open_output_stream(probe_path) as f:
            f.write(b"ok")
        fs.delete_file(probe_path)

    try:
        _within(PROBE_SECONDS, probe)
    except TimeoutError:
        raise ConfigError(where, f"{redact(storage)} did not answer within {PROBE_SECONDS} s") from None
    except Exception as error:  # noqa: BLE001 (pyarrow raises OSError, ArrowInvalid, ...)
        raise ConfigError(where, f"cannot write to {redact(storage)}: {error}") from None


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(uri: str, where: str = "--tracking-uri") -> None:
    """The MLflow store can be used: a local store's folder is writable, a server answers /health."""
    import urllib.request

    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    scheme = scheme.split("+", 1)[0]  # postgresql+psycopg2://...
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(where, f"unsupported scheme in {redact(uri)}; use one of {list(TRACKING_SCHEMES)}")
    if scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(where, f"cannot write the MLflow database in {folder}")
    if scheme == "file":
        folder = local_path(uri.removeprefix("file://"), where).resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)  # what MLflow's file store does first
        except OSError as error:
            raise ConfigError(where, f"cannot make an MLflow file store at {folder}: {error.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise ConfigError(where, f"cannot write an MLflow file store at {folder}")
    if scheme in ("postgresql", "mysql", "mssql"):
        _check_reachable(uri, where)
    if scheme in ("http", "https"):
        try:
            _within(PROBE_SECONDS, lambda: urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS))
        except Exception as error:  # noqa: BLE001
            raise ConfigError(
                where, f"no MLflow server answers at {redact(uri)} ({error}); start it, or leave it out for ./mlflow.db"
            ) from None


def _check_reachable(uri: str, where: str) -> None:
    """A database server answers a TCP connection (the cheap call: no driver, no credentials)."""
    import socket
    import urllib.parse

    parsed = urllib.parse.urlsplit(uri)
    default_port = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}[parsed.scheme.split("+", 1)[0]]
    try:
        address = (parsed.hostname or "localhost", parsed.port or default_port)
    except ValueError as error:
        raise ConfigError(where, f"{redact(uri)}: {error}") from None
    try:
        socket.create_connection(address, timeout=PROBE_SECONDS).close()
    except OSError as error:
        raise ConfigError(where, f"no database answers at {redact(uri)} ({error})") from None


def check_token_budget(budget: int, train_blocks: int, data: DataConfig) -> None:
    """Refuse a run that would repeat its training tokens, unless `data.epochs` asks for that."""
    available = train_blocks * data.seq_len
    if budget > available * data.epochs:
        passes = math.ceil(budget / available * 10) / 10
        raise ConfigError(
            "train.total_steps",
            f"needs {budget:,} training tokens (total_steps x global_batch_size x data.seq_len), and the "
            f"prepared data holds {available:,} (x data.epochs = {data.epochs:g}): add data, lower "
            f"train.total_steps, or set data.epochs: {passes:g} to repeat it",
        )


def known_key(path: str) -> bool:
    """Whether ``path`` (e.g. ``relora.rank``) names a value of a trial config."""
    hint: Any = TrialConfig
    for part in path.split("."):
        if part not in _field_hints(hint):
            return False
        hint = _field_hints(hint)[part]
    return not dataclasses.is_dataclass(hint)


def replace_dotted(cfg: Any, path: str, value: Any) -> Any:
    """A copy of the config dataclass ``cfg`` with ``value`` at ``path``; every __post_init__ on
    the way runs again. For values already checked (a sweep's samples, checked at load)."""
    return replace_values(cfg, {path: value})


def replace_values(cfg: Any, values: dict[str, Any]) -> Any:
    """``replace_dotted`` of several paths at once: the keys of one section change together, so
    that no section is built half-changed (method galore before its warm_start_steps 0)."""
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            changes[head] = _adapter(hints[head]).validate_python(value)  # [0.9, 0.99] -> a tuple
    for head, section_values in nested.items():
        changes[head] = replace_values(getattr(cfg, head), section_values)
    return dataclasses.replace(cfg, **changes)


def config_from_dict(data: dict) -> TrialConfig:
    """Build and check a ``TrialConfig``; raises ``ConfigError`` naming the bad key."""
    return validate(TrialConfig, data or {})


MAX_SPEC_BYTES = 1 << 20  # a config is a page of YAML; a megabyte is a mistake or an attack
MAX_SPEC_DEPTH = 32
MAX_SPEC_NODES = 100_000  # aliases can make a small file a huge tree ("billion laughs")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {shown(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_shape(data: Any, where: str) -> None:
    """Refuse trees too deep or too large to be a config, without recursing ourselves."""
    stack, nodes = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_SPEC_DEPTH:
            raise ConfigError(where, f"is nested more than {MAX_SPEC_DEPTH} levels deep")
        if nodes > MAX_SPEC_NODES:
            raise ConfigError(where, f"holds more than {MAX_SPEC_NODES} values (YAML aliases?)")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def load_yaml(path: str | Path) -> dict:
    """A spec file as data: UTF-8 YAML, at most MAX_SPEC_BYTES, no duplicate keys, a sane shape."""
    path = Path(path)
    where = shown(str(path)).strip("'\"")
    if not path.is_file():
        raise ConfigError(where, "no such config file")
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise ConfigError(where, f"is {path.stat().st_size} bytes; a config file holds at most {MAX_SPEC_BYTES}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(where, f"is not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        raise ConfigError(where, f"is not valid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(where, f"is nested more than {MAX_SPEC_DEPTH} levels deep") from None
    _check_shape(data, where)
    return data if data is not None else {}


def load_config(path: str | Path, storage: str | None = None, overrides: Sequence[str] = ()) -> TrialConfig:
    """Read and check a trial config file (a sweep file's `search` block is not allowed here).

    ``storage`` (the CLI's `--storage`, else `$RELORA_STORAGE`) replaces `run.storage_path`;
    ``overrides`` are the CLI's `--set key.path=value`, checked like the file itself. Then
    the files it reads must exist here, on the driver."""
    data = with_overrides(load_yaml(path), overrides)
    if isinstance(data, dict) and "search" in data:
        raise ConfigError("search", "belongs in a sweep file; run it with `python -m orchestrator.sweep`")
    cfg = config_from_dict(with_storage(data, storage))
    check_environment(cfg)
    return cfg


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
        if path.count(".") >= MAX_SPEC_DEPTH or len(item) > MAX_SPEC_BYTES:
            raise ConfigError("--set", f"{_cut(path, 80)} is deeper or longer than any config key")
        if text.count("*") > 64:  # YAML aliases: a few bytes can expand to gigabytes before the node cap
            raise ConfigError(_cut(path, 80), "--set value holds too many YAML aliases")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as error:
            raise ConfigError(_cut(path, 80), f"--set value is not valid YAML ({error}): {text[:200]!r}") from None
        except RecursionError:
            raise ConfigError(_cut(path, 80), f"--set value is nested more than {MAX_SPEC_DEPTH} levels deep") from None
        _check_shape(value, _cut(path, 80))
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


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level of dotted keys."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_to_dict(cfg: TrialConfig) -> dict:
    """The config as plain YAML-able data (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
