"""Text to packed token blocks, prepared once on Ray Data and shared through the storage.

`prepare_data` runs as Ray Data tasks across the cluster: read the documents (built-in
corpus, local or shared files, a hub dataset), hold out a validation share of them by a
hash of their text, tokenize, pack the tokens into `seq_len` blocks, and write each batch
of documents as one shard per split (`train/<hash>.npy`, `validation/<hash>.npy`) straight
into the run's storage. The driver holds plans and a list of shards, never the corpus.
The folder is named by a fingerprint of everything that shapes its content, so a second
call with the same settings is a cache hit and any change a miss; `meta.json`, written
last, marks it complete.

Workers never tokenize: each memory-maps the shards that hold its own disjoint share of
the blocks (downloading only those from object storage), in an order fixed by the seed,
so a resumed run picks up at the exact sample where it stopped.
"""

from __future__ import annotations

import ast
import bisect
import glob
import gzip
import hashlib
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import torch

from orchestrator.config import ConfigError, DataConfig, redact

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the packing changes, so old caches miss (3: token ids in token_dtype)
TRAIN, VALIDATION = "train", "validation"
SHARD_DOCUMENTS = 4096  # documents per Ray Data batch: one shard per split each
BPE_TRAINING_CHARS = 200_000_000  # a BPE is trained on the corpus's first 200 MB of text
_SKIPPED_STDLIB_DIRS = {
    "site-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "__pycache__",
    "ensurepip",
    "turtledemo",
}


# --- sources ---------------------------------------------------------------------------


def builtin_documents() -> list[str]:
    """The English prose inside every CPython: the reference topics of `pydoc` plus every
    docstring of 200+ characters in the standard library's sources (read with `ast`,
    nothing imported). About 1.6 MB on CPython 3.11; no network, no extra files."""
    documents = [topics[key] for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(directory, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 200:
                        documents.append(doc)
    return documents


def expand_paths(paths: list[str]) -> list[str]:
    """The files of `data.paths`, globs expanded, in a fixed order."""
    found: list[str] = []
    for i, pattern in enumerate(paths):
        pattern = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"data.paths[{i}]", f"matches no file: {pattern}")
        found.extend(matches)
    return found


def _file_kind(path: str) -> str:
    name = path.removesuffix(".gz")
    return "parquet" if name.endswith(".parquet") else "json" if name.endswith((".jsonl", ".json")) else "text"


def _paragraphs(row: dict) -> list[dict]:
    """A text file's documents: its paragraphs (blank lines separate them)."""
    raw = row["bytes"]
    if row["path"].endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return [{"text": p} for p in text.split("\n\n") if p.strip()]


def read_documents(cfg: DataConfig):
    """The documents as a Ray Dataset with one `text` column, read by Ray Data tasks."""
    import ray.data

    if cfg.source == "builtin":  # 1.6 MB, from the driver's own Python
        ds = ray.data.from_items([{"text": d} for d in builtin_documents()], override_num_blocks=4)
    elif cfg.source == "file":
        paths = expand_paths(cfg.paths)
        kind = _file_kind(paths[0])
        if kind == "text":
            ds = ray.data.read_binary_files(paths, include_paths=True).flat_map(_paragraphs)
        elif kind == "json":
            ds = ray.data.read_json(paths)
        else:
            ds = ray.data.read_parquet(paths)
    else:
        import datasets

        # Ray reads a hub dataset's Parquet files in parallel where the hub serves them.
        hub = datasets.load_dataset(cfg.hub_path, cfg.hub_name or None, split=cfg.hub_split, streaming=cfg.streaming)
        ds = ray.data.from_huggingface(hub)
    columns = ds.columns() or []
    if cfg.text_column not in columns:
        raise ConfigError("data.text_column", f"{cfg.text_column!r} is not a column of the data ({columns})")
    ds = ds.select_columns([cfg.text_column])
    if cfg.text_column != "text":
        ds = ds.rename_columns({cfg.text_column: "text"})
    return ds.limit(cfg.max_documents) if cfg.max_documents else ds


def _file_identity(path: str) -> dict:
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _source_identity(cfg: DataConfig) -> dict:
    if cfg.source == "builtin":
        return {"source": "builtin", "python": sysconfig.get_python_version()}
    if cfg.source == "file":
        return {"source": "file", "files": [_file_identity(p) for p in expand_paths(cfg.paths)]}
    return {"source": "hub", "path": cfg.hub_path, "name": cfg.hub_name, "split": cfg.hub_split}


def is_validation(text: str, fraction: float) -> bool:
    """The held-out split, by document: a hash of its text, so the same on every node and run."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# --- tokenizer -------------------------------------------------------------------------


def _tokenizer_identity(cfg: DataConfig) -> dict:
    if cfg.tokenizer == "bpe":  # trained on the corpus, so the source is part of it
        return {"tokenizer": "bpe", "vocab_size": cfg.vocab_size, **_source_identity(cfg)}
    return {"tokenizer": cfg.tokenizer}


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _training_text(documents, limit: int = BPE_TRAINING_CHARS):
    """The documents' text in batches, streamed from Ray to the driver, up to ``limit`` characters."""
    seen = 0
    for batch in documents.iter_batches(batch_size=1000, batch_format="numpy"):
        texts = [str(t) for t in batch["text"]]
        yield texts
        seen += sum(map(len, texts))
        if seen >= limit:
            return


def load_or_train_tokenizer(cfg: DataConfig, documents, cache_dir: Path):
    """A hub/local tokenizer, or a byte-level BPE trained on the documents (their first
    BPE_TRAINING_CHARS characters, streamed) and cached."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if cfg.tokenizer != "bpe":
        return AutoTokenizer.from_pretrained(cfg.tokenizer)
    path = cache_dir / "tokenizers" / f"bpe-{_fingerprint(_tokenizer_identity(cfg))}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    log.info("training a byte-level BPE tokenizer (vocab %d)", cfg.vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(_training_text(documents), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    fast.save_pretrained(tmp)
    _publish(tmp, path)
    return PreTrainedTokenizerFast.from_pretrained(path)


# --- preparation -----------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    """Where a prepared dataset lives, and what it holds."""

    path: str  # the prepared folder: meta.json, train/ and validation/ shards, tokenizer/
    tokenizer_path: str  # save_pretrained folder of the tokenizer
    fingerprint: str
    vocab_size: int
    seq_len: int
    train_blocks: int
    validation_blocks: int
    cache_hit: bool


def data_fingerprint(cfg: DataConfig, token_target: int = 0) -> str:
    """The cache key: source, tokenizer, seq_len, the split, and (for a hub source) the token target."""
    return _fingerprint(
        {
            "version": FORMAT_VERSION,
            "source": _source_identity(cfg),
            "tokenizer": _tokenizer_identity(cfg),
            "seq_len": cfg.seq_len,
            "validation_fraction": cfg.validation_fraction,
            "max_documents": cfg.max_documents,
            "text_column": cfg.text_column,
            "token_target": token_target if cfg.source == "hub" else 0,
        }
    )


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished folder into place atomically; a concurrent winner is kept."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists():
            raise


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id of the vocabulary (uint16 below
    65,536 ids: a quarter of int64's bytes on disk, in transfers and in the page cache)."""
    for dtype in (np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"a vocabulary of {vocab_size} ids does not fit 32 bits")


def pack(token_lists: list[list[int]], seq_len: int, eos_id: int, dtype: type = np.uint32) -> np.ndarray:
    """Documents joined by EOS and cut into ``seq_len`` blocks of ``dtype``; the last partial block is dropped."""
    if not token_lists:
        return np.zeros((0, seq_len), dtype=dtype)
    # Each document with its EOS written into one array of `dtype` (np.append would promote to int64).
    stream = np.concatenate([np.asarray([*ids, eos_id], dtype=dtype) for ids in token_lists])
    usable = len(stream) // seq_len * seq_len
    return stream[:usable].reshape(-1, seq_len)


def storage_filesystem(uri: str):
    """The pyarrow filesystem and path of a local path or a URI (s3://, gs://, file://)."""
    import pyarrow.fs

    if "://" not in uri:  # a plain path (spaces and all): no URI parsing
        return pyarrow.fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pyarrow.fs.FileSystem.from_uri(uri)


class ShardWriter:
    """A Ray Data actor: tokenizes a batch of documents with a tokenizer it loads once, packs
    each split, and writes one shard per split, named by a hash of its content."""

    def __init__(self, tokenizer_path: str, root: str, seq_len: int, validation_fraction: float) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(_local_tokenizer(tokenizer_path))
        self.dtype = token_dtype(len(self.tokenizer))
        self.fs, self.root = storage_filesystem(root)
        self.seq_len, self.fraction = seq_len, validation_fraction
        for split in (TRAIN, VALIDATION):
            self.fs.create_dir(f"{self.root}/{split}", recursive=True)  # a no-op on object storage

    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch["text"] if t is not None and str(t).strip()]
        splits = {TRAIN: [], VALIDATION: []}
        for text in texts:
            splits[VALIDATION if is_validation(text, self.fraction) else TRAIN].append(text)
        rows = {"split": [], "shard": [], "blocks": [], "tokens": []}
        for split, docs in splits.items():
            ids = self.tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
            blocks = pack(ids, self.seq_len, self.tokenizer.eos_token_id, self.dtype)
            name = hashlib.blake2b(blocks.tobytes() + split.encode(), digest_size=12).hexdigest() + ".npy"
            if len(blocks):
                self._write(f"{self.root}/{split}/{name}", blocks)
            rows["split"].append(split)
            rows["shard"].append(name)
            rows["blocks"].append(len(blocks))
            rows["tokens"].append(sum(len(x) + 1 for x in ids))
        return {key: np.asarray(values) for key, values in rows.items()}

    def _write(self, path: str, blocks: np.ndarray) -> None:
        with tempfile.TemporaryFile() as f:
            np.save(f, blocks)
            f.seek(0)
            with self.fs.open_output_stream(path) as out:
                shutil.copyfileobj(f, out)


def _local_tokenizer(path: str) -> str:
    """A tokenizer folder on this machine: as it is, or downloaded from object storage once."""
    if "://" not in path or path.startswith("file://"):
        return path.removeprefix("file://")
    import pyarrow.fs

    local = Path(tempfile.gettempdir()) / f"relora-tokenizer-{_fingerprint({'path': path})}"
    if not local.is_dir():
        fs, root = storage_filesystem(path)
        tmp = Path(tempfile.mkdtemp(dir=local.parent, prefix=".tmp-"))
        pyarrow.fs.copy_files(root, str(tmp), fs, pyarrow.fs.LocalFileSystem())
        _publish(tmp, local)
    return str(local)


def cached_data(cfg: DataConfig, storage: str | None = None, token_target: int = 0) -> PreparedData | None:
    """The prepared data of these settings, if it is complete in its place already."""
    fs, root = storage_filesystem(_prepared_root(cfg, storage, token_target))
    try:
        with fs.open_input_stream(f"{root}/meta.json") as f:
            meta = json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None
    return PreparedData(**{k: meta[k] for k in PreparedData.__dataclass_fields__ if k != "cache_hit"}, cache_hit=True)


def _prepared_root(cfg: DataConfig, storage: str | None, token_target: int) -> str:
    base = f"{storage.rstrip('/')}/data" if storage else str(Path(cfg.cache_dir).expanduser())
    return f"{base}/blocks-{data_fingerprint(cfg, token_target)}"


def prepare_data(cfg: DataConfig, storage: str | None = None, *, token_target: int = 0) -> PreparedData:
    """Read, tokenize, pack and write the shards on Ray Data, once; later calls return the cache.

    ``storage`` is where every node reads it (the run's storage path); without it the data
    goes to `data.cache_dir`. For a hub source, ``token_target`` (the run's token budget)
    is how many training tokens to take: reading stops once the shards hold them."""
    cached = cached_data(cfg, storage, token_target)
    if cached is not None:
        log.info("data cache hit: %s", redact(cached.path))
        return cached
    root = _prepared_root(cfg, storage, token_target)
    local = cached_data(cfg, None, token_target) if storage else None
    if local is not None:  # prepared on this machine before: copy it, meta.json last
        return _copy_prepared(local, root)
    log.info("preparing data %s into %s", redact(asdict(cfg)), redact(root))
    documents = read_documents(cfg)
    tokenizer = load_or_train_tokenizer(cfg, documents, Path(cfg.cache_dir).expanduser())
    if tokenizer.eos_token_id is None:
        raise ConfigError("data.tokenizer", f"{cfg.tokenizer!r} has no end-of-text token to separate documents")
    fs, fs_root = storage_filesystem(root)
    fs.create_dir(f"{fs_root}/tokenizer", recursive=True)
    _upload_tokenizer(tokenizer, fs, f"{fs_root}/tokenizer")
    shards = _write_shards(cfg, documents, f"{root}/tokenizer", root, token_target)
    meta = {
        "path": root,
        "tokenizer_path": f"{root}/tokenizer",
        "fingerprint": data_fingerprint(cfg, token_target),
        "vocab_size": len(tokenizer),
        "format_version": FORMAT_VERSION,
        "token_dtype": token_dtype(len(tokenizer)).name,  # what every shard holds
        "seq_len": cfg.seq_len,
        "train_blocks": sum(rows for _, rows in shards[TRAIN]),
        "validation_blocks": sum(rows for _, rows in shards[VALIDATION]),
        "shards": shards,
    }
    for split in (TRAIN, VALIDATION):
        if not meta[f"{split}_blocks"]:
            raise ConfigError("data.seq_len", f"the {split} split holds fewer than {cfg.seq_len} tokens: add data")
    with fs.open_output_stream(f"{fs_root}/meta.json") as f:  # last: it marks the folder complete
        f.write(json.dumps(meta, indent=1).encode())
    log.info("prepared %d train and %d validation blocks", meta["train_blocks"], meta["validation_blocks"])
    return PreparedData(**{k: meta[k] for k in PreparedData.__dataclass_fields__ if k != "cache_hit"}, cache_hit=False)


def _copy_prepared(data: PreparedData, root: str) -> PreparedData:
    import pyarrow.fs

    log.info("copying the prepared data from %s to %s", redact(data.path), redact(root))
    fs, fs_root = storage_filesystem(root)
    local = pyarrow.fs.LocalFileSystem()
    for part in (TRAIN, VALIDATION, "tokenizer"):
        fs.create_dir(f"{fs_root}/{part}", recursive=True)
        pyarrow.fs.copy_files(f"{data.path}/{part}", f"{fs_root}/{part}", local, fs)
    meta = json.loads(Path(data.path, "meta.json").read_text())
    meta.update(path=root, tokenizer_path=f"{root}/tokenizer")
    with fs.open_output_stream(f"{fs_root}/meta.json") as f:
        f.write(json.dumps(meta, indent=1).encode())
    return PreparedData(**{k: meta[k] for k in PreparedData.__dataclass_fields__ if k != "cache_hit"}, cache_hit=True)


def _upload_tokenizer(tokenizer, fs, path: str) -> None:
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        pyarrow.fs.copy_files(tmp, path, pyarrow.fs.LocalFileSystem(), fs)


def _write_shards(cfg: DataConfig, documents, tokenizer_path: str, root: str, token_target: int) -> dict:
    """Run the ShardWriters over the documents; returns each split's [shard, blocks] in a fixed order.

    With a ``token_target``, the driver stops taking results once the training shards hold
    it (Ray Data then stops reading); results arrive in order, so the same shards are taken
    on every run."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    written = documents.map_batches(
        ShardWriter,
        fn_constructor_kwargs={
            "tokenizer_path": tokenizer_path,
            "root": root,
            "seq_len": cfg.seq_len,
            "validation_fraction": cfg.validation_fraction,
        },
        batch_size=SHARD_DOCUMENTS,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.available_resources().get("CPU", 1)))),
    )
    if cfg.source != "hub":
        token_target = 0  # a file or the built-in corpus is prepared whole (its fingerprint says so)
    shards: dict[str, list] = {TRAIN: [], VALIDATION: []}
    train_tokens = 0
    for row in written.iter_rows():  # per batch of documents: its train row, then its validation row
        if row["blocks"]:
            shards[str(row["split"])].append([str(row["shard"]), int(row["blocks"])])
        train_tokens += int(row["blocks"]) * cfg.seq_len if row["split"] == TRAIN else 0
        if token_target and train_tokens >= token_target and row["split"] == VALIDATION:
            break
    return shards


# --- reading on the workers ------------------------------------------------------------


class ShardSampler:
    """This worker's disjoint share of the training blocks, in a seeded order.

    Worker ``rank`` of ``world_size`` owns a contiguous ``1/world_size`` of the blocks and
    walks them in a permutation drawn from ``(seed, epoch)``. The position after ``n``
    samples is a pure function of ``n``, so resuming at an optimizer step continues at
    the exact sample where the run stopped, without replaying the data.
    """

    def __init__(self, num_blocks: int, *, rank: int, world_size: int, seed: int) -> None:
        per_rank = num_blocks // world_size
        if per_rank == 0:
            raise ValueError(f"data: {num_blocks} training blocks cannot be shared by {world_size} workers")
        self.start = rank * per_rank
        self.size = per_rank
        self.seed = seed

    def indices(self, first_sample: int, count: int) -> list[int]:
        """Global block indices of samples ``first_sample .. first_sample + count - 1``."""
        out = []
        for n in range(first_sample, first_sample + count):
            epoch, offset = divmod(n, self.size)
            out.append(self.start + int(self._permutation(epoch)[offset]))
        return out

    def _permutation(self, epoch: int) -> torch.Tensor:
        if getattr(self, "_epoch", None) != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.size, generator=generator)
            self._epoch = epoch
        return self._perm


class PackedBlocks:
    """One split's blocks across its shards, as one indexable sequence of ``seq_len`` rows.

    Shards are memory-mapped where the storage is a filesystem, and downloaded into
    ``cache_dir`` first, each on first use, from object storage: a node fetches only the
    shards its workers read."""

    def __init__(self, root: str, shards: list, cache_dir: str | None = None) -> None:
        self.root, self.shards, self.cache_dir = root, shards, cache_dir
        self.offsets = np.cumsum([0] + [rows for _, rows in shards]).tolist()
        self._open: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index) -> torch.Tensor:
        """Rows by index, list of indices or slice, as an int64 tensor."""
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        if isinstance(index, int):
            return self[[index]][0]
        rows = [self._row(int(i)) for i in index]
        return torch.from_numpy(np.stack(rows).astype(np.int64)) if rows else torch.zeros(0, dtype=torch.int64)

    def _row(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} of {len(self)}")
        shard = bisect.bisect_right(self.offsets, i) - 1
        return self._shard(shard)[i - self.offsets[shard]]

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._open:
            self._open[k] = np.load(self._local(f"{self.root}/{self.shards[k][0]}"), mmap_mode="r")
        return self._open[k]

    def _local(self, path: str) -> str:
        if "://" not in path or path.startswith("file://"):
            return path.removeprefix("file://")
        import pyarrow.fs

        local = Path(self.cache_dir or tempfile.gettempdir()).expanduser() / "shards" / path.split("://", 1)[1]
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            fs, remote = storage_filesystem(path)
            tmp = local.with_name(f".tmp-{os.getpid()}-{local.name}")
            pyarrow.fs.copy_files(remote, str(tmp), fs, pyarrow.fs.LocalFileSystem())
            os.replace(tmp, local)
        return str(local)


def load_blocks(path: str, cache_dir: str | None = None) -> dict[str, PackedBlocks]:
    """The packed splits of a prepared folder (local, shared or object storage)."""
    fs, root = storage_filesystem(path)
    with fs.open_input_stream(f"{root}/meta.json") as f:
        meta = json.loads(f.read())
    if meta.get("format_version") != FORMAT_VERSION:  # a folder copied from an older version
        raise ValueError(
            f"{redact(path)} holds prepared data of format {meta.get('format_version', 'before 3')}, "
            f"this version reads {FORMAT_VERSION}: prepare it again (a new fingerprint, so a new folder)"
        )
    return {split: PackedBlocks(f"{path}/{split}", meta["shards"][split], cache_dir) for split in (TRAIN, VALIDATION)}


def local_data(data: PreparedData, cache_dir: str) -> PreparedData:
    """``data`` as this node reads it: the tokenizer folder local (downloaded once from object
    storage); the shards stay where they are, for `load_blocks` to fetch as they are read."""
    from dataclasses import replace

    return replace(data, tokenizer_path=_local_tokenizer(data.tokenizer_path))
