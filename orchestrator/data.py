"""Text to packed token blocks, as Arrow files on disk, prepared once and shared.

`prepare_data` reads documents (built-in corpus, local files or a hub dataset), holds
out a validation share of the documents, tokenizes with batched `map`, packs the tokens
into `seq_len` blocks and saves both splits with `save_to_disk`. The folder is named
by a fingerprint of everything that shapes its content, so a second call with the same
settings is a cache hit and any change (source, tokenizer, seq_len, split) a miss.

Workers never tokenize: each opens the Arrow files (memory-mapped) and reads its own
disjoint shard, in an order fixed by the seed, so a resumed run picks up at the exact
sample where it stopped.
"""

from __future__ import annotations

import ast
import dataclasses
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

import datasets
import torch

from orchestrator.config import DataConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the packing changes, so old caches miss
TRAIN, VALIDATION = "train", "validation"
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


def _file_identity(path: str) -> dict:
    stat = Path(path).expanduser().stat()
    return {"path": str(Path(path).expanduser().resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """The documents as a `datasets.Dataset` with one `text` column."""
    if cfg.source == "builtin":
        ds = datasets.Dataset.from_dict({"text": builtin_documents()})
    elif cfg.source == "file":
        paths = [str(Path(p).expanduser()) for p in cfg.paths]
        suffixes = {Path(p).suffix for p in paths}
        if len(suffixes) > 1:
            raise ValueError(f"data.paths: mix of file types {sorted(suffixes)}; use one type per config")
        suffix = suffixes.pop()
        if suffix == ".txt":  # a blank line separates documents
            ds = datasets.load_dataset("text", data_files=paths, sample_by="paragraph", split="train")
        else:
            builder = "parquet" if suffix == ".parquet" else "json"
            ds = datasets.load_dataset(builder, data_files=paths, split="train")
    else:
        ds = datasets.load_dataset(cfg.hub_path, cfg.hub_name or None, split=cfg.hub_split, streaming=cfg.streaming)
        if cfg.streaming:
            if not cfg.max_documents:
                raise ValueError("data.max_documents: must be set when data.streaming is true")
            rows = [row[cfg.text_column] for row in ds.take(cfg.max_documents)]
            ds = datasets.Dataset.from_dict({"text": rows})
    if cfg.text_column not in ds.column_names:
        raise ValueError(f"data.text_column: {cfg.text_column!r} is not a column of the data ({ds.column_names})")
    if cfg.text_column != "text":
        ds = ds.rename_column(cfg.text_column, "text")
    ds = ds.select_columns(["text"]).filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True)
    if cfg.max_documents and len(ds) > cfg.max_documents:
        ds = ds.select(range(cfg.max_documents))
    return ds


def _source_identity(cfg: DataConfig) -> dict:
    if cfg.source == "builtin":
        return {"source": "builtin", "python": sysconfig.get_python_version()}
    if cfg.source == "file":
        return {"source": "file", "files": [_file_identity(p) for p in cfg.paths]}
    return {"source": "hub", "path": cfg.hub_path, "name": cfg.hub_name, "split": cfg.hub_split}


# --- tokenizer -------------------------------------------------------------------------


def _tokenizer_identity(cfg: DataConfig) -> dict:
    if cfg.tokenizer == "bpe":  # trained on the corpus, so the source is part of it
        return {"tokenizer": "bpe", "vocab_size": cfg.vocab_size, **_source_identity(cfg)}
    return {"tokenizer": cfg.tokenizer}


def _fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_or_train_tokenizer(cfg: DataConfig, documents: datasets.Dataset | None, cache_dir: Path):
    """A hub/local tokenizer, or a byte-level BPE trained on ``documents`` and cached."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if cfg.tokenizer != "bpe":
        return AutoTokenizer.from_pretrained(cfg.tokenizer)
    path = cache_dir / "tokenizers" / f"bpe-{_fingerprint(_tokenizer_identity(cfg))}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    log.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", cfg.vocab_size, len(documents))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator((batch["text"] for batch in documents.iter(batch_size=1000)), trainer)
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

    path: str  # the DatasetDict folder (train / validation)
    tokenizer_path: str  # save_pretrained folder of the tokenizer
    fingerprint: str
    vocab_size: int
    seq_len: int
    train_blocks: int
    validation_blocks: int
    cache_hit: bool


def data_fingerprint(cfg: DataConfig) -> str:
    """The cache key: source, tokenizer, seq_len and the validation split."""
    return _fingerprint(
        {
            "version": FORMAT_VERSION,
            "source": _source_identity(cfg),
            "tokenizer": _tokenizer_identity(cfg),
            "seq_len": cfg.seq_len,
            "validation_fraction": cfg.validation_fraction,
            "max_documents": cfg.max_documents,
            "text_column": cfg.text_column,
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


def _pack(batch: dict, *, seq_len: int, eos_id: int) -> dict:
    stream: list[int] = []
    for ids in batch["input_ids"]:
        stream.extend(ids)
        stream.append(eos_id)
    usable = len(stream) // seq_len * seq_len
    return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}


def _tokenize_and_pack(part: datasets.Dataset, name: str, tokenizer, cfg: DataConfig, num_proc: int):
    """One split's documents as `seq_len`-token blocks, documents joined by the EOS token."""
    ids = part.map(
        lambda b: {"input_ids": tokenizer(b["text"], add_special_tokens=False)["input_ids"]},
        batched=True,
        remove_columns=["text"],
        # Forked tokenizer processes pay off only on large corpora. Prepare before
        # `ray.init`: a fork after it has left the driver's gRPC link to Ray hung.
        num_proc=num_proc if len(part) > 50_000 else None,
        desc=f"tokenizing {name}",
    )
    packed = ids.map(
        _pack,
        batched=True,
        batch_size=1000,
        fn_kwargs={"seq_len": cfg.seq_len, "eos_id": tokenizer.eos_token_id},
        desc=f"packing {name} into {cfg.seq_len}-token blocks",
    )
    if len(packed) == 0:
        raise ValueError(f"data: the {name} split holds fewer than data.seq_len={cfg.seq_len} tokens")
    return packed


def prepare_data(cfg: DataConfig, *, num_proc: int | None = None) -> PreparedData:
    """Tokenize and pack once; later calls with the same settings return the cache."""
    cache_dir = Path(cfg.cache_dir).expanduser()
    fingerprint = data_fingerprint(cfg)
    final = cache_dir / f"blocks-{fingerprint}"
    if (final / "meta.json").exists():
        meta = json.loads((final / "meta.json").read_text())
        log.info("data cache hit: %s", final)
        return PreparedData(**{**meta, "cache_hit": True})

    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("preparing data %s into %s", asdict(cfg), final)
    documents = load_documents(cfg)
    tokenizer = load_or_train_tokenizer(cfg, documents, cache_dir)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"data.tokenizer: {cfg.tokenizer!r} has no end-of-text token to separate documents")
    split = documents.train_test_split(test_size=cfg.validation_fraction, seed=0, shuffle=True)
    num_proc = num_proc or min(4, os.cpu_count() or 1)
    packed = {
        name: _tokenize_and_pack(part, name, tokenizer, cfg, num_proc)
        for name, part in ((TRAIN, split["train"]), (VALIDATION, split["test"]))
    }
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".tmp-"))
    datasets.DatasetDict(packed).save_to_disk(str(tmp / "blocks"))
    tokenizer.save_pretrained(tmp / "tokenizer")
    meta = {
        "path": str(final / "blocks"),
        "tokenizer_path": str(final / "tokenizer"),
        "fingerprint": fingerprint,
        "vocab_size": len(tokenizer),
        "seq_len": cfg.seq_len,
        "train_blocks": len(packed[TRAIN]),
        "validation_blocks": len(packed[VALIDATION]),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _publish(tmp, final)
    log.info("prepared %d train and %d validation blocks", meta["train_blocks"], meta["validation_blocks"])
    return PreparedData(**meta, cache_hit=False)


# --- shared storage --------------------------------------------------------------------


def storage_filesystem(uri: str):
    """The pyarrow filesystem and path of a local path or a URI (s3://, gs://, file://)."""
    import pyarrow.fs

    if "://" not in uri:  # a plain path (spaces and all): no URI parsing
        return pyarrow.fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pyarrow.fs.FileSystem.from_uri(uri)


def share_data(data: PreparedData, storage: str) -> PreparedData:
    """Copy the prepared folder to ``<storage>/data/`` once; the copy is what workers read.

    On a cluster the driver's cache is on one node's disk; the storage path is the one
    place every node can read (a shared filesystem or object storage). ``meta.json`` is
    copied last: it marks a complete copy, so an interrupted upload is redone."""
    import pyarrow.fs

    source = Path(data.path).parent
    target = f"{storage.rstrip('/')}/data/{source.name}"
    fs, root = storage_filesystem(target)
    if fs.get_file_info(f"{root}/meta.json").type == pyarrow.fs.FileType.NotFound:
        log.info("copying the prepared data to %s", target)
        local = pyarrow.fs.LocalFileSystem()
        for folder in sorted({str(p.parent.relative_to(source)) for p in source.rglob("*") if p.is_file()}):
            fs.create_dir(f"{root}/{folder}".rstrip("/."), recursive=True)  # a no-op on object storage
        for part in ("blocks", "tokenizer"):
            pyarrow.fs.copy_files(str(source / part), f"{root}/{part}", local, fs)
        pyarrow.fs.copy_files(str(source / "meta.json"), f"{root}/meta.json", local, fs)
    return dataclasses.replace(data, path=f"{target}/blocks", tokenizer_path=f"{target}/tokenizer")


def local_data(data: PreparedData, cache_dir: str) -> PreparedData:
    """``data`` readable from this node: as it is on a filesystem, else downloaded once
    into this node's ``cache_dir`` (object storage cannot be memory-mapped)."""
    if "://" not in data.path or data.path.startswith("file://"):
        return dataclasses.replace(
            data, path=data.path.removeprefix("file://"), tokenizer_path=data.tokenizer_path.removeprefix("file://")
        )
    import pyarrow.fs

    cache = Path(cache_dir).expanduser()
    final = cache / f"blocks-{data.fingerprint}-shared"
    if not (final / "meta.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
        fs, root = storage_filesystem(data.path.rsplit("/", 1)[0])
        pyarrow.fs.copy_files(root, str(tmp), fs, pyarrow.fs.LocalFileSystem())
        _publish(tmp, final)
    return dataclasses.replace(data, path=str(final / "blocks"), tokenizer_path=str(final / "tokenizer"))


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


def load_blocks(path: str) -> datasets.DatasetDict:
    """The packed splits, memory-mapped, as torch tensors."""
    return datasets.load_from_disk(path).with_format("torch")
