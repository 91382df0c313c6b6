"""data/corpus.py: corpora from text, jsonl, token shards, a streamed Hugging Face dataset and Python's
own text."""

import json

import numpy as np
import pytest

from flashmoba.data import ByteTokenizer, load_corpus

tokenizer = ByteTokenizer()


def test_load_corpus_from_text_jsonl_and_token_shards(tmp_path):
    (tmp_path / "a.txt").write_text("first document " * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 20}) for i in range(40)))
    train, val = load_corpus(str(tmp_path / "b.jsonl"), val_fraction=0.2)
    assert train.num_tokens > val.num_tokens > 0
    assert train.shards[0][0] == tokenizer.bos_id
    assert (train.shards[0] == tokenizer.bos_id).sum() + (val.shards[0] == tokenizer.bos_id).sum() == 40
    train, val = load_corpus(str(tmp_path / "a.txt"))  # one document: the tail is held out
    assert train.num_tokens + val.num_tokens == 1 + 15 * 50 + 1

    shard = np.arange(1000, dtype=np.uint16)
    shard.tofile(tmp_path / "shard0.bin")
    np.save(tmp_path / "shard1.npy", shard[:500])
    train, val = load_corpus(str(tmp_path / "shard*"), val_fraction=0.1, bos_id=0)
    assert [len(s) for s in train.shards] == [900, 450] and [len(s) for s in val.shards] == [100, 50]
    assert isinstance(train.shards[0], np.memmap)
    with pytest.raises(ValueError, match="corpus"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_hf_streaming_corpus_reads_records_up_to_max_bytes(monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return ({"text": f"streamed record {i} " * 10} for i in range(1000))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train, val = load_corpus("hf:someone/corpus:sample-10BT", max_bytes=20_000)
    assert calls == [("someone/corpus", "sample-10BT", "train", True)]
    documents = sum(int((s == tokenizer.bos_id).sum()) for s in train.shards + val.shards)
    assert 20_000 <= train.num_tokens + val.num_tokens < 21_000 + documents and documents < 1000


def test_default_python_corpus_is_offline_text():
    train, val = load_corpus("python")
    assert train.num_tokens > 1_000_000 and val.num_tokens > 10_000
    text = tokenizer.decode(train.shards[0][:20_000])
    assert "def " in text or "import " in text
