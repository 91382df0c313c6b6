"""Long-context retrieval tasks in the style of RULER's single-needle NIAH, and the passkey task.

Tasks (RULER's ``niah_single_1/2/3``, which the paper evaluates, plus the Landmark-Attention passkey):

- ``niah1``: needle "One of the special magic numbers for {key} is: {value}." with a 7-digit number,
  in a haystack of the repeated noise sentences "The grass is green. The sky is blue. ...";
- ``niah2``: the same needle in natural English text (RULER uses Paul Graham essays, which need a
  download; here the English help topics that ship with Python, ``pydoc_data``);
- ``niah3``: natural-text haystack, the value is a UUID;
- ``passkey``: "The pass key is {5 digits}. Remember it. ..." in the noise haystack.

Any task takes ``distractors=N``: N more needles of the same form with other keys and values, so that
retrieval must match the key and not only find a needle (RULER's multi-key variant).

A sample is exactly ``length`` tokens: ``[BOS] intro haystack-with-needle question answer-prefix``
followed by the answer ``" {value}."``. It records where the needle and its value sit (token spans), so
evaluation can score the answer and check the router against the needle's block.
"""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import dataclass, field

import numpy as np

from flashmoba.data.tokenizer import ByteTokenizer

TASKS = ("niah1", "niah2", "niah3", "passkey")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NIAH_INTRO = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)
NIAH_NEEDLE = ("One of the special magic {kind} for {key} is: ", "{value}", ".")
NIAH_QUESTION = "\nWhat are all the special magic {kind} for {key} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = " The special magic {kind} for {key} mentioned in the provided text are"

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_NEEDLE = ("The pass key is ", "{value}", ". Remember it. {value} is the pass key.")
PASSKEY_QUESTION = "\nWhat is the pass key?"
PASSKEY_ANSWER_PREFIX = " The pass key is"

# Keys are adjective-noun pairs, as RULER's (which draws them from the wonderwords lists).
ADJECTIVES = (
    "ancient brave calm clever curious damp eager elegant fancy fierce gentle gifted glossy grumpy happy "
    "hollow humble icy jolly juicy kind lively lucky massive misty modern nervous noisy odd orange polite "
    "proud quick quiet rapid rare rusty scarlet shiny silent silly sleepy smooth snowy sour spicy steady "
    "sticky stormy sunny swift tall tender tidy tiny vast violet wandering warm wild witty wooden young zesty"
).split()
NOUNS = (
    "anchor apple badge bakery balloon banjo basket beacon bicycle blanket bottle bridge bucket cabin "
    "camera candle canyon carpet castle cherry cloud comet compass cookie crayon crystal desert dolphin "
    "dragon drum engine falcon feather fiddle forest fountain galaxy garden giraffe glacier hammer harbor "
    "helmet island jacket kettle ladder lantern lemon magnet meadow mirror mountain needle orchard otter "
    "parrot pebble pencil piano planet pocket puzzle rabbit river rocket saddle shadow squirrel statue "
    "teapot thunder tiger trumpet tulip tunnel violin volcano wagon walrus window wizard"
).split()


@dataclass
class RetrievalSample:
    """One retrieval prompt with its answer. All spans are ``[start, end)`` indices into ``tokens``."""

    task: str
    tokens: np.ndarray  # int64 [length]: prompt then answer; tokens[0] is BOS
    prompt_length: int  # the answer starts at tokens[prompt_length]
    answer: str  # the value to retrieve
    answer_span: tuple[int, int]  # tokens of " {value}" right after the prompt: what is scored
    needle_span: tuple[int, int]  # the whole needle sentence in the haystack
    value_span: tuple[int, int]  # the value inside the needle
    key: str
    depth: float  # where the needle sits, as a fraction of the haystack
    distractor_spans: list[tuple[int, int]] = field(default_factory=list)  # needles with other keys


@functools.lru_cache(maxsize=1)
def _natural_sentences() -> tuple[str, ...]:
    from flashmoba.data.corpus import natural_text

    sentences = re.split(r"(?<=[.!?]) +", natural_text())
    return tuple(s for s in sentences if 20 <= len(s) <= 400)


def _noise_sentences() -> tuple[str, ...]:
    return tuple(re.split(r"(?<=[.!?]) +", NOISE))


def _random_key(rng: np.random.Generator) -> str:
    return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"


def _random_value(task: str, rng: np.random.Generator) -> str:
    if task == "niah3":
        return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "little"), version=4))
    digits = 5 if task == "passkey" else 7
    return str(rng.integers(10 ** (digits - 1), 10**digits))


def make_sample(
    task: str,
    length: int,
    rng: np.random.Generator,
    *,
    depth: float | None = None,
    distractors: int = 0,
    tokenizer: ByteTokenizer | None = None,
) -> RetrievalSample:
    """A retrieval sample of exactly ``length`` tokens (answer included) for ``task`` in ``TASKS``.

    ``depth`` in [0, 1] places the needle in the haystack (random if None); ``rng`` draws everything else.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if distractors < 0:
        raise ValueError(f"distractors must be >= 0, got {distractors}")
    tokenizer = tokenizer or ByteTokenizer()
    encode = lambda text: np.asarray(tokenizer.encode(text), dtype=np.int64)  # noqa: E731

    if task == "passkey":
        kind, intro, needle_parts, question, answer_prefix = (
            "",
            PASSKEY_INTRO,
            PASSKEY_NEEDLE,
            PASSKEY_QUESTION,
            PASSKEY_ANSWER_PREFIX,
        )
    else:
        kind = "uuids" if task == "niah3" else "numbers"
        intro, needle_parts, question, answer_prefix = (
            NIAH_INTRO,
            NIAH_NEEDLE,
            NIAH_QUESTION,
            NIAH_ANSWER_PREFIX,
        )
    sentences = _noise_sentences() if task in ("niah1", "passkey") else _natural_sentences()

    # The query needle, then distractors with distinct keys.
    keys = [_random_key(rng)]
    while len(keys) < 1 + distractors:
        candidate = _random_key(rng)
        if candidate not in keys:
            keys.append(candidate)
    values = [_random_value(task, rng) for _ in keys]
    needles = []  # (tokens, value offset, value length)
    for key, value in zip(keys, values):
        before, after = (
            part.format(kind=kind, key=key, value=value) for part in (needle_parts[0], needle_parts[2])
        )
        value_tokens = encode(value)
        tokens = np.concatenate([encode(before), value_tokens, encode(after + " ")])
        needles.append((tokens, len(encode(before)), len(value_tokens)))

    head = np.concatenate([[tokenizer.bos_id], encode(intro.format(kind=kind))]).astype(np.int64)
    tail = np.concatenate(
        [
            encode(question.format(kind=kind, key=keys[0])),
            encode(answer_prefix.format(kind=kind, key=keys[0])),
        ]
    )
    scored = encode(" " + values[0])
    answer = np.concatenate([scored, encode(".")])
    budget = length - len(head) - len(tail) - len(answer) - sum(len(n[0]) for n in needles)
    if budget < 0:
        raise ValueError(
            f"length {length} is too short for task {task!r}: it needs at least {length - budget} tokens"
        )

    # Haystack: consecutive sentences from a random starting sentence, cut to exactly `budget` tokens.
    pieces, boundaries, filled = [], [0], 0
    index = int(rng.integers(len(sentences)))
    while filled < budget:
        sentence = encode(sentences[index % len(sentences)] + " ")
        pieces.append(sentence[: budget - filled])
        filled += len(pieces[-1])
        if len(sentence) == len(pieces[-1]):  # needles go only after whole sentences
            boundaries.append(filled)
        index += 1
    haystack = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    # Needles go at sentence boundaries: the query needle nearest `depth`, distractors at other ones.
    depth = float(rng.uniform()) if depth is None else float(depth)
    boundaries = np.asarray(boundaries)
    query_slot = int(np.argmin(np.abs(boundaries - depth * budget)))
    slots = [query_slot]
    others = [i for i in range(len(boundaries)) if i != query_slot]
    for _ in range(distractors):
        slots.append(others.pop(int(rng.integers(len(others)))) if others else query_slot)
    order = sorted(range(len(needles)), key=lambda n: (boundaries[slots[n]], n))

    parts, spans, cursor, position = [head], {}, 0, len(head)
    for n in order:
        at = int(boundaries[slots[n]])
        parts.append(haystack[cursor:at])
        position += at - cursor
        cursor = at
        tokens, value_offset, value_length = needles[n]
        parts.append(tokens)
        spans[n] = (
            (position, position + len(tokens)),
            (position + value_offset, position + value_offset + value_length),
        )
        position += len(tokens)
    parts += [haystack[cursor:], tail, answer]
    all_tokens = np.concatenate(parts).astype(np.int64)
    prompt_length = length - len(answer)
    assert len(all_tokens) == length
    return RetrievalSample(
        task=task,
        tokens=all_tokens,
        prompt_length=prompt_length,
        answer=values[0],
        answer_span=(prompt_length, prompt_length + len(scored)),
        needle_span=spans[0][0],
        value_span=spans[0][1],
        key=keys[0],
        depth=depth,
        distractor_spans=[spans[n][0] for n in range(1, len(needles))],
    )
