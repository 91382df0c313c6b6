"""data/corpus.py refuses bad data while loading, with an error that names the file (and line, id, field)."""

import json
import sys
import types

import numpy as np
import pytest

from flashmoba.data import ByteTokenizer, corpus, load_corpus

tokenizer = ByteTokenizer()


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def text_documents(count=10, repeat=20):
    return [json.dumps({"text": f"record {i} " * repeat}) for i in range(count)]


# ----------------------------------------------------------------------------------------------------
# Token shards: ids, sizes, dtypes
# ----------------------------------------------------------------------------------------------------


def test_bin_shard_with_an_id_beyond_the_vocabulary_names_the_file_id_and_index(tmp_path):
    path = tmp_path / "shard.bin"
    np.array([256, 1, 2, 300, 5, 400], dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=r"shard\.bin: token 3 is id 300, outside the vocabulary \[0, 257\)"):
        load_corpus(str(path), vocab_size=257)


def test_npy_shard_with_a_negative_id_is_refused(tmp_path):
    path = tmp_path / "shard.npy"
    np.save(path, np.array([0, 1, 2, -1, 4, 5], dtype=np.int32))
    with pytest.raises(ValueError, match=r"shard\.npy: token 3 is id -1"):
        load_corpus(str(path), vocab_size=1000, bos_id=0)


def test_id_check_runs_in_chunks_and_reports_the_index_in_the_whole_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "ID_CHECK_CHUNK", 4)
    path = tmp_path / "shard.npy"
    tokens = np.arange(20, dtype=np.int64)
    tokens[9], tokens[15] = 99, 77
    np.save(path, tokens)
    with pytest.raises(ValueError, match=r"shard\.npy: token 9 is id 99"):
        load_corpus(str(path), vocab_size=50, bos_id=0)


def test_ids_are_not_checked_without_a_vocab_size_or_when_the_dtype_cannot_exceed_it(tmp_path):
    path = tmp_path / "shard.bin"
    np.array([0, 60000, 1, 2] * 10, dtype=np.uint16).tofile(path)
    train, val = load_corpus(str(path), bos_id=0)  # no vocab_size: loads as before
    assert train.num_tokens + val.num_tokens == 40
    train, val = load_corpus(str(path), bos_id=0, vocab_size=1 << 16)  # uint16 ids all fit
    assert train.num_tokens + val.num_tokens == 40


def test_good_shards_load_with_a_vocab_size(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "shard0.bin")
    np.save(tmp_path / "shard1.npy", np.arange(500, dtype=np.int32))
    train, val = load_corpus(str(tmp_path / "shard*"), val_fraction=0.1, bos_id=0, vocab_size=1000)
    assert [len(s) for s in train.shards] == [900, 450] and [len(s) for s in val.shards] == [100, 50]
    assert isinstance(train.shards[0], np.memmap) and isinstance(train.shards[1], np.memmap)


def test_odd_sized_bin_shard_is_refused(tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03\x00\x04")
    with pytest.raises(ValueError, match=r"shard\.bin is odd-sized: 7 bytes is not a multiple of 2"):
        load_corpus(str(path))


def test_truncated_npy_shard_is_refused_as_odd_sized(tmp_path):
    path = tmp_path / "shard.npy"
    np.save(path, np.arange(100, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"shard\.npy is odd-sized: its header promises 100 uint16 tokens"):
        load_corpus(str(path))


def test_npy_shard_with_trailing_bytes_is_refused_as_odd_sized(tmp_path):
    path = tmp_path / "shard.npy"
    np.save(path, np.arange(100, dtype=np.uint16))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match=r"shard\.npy is odd-sized"):
        load_corpus(str(path))


def test_float_npy_shard_is_refused(tmp_path):
    path = tmp_path / "shard.npy"
    np.save(path, np.arange(100, dtype=np.float32))
    with pytest.raises(ValueError, match=r"shard\.npy has a float dtype float32"):
        load_corpus(str(path))


def test_object_npy_shard_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "shard.npy"
    np.save(path, np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"shard\.npy has a non-integer dtype object"):
        load_corpus(str(path))


def test_two_dimensional_npy_shard_is_refused(tmp_path):
    path = tmp_path / "shard.npy"
    np.save(path, np.zeros((4, 5), dtype=np.uint16))
    with pytest.raises(ValueError, match=r"shard\.npy must be 1-D, got shape \(4, 5\)"):
        load_corpus(str(path))


def test_npy_shard_that_is_not_npy_is_refused(tmp_path):
    path = tmp_path / "shard.npy"
    path.write_bytes(b"not a numpy file at all")
    with pytest.raises(ValueError, match=r"shard\.npy is not a valid \.npy file"):
        load_corpus(str(path))


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_empty_token_shard_is_refused(tmp_path, suffix):
    path = tmp_path / f"shard{suffix}"
    if suffix == ".npy":
        np.save(path, np.zeros(0, dtype=np.uint16))
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"shard\{suffix} is empty \(0 tokens\)"):
        load_corpus(str(path))


def test_bos_id_outside_the_vocabulary_is_refused(tmp_path):
    path = tmp_path / "shard.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=r"bos_id 100 is outside the vocabulary \[0, 100\)"):
        load_corpus(str(path), bos_id=100, vocab_size=100)


# ----------------------------------------------------------------------------------------------------
# jsonl
# ----------------------------------------------------------------------------------------------------


def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", text_documents(2) + ["", '{"text": "unterminated'])
    with pytest.raises(ValueError, match=r"docs\.jsonl:4: line is not valid JSON"):
        load_corpus(path)


def test_jsonl_line_without_text_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", text_documents(1) + [json.dumps({"body": "x"})])
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: a jsonl record needs a 'text' field.*'body'"):
        load_corpus(path)


def test_jsonl_text_field_that_is_not_a_string_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", text_documents(2) + [json.dumps({"text": 42})])
    with pytest.raises(ValueError, match=r"docs\.jsonl:3: field 'text' must be a string, got int 42"):
        load_corpus(path)


def test_jsonl_line_that_is_not_an_object_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ['["a", "list"]'])
    with pytest.raises(ValueError, match=r"docs\.jsonl:1: a jsonl record must be a JSON object.*list"):
        load_corpus(path)


def test_jsonl_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: line is not valid UTF-8"):
        load_corpus(str(path))


def test_good_jsonl_with_blank_lines_and_crlf_loads_as_before(tmp_path):
    path = tmp_path / "docs.jsonl"
    records = text_documents(30)
    path.write_bytes(("\r\n".join(records[:10]) + "\r\n\r\n" + "\n".join(records[10:]) + "\n").encode())
    train, val = load_corpus(str(path), val_fraction=0.2)
    # The documents and their names (0-based line numbers, which decide the split) are unchanged.
    lines = path.read_text(encoding="utf-8").splitlines()
    documents = [(f"{path}:{i}", json.loads(line)["text"]) for i, line in enumerate(lines) if line.strip()]
    expected_train, expected_val = corpus._tokenize_documents(documents, tokenizer, 0.2, str(path))
    np.testing.assert_array_equal(train.shards[0], expected_train.shards[0])
    np.testing.assert_array_equal(val.shards[0], expected_val.shards[0])
    assert len(documents) == 30


def test_hf_record_without_text_names_the_record(monkeypatch):
    records = [{"text": "streamed " * 10}, {"content": "no text here"}]
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split, streaming: iter(records))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(ValueError, match=r"hf:someone/corpus: record 1 needs a string 'text' field"):
        load_corpus("hf:someone/corpus")


# ----------------------------------------------------------------------------------------------------
# Empty or too short corpora
# ----------------------------------------------------------------------------------------------------


def test_glob_that_matches_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"corpus pattern .*\*\.bin' matches no files"):
        load_corpus(str(tmp_path / "*.bin"))


def test_glob_that_matches_no_corpus_files_is_refused(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"matches no .* files \(it matches table\.csv\)"):
        load_corpus(str(tmp_path / "*"))


def test_directory_without_corpus_files_is_refused(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"corpus directory .* holds no"):
        load_corpus(str(tmp_path))


def test_file_of_an_unknown_kind_is_refused(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"table\.csv' has suffix '\.csv'"):
        load_corpus(str(path))


def test_jsonl_of_blank_lines_is_an_empty_corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"docs\.jsonl' is empty: it has no documents"):
        load_corpus(str(path))


def test_text_files_without_text_are_an_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(ValueError, match=r"is empty: its 2 document\(s\) have no text"):
        load_corpus(str(tmp_path))


def test_text_corpus_too_short_for_one_row_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", text_documents(10, repeat=2))
    load_corpus(path, seq_len=8)  # long enough
    with pytest.raises(ValueError, match=r"too short to cut one row of seq_len \+ 1 = 4097 tokens.*training"):
        load_corpus(path, seq_len=4096)


def test_shard_validation_split_too_short_for_one_row_is_refused(tmp_path):
    path = tmp_path / "shard.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    load_corpus(str(path), bos_id=0, seq_len=49)  # the validation tail holds 50 tokens: one row
    with pytest.raises(ValueError, match=r"shard\.bin/val' is too short .* validation split has 50 tokens"):
        load_corpus(str(path), bos_id=0, seq_len=50)


def test_text_corpus_needs_the_byte_tokenizers_vocabulary(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", text_documents(3))
    with pytest.raises(ValueError, match=r"byte tokenizer .* needs vocab_size >= 257, got 100"):
        load_corpus(path, vocab_size=100)
    load_corpus(path, vocab_size=257)


# ----------------------------------------------------------------------------------------------------
# Argument types
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spec=None), "corpus spec must be a str"),
        (dict(vocab_size="257"), "vocab_size must be an int"),
        (dict(seq_len=True), "seq_len must be an int"),
        (dict(bos_id=1.0), "bos_id must be an int"),
        (dict(max_bytes=1e6), "max_bytes must be an int"),
    ],
)
def test_wrong_argument_types_are_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        load_corpus(**{"spec": "python", **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spec=""), "non-empty"),
        (dict(vocab_size=0), "vocab_size must be >= 1"),
        (dict(seq_len=0), "seq_len must be >= 1"),
        (dict(bos_id=-1), "bos_id must be >= 0"),
    ],
)
def test_bad_argument_values_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_corpus(**{"spec": "python", **kwargs})
