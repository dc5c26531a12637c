import os
from pathlib import Path

import pytest

import orchestrator.data as data_module
from orchestrator.config import DataConfig
from orchestrator.data import ShardSampler, builtin_documents, load_blocks, prepare_data


def _cfg(tmp_path, shakespeare, **kw):
    return DataConfig(
        **{"source": "file", "paths": [str(shakespeare)], "seq_len": 64, "cache_dir": str(tmp_path), **kw}
    )


def test_second_preparation_is_a_cache_hit_without_tokenizing(tmp_path, shakespeare, monkeypatch):
    first = prepare_data(_cfg(tmp_path, shakespeare))
    assert not first.cache_hit and first.train_blocks > 1000 and first.validation_blocks > 10
    mtimes = {p: os.stat(p).st_mtime_ns for p in (tmp_path).rglob("*.arrow")}

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a cache hit must not read or tokenize the documents")

    monkeypatch.setattr(data_module, "load_documents", no_tokenizing)
    second = prepare_data(_cfg(tmp_path, shakespeare))
    assert second.cache_hit and second.path == first.path
    assert {p: os.stat(p).st_mtime_ns for p in (tmp_path).rglob("*.arrow")} == mtimes


def test_seq_len_and_tokenizer_changes_miss(tmp_path, shakespeare):
    base = prepare_data(_cfg(tmp_path, shakespeare))
    other_len = prepare_data(_cfg(tmp_path, shakespeare, seq_len=32))
    assert not other_len.cache_hit and other_len.fingerprint != base.fingerprint
    assert len(load_blocks(other_len.path)["train"][0]["input_ids"]) == 32
    other_vocab = prepare_data(_cfg(tmp_path, shakespeare, vocab_size=2048))
    assert not other_vocab.cache_hit and other_vocab.vocab_size == 2048
    # A saved tokenizer folder is a different tokenizer too (the hub/local path route).
    other_tok = prepare_data(_cfg(tmp_path, shakespeare, tokenizer=base.tokenizer_path))
    assert not other_tok.cache_hit and other_tok.fingerprint != base.fingerprint
    assert other_tok.train_blocks == base.train_blocks  # same tokens, same blocks


def test_blocks_are_packed_token_ids(tmp_path, shakespeare):
    prepared = prepare_data(_cfg(tmp_path, shakespeare))
    blocks = load_blocks(prepared.path)
    assert blocks["train"][0]["input_ids"].shape == (64,)
    assert int(blocks["train"][:]["input_ids"].max()) < prepared.vocab_size


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


def test_shared_storage_gets_one_complete_copy(tmp_path, shakespeare):
    prepared = prepare_data(_cfg(tmp_path / "cache", shakespeare))
    shared = data_module.share_data(prepared, str(tmp_path / "storage"))
    assert shared.path.startswith(str(tmp_path / "storage" / "data")) and shared.fingerprint == prepared.fingerprint
    assert len(load_blocks(shared.path)["train"]) == prepared.train_blocks
    assert (Path(shared.tokenizer_path) / "tokenizer.json").is_file()
    # A copy without its meta.json (an interrupted upload) is redone; a complete one is kept.
    meta = Path(shared.path).parent / "meta.json"
    meta.unlink()
    (Path(shared.path) / "train" / "dataset_info.json").unlink()
    data_module.share_data(prepared, str(tmp_path / "storage"))
    assert meta.is_file() and (Path(shared.path) / "train" / "dataset_info.json").is_file()
    mtime = meta.stat().st_mtime_ns
    data_module.share_data(prepared, str(tmp_path / "storage"))
    assert meta.stat().st_mtime_ns == mtime


def test_object_storage_data_is_downloaded_once_per_node(tmp_path, shakespeare, monkeypatch):
    import pyarrow.fs

    bucket = pyarrow.fs._MockFileSystem()  # pyarrow's in-memory filesystem, standing in for s3://
    monkeypatch.setattr(
        data_module,
        "storage_filesystem",
        lambda uri: (bucket, uri.split("://", 1)[1]) if "://" in uri else (pyarrow.fs.LocalFileSystem(), uri),
    )
    prepared = prepare_data(_cfg(tmp_path / "cache", shakespeare))
    shared = data_module.share_data(prepared, "s3://bucket/sweeps")
    assert shared.path == f"s3://bucket/sweeps/data/blocks-{prepared.fingerprint}/blocks"
    node_cache = tmp_path / "node-cache"
    local = data_module.local_data(shared, str(node_cache))
    assert Path(local.path).is_relative_to(node_cache)
    assert load_blocks(local.path)["train"][:4]["input_ids"].equal(load_blocks(prepared.path)["train"][:4]["input_ids"])
    bucket.delete_dir_contents("bucket")  # a second worker on the node reads its copy, not the bucket
    assert data_module.local_data(shared, str(node_cache)).path == local.path
