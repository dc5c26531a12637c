"""Preparation on Ray Data, real files and a real local Ray: packing, the split, the cache,
shards on shared and object storage, and the worker's sampler."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import orchestrator.data as data_module
from orchestrator.config import DataConfig
from orchestrator.data import (
    ShardSampler,
    builtin_documents,
    cached_data,
    is_validation,
    load_blocks,
    pack,
    prepare_data,
    token_dtype,
)

pytestmark = pytest.mark.usefixtures("ray_data")  # Ray Data prepares on a local Ray


def _cfg(tmp_path, shakespeare, **kw):
    return DataConfig(
        **{"source": "file", "paths": [str(shakespeare)], "seq_len": 64, "cache_dir": str(tmp_path), **kw}
    )


@pytest.fixture(scope="module")
def prepared(ray_data, shakespeare, tmp_path_factory):
    """(cache folder, the test corpus prepared into it once): the cache tests prepare more
    into the same folder, as a user's later sweeps would."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare_data(_cfg(cache, shakespeare))


def test_second_preparation_is_a_cache_hit_without_reading(prepared, shakespeare, monkeypatch):
    cache, first = prepared
    assert not first.cache_hit and first.train_blocks > 1000 and first.validation_blocks > 10
    mtimes = {p: os.stat(p).st_mtime_ns for p in cache.rglob("*.npy")}

    def no_reading(*args, **kwargs):
        raise AssertionError("a cache hit must not read or tokenize the documents")

    monkeypatch.setattr(data_module, "read_documents", no_reading)
    second = prepare_data(_cfg(cache, shakespeare))
    assert second.cache_hit and second.path == first.path
    assert {p: os.stat(p).st_mtime_ns for p in cache.rglob("*.npy")} == mtimes


def test_two_preparations_give_identical_shards(prepared, tmp_path, shakespeare):
    _, one = prepared
    two = prepare_data(_cfg(tmp_path / "two", shakespeare))
    assert not two.cache_hit
    for split in ("train", "validation"):
        assert load_blocks(one.path)[split][:].equal(load_blocks(two.path)[split][:])


def test_every_token_lands_in_one_block_and_no_document_in_both_splits(tmp_path):
    """Documents of distinct words: each token's block tells which document it came from."""
    words = [f"w{i}" for i in range(3000)]
    documents = [" ".join(words[i : i + 30]) for i in range(0, 3000, 30)]  # 100 documents, none shared
    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
    cfg = DataConfig(
        source="file",
        paths=[str(tmp_path / "*.jsonl.gz")],
        seq_len=16,
        vocab_size=3300,
        validation_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    prepared = prepare_data(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared.tokenizer_path)
    blocks = load_blocks(prepared.path)
    meta = json.loads((Path(prepared.path) / "meta.json").read_text())
    for split in ("train", "validation"):
        expected = [d for d in documents if is_validation(d, 0.2) == (split == "validation")]
        stream = [
            t for d in expected for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ]
        packed = blocks[split][:].flatten().tolist()
        shards = len(meta["shards"][split])
        # One shard per split here (100 documents < one batch): all but the last partial block.
        assert shards == 1 and packed == stream[: len(stream) // 16 * 16]
    texts = {s: tokenizer.decode(blocks[s][:].flatten().tolist()) for s in ("train", "validation")}
    for d in documents:
        assert not (d.split()[5] in texts["train"].split() and d.split()[5] in texts["validation"].split())


def test_seq_len_and_tokenizer_changes_miss(prepared, shakespeare):
    cache, base = prepared
    other_len = prepare_data(_cfg(cache, shakespeare, seq_len=32))
    assert not other_len.cache_hit and other_len.fingerprint != base.fingerprint
    assert load_blocks(other_len.path)["train"][0].shape == (32,)
    other_vocab = prepare_data(_cfg(cache, shakespeare, vocab_size=2048))
    assert not other_vocab.cache_hit and other_vocab.vocab_size == 2048
    # A saved tokenizer folder is a different tokenizer too (the hub/local path route).
    other_tok = prepare_data(_cfg(cache, shakespeare, tokenizer=base.tokenizer_path))
    assert not other_tok.cache_hit and other_tok.fingerprint != base.fingerprint
    assert other_tok.train_blocks == base.train_blocks  # same tokens, same blocks


def test_blocks_are_packed_token_ids(prepared):
    _, prepared = prepared
    blocks = load_blocks(prepared.path)
    assert blocks["train"][0].shape == (64,) and len(blocks["train"]) == prepared.train_blocks
    assert int(blocks["train"][:].max()) < prepared.vocab_size
    # On disk in the smallest type that holds the vocabulary, as meta.json says; read as int64.
    meta = json.loads((Path(prepared.path) / "meta.json").read_text())
    assert meta["token_dtype"] == "uint16" and meta["format_version"] == data_module.FORMAT_VERSION
    shard = np.load(next((Path(prepared.path) / "train").glob("*.npy")))
    assert shard.dtype == np.uint16 and blocks["train"][:].dtype == torch.int64


def test_token_ids_take_the_smallest_unsigned_type_that_holds_the_vocabulary():
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32 and token_dtype(50_257) == np.uint16
    blocks = pack([[1, 2, 65_534], [7]], seq_len=3, eos_id=65_535, dtype=token_dtype(65_536))
    assert blocks.dtype == np.uint16 and blocks.tolist() == [[1, 2, 65_534], [65_535, 7, 65_535]]
    assert pack([[100_000]], seq_len=2, eos_id=0).dtype == np.uint32  # no promotion to int64
    with pytest.raises(OverflowError):  # an id the type cannot hold is refused, never wrapped
        pack([[65_536]], seq_len=2, eos_id=0, dtype=np.dtype(np.uint16))


def test_data_of_an_older_format_is_prepared_again_not_misread(tmp_path, shakespeare, monkeypatch):
    monkeypatch.setattr(data_module, "FORMAT_VERSION", 2)
    old = prepare_data(_cfg(tmp_path, shakespeare))
    monkeypatch.undo()
    new = prepare_data(_cfg(tmp_path, shakespeare))
    assert not new.cache_hit and new.path != old.path  # the version is in the fingerprint
    with pytest.raises(ValueError, match="holds prepared data of format 2, this version reads 3"):
        load_blocks(old.path)  # and a copied old folder is refused, not read with the wrong type


def test_worker_shards_are_disjoint_and_resumable():
    world = 3
    samplers = [ShardSampler(1000, rank=r, world_size=world, seed=5) for r in range(world)]
    seen = [set(s.indices(0, 333)) for s in samplers]
    assert all(len(s) == 333 for s in seen), "one epoch visits each block of the shard once"
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen[a] & seen[b]
    # The position is a function of the sample count: resuming at n continues exactly.
    full = samplers[1].indices(0, 700)
    fresh = ShardSampler(1000, rank=1, world_size=world, seed=5)
    assert fresh.indices(0, 250) + fresh.indices(250, 450) == full
    with pytest.raises(ValueError, match="cannot be shared"):
        ShardSampler(2, rank=0, world_size=3, seed=0)


def test_builtin_corpus_is_real_prose_from_cpython():
    documents = builtin_documents()
    text = "\n".join(documents)
    assert len(text) > 1_000_000
    assert "assert" in text and "The " in text


def test_prepared_into_the_storage_where_every_node_reads_it(tmp_path, shakespeare):
    cfg = _cfg(tmp_path / "driver-cache", shakespeare)
    prepared = prepare_data(cfg, str(tmp_path / "storage"))
    assert prepared.path.startswith(str(tmp_path / "storage" / "data" / "blocks-"))
    assert (Path(prepared.tokenizer_path) / "tokenizer.json").is_file()
    assert cached_data(cfg, str(tmp_path / "storage")) == prepared.__class__(**{**prepared.__dict__, "cache_hit": True})
    assert cached_data(cfg) is None, "nothing went to the driver's cache but the tokenizer"


def test_object_storage_shards_are_downloaded_as_they_are_read(tmp_path, shakespeare, monkeypatch):
    import pyarrow.fs

    # One document per line: more than SHARD_DOCUMENTS documents, so several shards, on either corpus.
    lines = [line for line in shakespeare.read_text().splitlines() if line.strip()]
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n\n".join(lines))
    assert len(lines) > 2 * data_module.SHARD_DOCUMENTS
    prepared = prepare_data(_cfg(tmp_path / "cache", corpus, seq_len=8))
    meta = json.loads((Path(prepared.path) / "meta.json").read_text())
    bucket = pyarrow.fs._MockFileSystem()  # pyarrow's in-memory filesystem, standing in for s3://
    pyarrow.fs.copy_files(prepared.path, "bucket/data", pyarrow.fs.LocalFileSystem(), bucket)
    monkeypatch.setattr(
        data_module,
        "storage_filesystem",
        lambda uri: (bucket, uri.split("://", 1)[1]) if "://" in uri else (pyarrow.fs.LocalFileSystem(), uri),
    )
    node_cache = tmp_path / "node-cache"
    remote = load_blocks("s3://bucket/data", str(node_cache))["train"]
    local = load_blocks(prepared.path)["train"]
    assert len(meta["shards"]["train"]) >= 2, "the test needs a corpus of several shards"
    assert remote[[0, 1, 2]].equal(local[[0, 1, 2]])
    fetched = list(node_cache.rglob("*.npy"))
    assert len(fetched) == 1, "only the shard that holds rows 0-2 was downloaded"
    last = len(local) - 1
    assert remote[last].equal(local[last]) and len(list(node_cache.rglob("*.npy"))) == 2
    np.testing.assert_array_equal(np.load(fetched[0]), np.load(Path(prepared.path) / "train" / fetched[0].name))


def test_data_prepared_here_before_is_copied_to_the_storage_not_prepared_again(tmp_path, shakespeare, monkeypatch):
    cfg = _cfg(tmp_path / "cache", shakespeare)
    local = prepare_data(cfg)
    monkeypatch.setattr(data_module, "read_documents", lambda *a, **k: pytest.fail("prepared again"))
    shared = prepare_data(cfg, str(tmp_path / "storage"))
    assert shared.cache_hit and shared.path.startswith(str(tmp_path / "storage"))
    assert load_blocks(shared.path)["train"][:].equal(load_blocks(local.path)["train"][:])


def test_a_token_target_leaves_file_sources_whole(tmp_path, shakespeare):
    """The budget stops only a hub stream: a file source is prepared whole, both splits."""
    whole = prepare_data(_cfg(tmp_path / "a", shakespeare))
    targeted = prepare_data(_cfg(tmp_path / "b", shakespeare), token_target=64 * 10)
    assert targeted.train_blocks == whole.train_blocks and targeted.validation_blocks == whole.validation_blocks
