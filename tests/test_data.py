"""Data: tokenizer, corpora, packing with cu_seqlens, and the retrieval generators' answers and spans."""

import json

import numpy as np
import pytest
import torch

from flashmoba.data import (
    TASKS,
    ByteTokenizer,
    TokenCorpus,
    batch_rng,
    load_corpus,
    make_sample,
    pack_rows,
    sample_batch,
)

tokenizer = ByteTokenizer()


def test_byte_tokenizer_round_trip():
    text = "MoBA: Σ blocks → top-k ✓\n"
    ids = tokenizer.encode(text, bos=True)
    assert ids[0] == tokenizer.bos_id and max(ids[1:]) < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_array(text).tolist() == ids[1:]


def test_pack_rows_starts_a_sequence_at_each_row_and_each_bos():
    bos = tokenizer.bos_id
    rows = np.array([[bos, 1, 2, bos, 3, 4], [5, 6, bos, 7, 8, 9]])
    batch = pack_rows(rows, bos)
    assert batch.input_ids.tolist() == [bos, 1, 2, bos, 3, 5, 6, bos, 7, 8]
    assert batch.targets.tolist() == [1, 2, bos, 3, 4, 6, bos, 7, 8, 9]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 7, 10] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 3


def test_batches_are_a_pure_function_of_their_coordinates():
    corpus = TokenCorpus([np.arange(5000, dtype=np.uint16) % 256], tokenizer.bos_id, "numbers")
    first = sample_batch(corpus, 3, 64, batch_rng(7, 1, 12))
    again = sample_batch(corpus, 3, 64, batch_rng(7, 1, 12))
    other = sample_batch(corpus, 3, 64, batch_rng(7, 1, 13))
    assert torch.equal(first.input_ids, again.input_ids) and not torch.equal(first.input_ids, other.input_ids)
    # Windows are contiguous slices of the corpus, targets shifted by one.
    rows = first.input_ids.view(3, 64)
    assert torch.equal(first.targets.view(3, 64)[:, :-1], rows[:, 1:])
    assert ((rows[:, 1:] - rows[:, :-1]) % 256 == 1).all()


def test_task_rows_in_the_training_mixture_are_whole_samples():
    corpus = TokenCorpus([np.zeros(10_000, dtype=np.uint16) + ord("a")], tokenizer.bos_id, "a")
    batch = sample_batch(corpus, 4, 600, batch_rng(0, 0, 0), task_fraction=1.0, tasks=("niah1",))
    rows = batch.input_ids.view(4, 600)
    assert (rows[:, 0] == tokenizer.bos_id).all()
    assert all("special magic numbers" in tokenizer.decode(row.tolist()) for row in rows)


def test_answer_loss_weight_marks_exactly_the_answer_targets():
    corpus = TokenCorpus([np.zeros(10_000, dtype=np.uint16) + ord("a")], tokenizer.bos_id, "a")
    plain = sample_batch(corpus, 6, 600, batch_rng(3, 0, 0), task_fraction=0.5)
    assert plain.loss_weights is None
    batch = sample_batch(corpus, 6, 600, batch_rng(3, 0, 0), task_fraction=0.5, answer_loss_weight=7.0)
    assert torch.equal(batch.input_ids, plain.input_ids)  # the weight never changes the batch itself
    weights, targets = batch.loss_weights.view(6, 600), batch.targets.view(6, 600)
    task_rows = [r for r in range(6) if targets[r, -1] == ord(".")]  # samples end with the answer's "."
    assert 0 < len(task_rows) < 6
    for row in range(6):
        weighted = torch.nonzero(weights[row] == 7.0).flatten().tolist()
        if row not in task_rows:
            assert weighted == [] and (weights[row] == 1).all()
            continue
        text = tokenizer.decode(targets[row, weighted].tolist())
        prompt = tokenizer.decode(batch.input_ids.view(6, 600)[row, : weighted[0] + 1].tolist())
        value = text.strip()
        # The weighted targets are " VALUE", right before the final ".", and VALUE stands in the haystack.
        assert text == " " + value and weighted[-1] == 600 - 2 and value and value in prompt
        assert (weights[row][[i for i in range(600) if i not in weighted]] == 1).all()
    with pytest.raises(ValueError, match="answer_loss_weight"):
        sample_batch(corpus, 2, 600, batch_rng(0, 0, 0), answer_loss_weight=0.0)


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


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length,distractors", [(700, 0), (3000, 0), (3000, 3)])
def test_retrieval_samples_put_the_answer_where_they_say(task, length, distractors):
    rng = np.random.default_rng(123)
    for depth in (0.0, 0.37, 1.0):
        sample = make_sample(task, length, rng, depth=depth, distractors=distractors)
        tokens = sample.tokens
        assert len(tokens) == length and tokens[0] == tokenizer.bos_id
        value = tokenizer.decode(tokens[slice(*sample.value_span)])
        assert value == sample.answer
        assert tokenizer.decode(tokens[slice(*sample.answer_span)]) == " " + sample.answer
        assert sample.answer_span[0] == sample.prompt_length
        assert tokenizer.decode(tokens[sample.prompt_length :]) == " " + sample.answer + "."
        needle = tokenizer.decode(tokens[slice(*sample.needle_span)])
        assert sample.answer in needle and (task == "passkey" or sample.key in needle)
        assert sample.needle_span[0] <= sample.value_span[0] < sample.value_span[1] <= sample.needle_span[1]
        prompt = tokenizer.decode(tokens[: sample.prompt_length])
        assert prompt.count(sample.answer) == (2 if task == "passkey" else 1)  # only in the needle
        assert len(sample.distractor_spans) == distractors
        for span in sample.distractor_spans:
            distractor = tokenizer.decode(tokens[slice(*span)])
            assert sample.key not in distractor and sample.answer not in distractor
        if task != "passkey":
            assert sample.key in prompt[prompt.rindex("\n") :]  # the question asks for this key
        if task == "niah3":
            assert len(sample.answer) == 36 and sample.answer.count("-") == 4
        if distractors == 0:  # the needle sits at the sentence boundary nearest the requested depth
            haystack_start = prompt.index("\n") + 1
            haystack_end = prompt.rindex("\n")
            needle_length = sample.needle_span[1] - sample.needle_span[0]
            before = sample.needle_span[0] - haystack_start
            longest_sentence = 25 if task in ("niah1", "passkey") else 400
            assert abs(before - depth * (haystack_end - haystack_start - needle_length)) <= longest_sentence


def test_haystacks_differ_by_task():
    rng = np.random.default_rng(0)
    noise = tokenizer.decode(make_sample("niah1", 2000, rng).tokens)
    natural = tokenizer.decode(make_sample("niah2", 2000, rng).tokens)
    assert noise.count("The grass is green.") > 5
    assert "The grass is green." not in natural


def test_bad_generator_inputs_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="task"):
        make_sample("niah9", 1000, rng)
    with pytest.raises(ValueError, match="too short"):
        make_sample("niah1", 50, rng)
    with pytest.raises(ValueError, match="depth"):
        make_sample("niah1", 1000, rng, depth=1.5)
