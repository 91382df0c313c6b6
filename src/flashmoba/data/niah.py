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

from flashmoba._checks import check_choice, check_int, check_real
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


@dataclass(frozen=True)
class _Template:
    """The texts of one task. ``{kind}`` names what is hidden; ``{key}`` and ``{value}`` are the needle's."""

    kind: str
    intro: str
    needle: tuple[str, str, str]  # the text before the value, the value, the text after it
    question: str
    answer_prefix: str


@dataclass(frozen=True)
class _Needle:
    tokens: np.ndarray  # int64: the whole needle sentence and the space after it
    value_offset: int  # where the value starts inside ``tokens``
    value_length: int


def _encode(tokenizer: ByteTokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def _template(task: str) -> _Template:
    if task == "passkey":
        return _Template("", PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX)
    kind = "uuids" if task == "niah3" else "numbers"
    return _Template(kind, NIAH_INTRO, NIAH_NEEDLE, NIAH_QUESTION, NIAH_ANSWER_PREFIX)


def _haystack_sentences(task: str) -> tuple[str, ...]:
    return _noise_sentences() if task in ("niah1", "passkey") else _natural_sentences()


def _draw_keys_and_values(task: str, count: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """``count`` distinct keys, the query's first, then one value per key."""
    keys = [_random_key(rng)]
    while len(keys) < count:
        candidate = _random_key(rng)
        if candidate not in keys:
            keys.append(candidate)
    return keys, [_random_value(task, rng) for _ in keys]


def _encode_needle(template: _Template, key: str, value: str, tokenizer: ByteTokenizer) -> _Needle:
    before, _, after = (part.format(kind=template.kind, key=key, value=value) for part in template.needle)
    before_tokens, value_tokens = _encode(tokenizer, before), _encode(tokenizer, value)
    tokens = np.concatenate([before_tokens, value_tokens, _encode(tokenizer, after + " ")])
    return _Needle(tokens, len(before_tokens), len(value_tokens))


def _haystack(
    sentences: tuple[str, ...], budget: int, rng: np.random.Generator, tokenizer: ByteTokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive sentences from a random first one, cut to exactly ``budget`` tokens, and the offsets
    where a needle may go: the start and the end of every whole sentence."""
    pieces, boundaries, filled = [], [0], 0
    index = int(rng.integers(len(sentences)))
    while filled < budget:
        sentence = _encode(tokenizer, sentences[index % len(sentences)] + " ")
        pieces.append(sentence[: budget - filled])
        filled += len(pieces[-1])
        if len(sentence) == len(pieces[-1]):  # needles go only after whole sentences
            boundaries.append(filled)
        index += 1
    haystack = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return haystack, np.asarray(boundaries)


def _needle_offsets(
    boundaries: np.ndarray, budget: int, depth: float, distractors: int, rng: np.random.Generator
) -> list[int]:
    """The haystack offset of each needle: the query needle at the boundary nearest ``depth``, each
    distractor at another boundary drawn without repetition (at the query's once none is left)."""
    query_slot = int(np.argmin(np.abs(boundaries - depth * budget)))
    slots = [query_slot]
    others = [i for i in range(len(boundaries)) if i != query_slot]
    for _ in range(distractors):
        slots.append(others.pop(int(rng.integers(len(others)))) if others else query_slot)
    return [int(boundaries[slot]) for slot in slots]


def _insert_needles(
    head: np.ndarray, haystack: np.ndarray, needles: list[_Needle], offsets: list[int]
) -> tuple[list[np.ndarray], list[tuple[tuple[int, int], tuple[int, int]]]]:
    """``head`` then the haystack with ``needles[n]`` inserted at ``offsets[n]`` (needles at the same
    offset in index order), as parts to concatenate; and per needle its (sentence, value) token spans."""
    parts, spans, cursor, position = [head], {}, 0, len(head)
    for n in sorted(range(len(needles)), key=lambda n: (offsets[n], n)):
        at, needle = offsets[n], needles[n]
        parts.append(haystack[cursor:at])
        position += at - cursor
        cursor = at
        parts.append(needle.tokens)
        value_start = position + needle.value_offset
        spans[n] = (position, position + len(needle.tokens)), (value_start, value_start + needle.value_length)
        position += len(needle.tokens)
    parts.append(haystack[cursor:])
    return parts, [spans[n] for n in range(len(needles))]


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

    ``depth`` in [0, 1] places the needle in the haystack (random if None); ``rng`` draws everything else,
    in this order: the keys, the values, the haystack's first sentence, the depth, the distractors' places.
    """
    check_choice("task", task, TASKS)
    length = check_int("length", length)
    if depth is not None:
        depth = check_real("depth", depth, minimum=0.0, maximum=1.0)
    distractors = check_int("distractors", distractors, minimum=0)
    tokenizer = tokenizer or ByteTokenizer()
    template = _template(task)
    sentences = _haystack_sentences(task)

    keys, values = _draw_keys_and_values(task, 1 + distractors, rng)
    needles = [_encode_needle(template, key, value, tokenizer) for key, value in zip(keys, values)]
    head = np.concatenate(
        [[tokenizer.bos_id], _encode(tokenizer, template.intro.format(kind=template.kind))]
    ).astype(np.int64)
    tail = np.concatenate(
        [
            _encode(tokenizer, template.question.format(kind=template.kind, key=keys[0])),
            _encode(tokenizer, template.answer_prefix.format(kind=template.kind, key=keys[0])),
        ]
    )
    scored = _encode(tokenizer, " " + values[0])
    answer = np.concatenate([scored, _encode(tokenizer, ".")])
    budget = length - len(head) - len(tail) - len(answer) - sum(len(needle.tokens) for needle in needles)
    if budget < 0:
        raise ValueError(
            f"length {length} is too short for task {task!r}: it needs at least {length - budget} tokens"
        )

    haystack, boundaries = _haystack(sentences, budget, rng, tokenizer)
    depth = float(rng.uniform()) if depth is None else depth
    offsets = _needle_offsets(boundaries, budget, depth, distractors, rng)
    parts, spans = _insert_needles(head, haystack, needles, offsets)
    all_tokens = np.concatenate(parts + [tail, answer]).astype(np.int64)
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
        distractor_spans=[needle_span for needle_span, _ in spans[1:]],
    )
