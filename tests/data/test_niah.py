"""data/niah.py: the retrieval samples' answers and spans, their haystacks, and their argument errors."""

import numpy as np
import pytest

from flashmoba.data import TASKS, ByteTokenizer, make_sample

tokenizer = ByteTokenizer()


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
