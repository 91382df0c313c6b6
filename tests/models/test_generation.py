"""Cached generation of HybridLM against full recomputation (the model's forward over the whole sequence
at every step): greedy tokens equal token for token, and each cached step's logits equal the forward's
row, for MoBA and dense global layers, with and without the key convolution, on a sequence that crosses
several MoBA blocks and the sliding window."""

from __future__ import annotations

import pytest
import torch

from flashmoba.models import HybridLM, ModelConfig
from flashmoba.models.generation import (
    HybridCache,
    MoBALayerCache,
    SlidingWindowCache,
    StaticDecoder,
    StaticMoBALayerCache,
    generate,
    sample_next,
)

PROMPT, NEW = 5, 20  # 25 tokens: 7 MoBA blocks of 4 (top-2: sparse), 4 windows of 6
VOCAB = 40
VARIANTS = [("moba", 0), ("moba", 3), ("dense", 0), ("dense", 3)]


def tiny_model(global_attention: str, kconv_size: int, dtype=torch.float32, seed: int = 0) -> HybridLM:
    config = ModelConfig(
        vocab_size=VOCAB,
        num_layers=4,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,  # GQA
        head_dim=8,
        mlp_hidden_size=48,
        window_size=6,
        global_attention=global_attention,
        moba_block_size=4,
        moba_topk=2,
        kconv_size=kconv_size,
        backend="reference",
    )
    torch.manual_seed(seed)
    return HybridLM(config).to(dtype).eval()


def prompts(batch: int = 2, length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_by_recomputation(model, input_ids, max_new_tokens):
    sequence = input_ids
    for _ in range(max_new_tokens):
        logits, _ = model(sequence)
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence[:, input_ids.shape[1] :]


@pytest.mark.parametrize("global_attention, kconv_size", VARIANTS)
def test_greedy_generation_equals_full_recomputation(global_attention, kconv_size):
    model = tiny_model(global_attention, kconv_size, torch.float64)
    input_ids = prompts()
    generated = model.generate(input_ids, NEW)
    assert generated.shape == (2, NEW) and generated.dtype == torch.int64
    assert torch.equal(generated, greedy_by_recomputation(model, input_ids, NEW))


@pytest.mark.parametrize("global_attention, kconv_size", VARIANTS)
def test_cached_logits_equal_the_forward_s_rows_in_float32(global_attention, kconv_size):
    model = tiny_model(global_attention, kconv_size, torch.float32)
    sequence = prompts(length=PROMPT + NEW)
    with torch.no_grad():
        full, _ = model(sequence)
        cache = HybridCache(model, 2, PROMPT + NEW)
        rows = [model.forward_with_cache(sequence[:, :PROMPT], cache)]  # prefill: one chunk
        rows += [model.forward_with_cache(sequence[:, i : i + 1], cache) for i in range(PROMPT, PROMPT + NEW)]
    torch.testing.assert_close(torch.cat(rows, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == PROMPT + NEW
    kinds = [type(layer) for layer in cache]
    assert kinds[0] is SlidingWindowCache and len(cache[0].k[0]) == 5  # window - 1 keys kept
    if global_attention == "moba":
        assert kinds[1] is MoBALayerCache and cache[1].cache.seqlens.tolist() == [PROMPT + NEW] * 2
    if kconv_size:
        assert cache[1].keyconv_state.shape == (2, kconv_size - 1, 2 * 8)


@pytest.mark.parametrize("global_attention, kconv_size", VARIANTS)
@pytest.mark.parametrize("prompt_len", [1, 3, 9])  # shorter than the window (zero slots masked), longer
def test_static_decode_equals_full_recomputation(global_attention, kconv_size, prompt_len):
    """decode_mode="static" (StaticDecoder: fixed buffers, the position on the device; what a CUDA graph
    replays) gives the recomputation's greedy tokens."""
    model = tiny_model(global_attention, kconv_size, torch.float64)
    input_ids = prompts(length=prompt_len)
    generated = model.generate(input_ids, NEW, decode_mode="static")
    assert torch.equal(generated, greedy_by_recomputation(model, input_ids, NEW))


@pytest.mark.parametrize("global_attention, kconv_size", VARIANTS)
def test_static_decoder_logits_equal_the_forward_s_rows_in_float32(global_attention, kconv_size):
    model = tiny_model(global_attention, kconv_size, torch.float32)
    sequence = prompts(length=PROMPT + NEW)
    with torch.no_grad():
        full, _ = model(sequence)
        cache = HybridCache(model, 2, PROMPT + NEW)
        rows = [model.forward_with_cache(sequence[:, :PROMPT], cache)[:, -1]]
        decoder = StaticDecoder(model, cache, cuda_graph=False)
        rows += [decoder.step(sequence[:, i]) for i in range(PROMPT, PROMPT + NEW - 1)]
        assert decoder.length == PROMPT + NEW - 1 and decoder.position.tolist() == [PROMPT + NEW - 1]
        decoder.step(sequence[:, -1])
        with pytest.raises(ValueError, match="holds 25 tokens and is full"):
            decoder.step(sequence[:, -1])
    torch.testing.assert_close(torch.stack(rows, dim=1), full[:, PROMPT - 1 : -1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("global_attention, kconv_size", VARIANTS)
@pytest.mark.parametrize("prompt_len", [1, 9])
def test_compiled_static_decode_equals_full_recomputation(global_attention, kconv_size, prompt_len):
    """decode_mode="compiled" (StaticDecoder(compile=True): the step's forward through torch.compile and
    Inductor, which fuses its elementwise work) gives the recomputation's greedy tokens. The step is one
    graph (the MoBA decode, here the reference backend, is one opaque custom op), compiled once."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = tiny_model(global_attention, kconv_size, torch.float64)
    input_ids = prompts(length=prompt_len)
    generated = model.generate(input_ids, NEW, decode_mode="compiled")
    assert torch.equal(generated, greedy_by_recomputation(model, input_ids, NEW))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)


def _triton_moba_decoder(model, sequence, prompt_len, **options):
    """A StaticDecoder after a prefill of ``sequence[:, :prompt_len]``, its MoBA layers on the Triton
    decode (Triton's interpreter on CPU)."""
    cache = HybridCache(model, sequence.shape[0], sequence.shape[1])
    for layer in cache:
        if isinstance(layer, MoBALayerCache):
            layer.cache.backend = "triton"
    with torch.no_grad():
        model.forward_with_cache(sequence[:, :prompt_len], cache)
    return StaticDecoder(model, cache, cuda_graph=False, **options)


@pytest.mark.triton
@pytest.mark.parametrize("kconv_size", [0, 3])
def test_compiled_static_step_traces_whole_with_the_triton_decode(kconv_size):
    """With moba_attn_with_kvcache on its Triton backend (the custom op flashmoba::moba_decode) the whole
    one-token forward is one graph (fullgraph=True), compiled once for every step, and computes what the
    eager static step computes."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    model = tiny_model("moba", kconv_size, torch.float32)
    sequence = prompts(length=12)
    eager = _triton_moba_decoder(model, sequence, 5)
    compiled = _triton_moba_decoder(
        model, sequence, 5, compile=True, compile_options=dict(fullgraph=True, backend="aot_eager")
    )
    with torch.no_grad():
        for i in range(5, 11):  # crosses MoBA blocks (of 4) and the sliding window (of 6)
            expected, got = eager.step(sequence[:, i]), compiled.step(sequence[:, i])
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert compiled.position.tolist() == eager.position.tolist() == [11]
    for layer, twin in zip(compiled.layers, eager.layers):
        if isinstance(layer, StaticMoBALayerCache):
            assert torch.equal(layer.cache.cache_seqlens, twin.cache.cache_seqlens)
            torch.testing.assert_close(layer.cache.block_sums, twin.cache.block_sums, rtol=0, atol=1e-6)


def test_compile_options_need_compile_and_no_graph_of_inductor_s_own():
    model = tiny_model("moba", 0)
    cache = HybridCache(model, 2, 8)
    with torch.no_grad():
        model.forward_with_cache(prompts(), cache)
    with pytest.raises(ValueError, match="pass compile=True with them"):
        StaticDecoder(model, cache, cuda_graph=False, compile_options=dict(backend="eager"))
    with pytest.raises(ValueError, match="needs input_ids on a CUDA device"):
        model.generate(prompts(), 3, decode_mode="compiled_graph")


def test_static_decoder_refuses_an_empty_cache_and_a_cuda_graph_on_the_cpu():
    model = tiny_model("moba", 0)
    with pytest.raises(ValueError, match="prefilled cache"):
        StaticDecoder(model, HybridCache(model, 2, 8), cuda_graph=False)
    with pytest.raises(ValueError, match="needs input_ids on a CUDA device"):
        model.generate(prompts(), 3, decode_mode="cuda_graph")
    with pytest.raises(ValueError, match="decode_mode must be one of"):
        model.generate(prompts(), 3, decode_mode="graph")


def test_chunked_prefill_and_reorder_follow_the_forward():
    """Prefill in two chunks, then a beam-search reorder that repeats and drops rows."""
    model = tiny_model("moba", 3, torch.float64)
    sequence = prompts(batch=3, length=14)
    with torch.no_grad():
        cache = HybridCache(model, 3, 14)
        model.forward_with_cache(sequence[:, :7], cache)
        model.forward_with_cache(sequence[:, 7:11], cache)
        index = torch.tensor([2, 2, 0])
        cache.reorder(index)
        logits = model.forward_with_cache(sequence[index, 11:], cache)
        full, _ = model(sequence[index])
    torch.testing.assert_close(logits, full[:, 11:], rtol=0, atol=1e-10)
    cache.reset()
    assert cache.length == 0 and cache[1].cache.seqlens.tolist() == [0, 0, 0]


def test_sampling_is_reproducible_and_top_p_near_zero_is_greedy():
    model = tiny_model("moba", 0)
    input_ids = prompts()

    def sampled(seed, **kwargs):
        return model.generate(
            input_ids, 8, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kwargs
        )

    assert torch.equal(sampled(3), sampled(3))
    assert not torch.equal(sampled(3), sampled(4))  # 40 tokens of a near-uniform model: differs
    assert torch.equal(sampled(5, top_p=1e-6), model.generate(input_ids, 8))
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    draws = {int(sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(s))) for s in range(40)}
    assert draws == {1, 2}  # the nucleus: the two likely tokens, never the others


def test_eos_stops_a_row_and_generation_stops_when_every_row_has():
    model = tiny_model("dense", 0)
    input_ids = prompts(batch=1)
    greedy = model.generate(input_ids, NEW)
    eos = int(greedy[0, 3])
    first = greedy[0].tolist().index(eos)
    stopped = model.generate(input_ids, NEW, eos_token_id=eos)
    assert stopped[0].tolist() == greedy[0, : first + 1].tolist()
    both = model.generate(prompts(batch=2), NEW, eos_token_id=eos)
    for row, full in zip(both.tolist(), model.generate(prompts(batch=2), NEW).tolist()):
        if eos in row:
            at = row.index(eos)
            assert row[: at + 1] == full[: at + 1] and set(row[at:]) == {eos}
        else:
            assert row == full[: len(row)]


def test_stats_and_zero_new_tokens():
    model = tiny_model("moba", 0)
    stats = {}
    generated = generate(model, prompts(), 4, stats=stats)
    assert generated.shape == (2, 4)
    assert stats["prefill_tokens"] == 2 * PROMPT and stats["decode_tokens"] == 2 * 3
    assert stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0
    # 3 decode steps: the first WARM_DECODE_STEPS (2) are left out of the steady state
    assert stats["steady_decode_tokens"] == 2 * 1
    assert 0 < stats["steady_decode_seconds"] < stats["decode_seconds"]
    assert model.generate(prompts(), 0).shape == (2, 0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
        (dict(top_p=0.0), ValueError, "top_p must be > 0"),
        (dict(top_p=1.5), ValueError, "top_p must be <= 1"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be >= 0"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.int64)), ValueError, "prompt_len >= 1"),
        (dict(input_ids=torch.zeros(3, dtype=torch.int64)), ValueError, r"\[batch, prompt_len\]"),
        (dict(input_ids=torch.zeros(1, 3)), TypeError, "int64 or int32"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, message):
    model = tiny_model("moba", 0)
    arguments = {"input_ids": prompts(), "max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=message):
        model.generate(arguments.pop("input_ids"), arguments.pop("max_new_tokens"), **arguments)


@pytest.mark.parametrize("global_attention", ["moba", "dense"])
def test_prefill_builds_the_last_position_s_logits_only(global_attention):
    """generate's prefill asks for the last prompt position only: the head sees [batch, 1, hidden], not
    [batch, prompt_len, hidden] (no full-sequence logits), and last_position_only gives exactly the full
    call's last row (to float32 rounding: the head's matrix product runs at another shape, and BLAS
    need not sum a row the same way at every shape)."""
    model = tiny_model(global_attention, 0, torch.float32)
    input_ids = prompts(length=9)
    with torch.no_grad():
        full = model.forward_with_cache(input_ids, HybridCache(model, 2, 9))
        last = model.forward_with_cache(input_ids, HybridCache(model, 2, 9), last_position_only=True)
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)
    head_inputs = []
    model.lm_head.register_forward_hook(lambda module, args, output: head_inputs.append(args[0].shape))
    generated = model.generate(input_ids, 4, decode_mode="static")
    assert head_inputs[0] == (2, 1, 32)  # the prefill
    assert torch.equal(generated, greedy_by_recomputation(model, input_ids, 4))


def test_after_decode_gets_the_loop_s_step_with_room_for_its_steps():
    model = tiny_model("moba", 0, torch.float64)
    input_ids = prompts(length=5)
    seen = {}

    def after_decode(step, token):
        seen["token"] = token
        seen["logits"] = [step(token) for _ in range(3)]

    generated = generate(
        model, input_ids, 4, decode_mode="static", after_decode=after_decode, after_decode_steps=3
    )
    assert torch.equal(generated, model.generate(input_ids, 4, decode_mode="static"))
    assert torch.equal(seen["token"], generated[:, -1]) and seen["logits"][-1].shape == (2, VOCAB)


def test_prefilled_caches_own_only_what_they_keep():
    """After a prefill the sliding window's keys and values and the key convolution's state are copies,
    not slices of the prompt's [batch, prompt_len, ...] tensors (which a slice would keep alive)."""
    model = tiny_model("dense", 3, torch.float32)
    prompt_len = 40
    cache = HybridCache(model, 2, prompt_len)
    with torch.no_grad():
        model.forward_with_cache(prompts(length=prompt_len), cache, last_position_only=True)

    def owns_only_itself(tensor):
        return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()

    sliding, dense = cache[0], cache[1]
    assert sliding.k.shape[1] == 5 and owns_only_itself(sliding.k) and owns_only_itself(sliding.v)
    assert dense.keyconv_state.shape == (2, 2, 16) and owns_only_itself(dense.keyconv_state)


# ----------------------------------------------------------------------------------------------------
# Prompts of unequal lengths (prompt_lengths, right-padded input_ids)
# ----------------------------------------------------------------------------------------------------

# Block size 4: one token, inside the first block, its end, just past it, past the sliding window (6) and
# two blocks (11); two rows share a length (one prefill call for both).
RAGGED_LENGTHS = [1, 3, 4, 5, 11, 4]


def ragged_prompts(lengths=RAGGED_LENGTHS, width: int | None = None, seed: int = 2, pad_seed: int = 7):
    """Right-padded prompts [batch, width]: row b's first lengths[b] ids, then padding (random ids from
    ``pad_seed``, which generation never reads)."""
    width = max(lengths) if width is None else width
    ids = prompts(batch=len(lengths), length=width, seed=seed)
    padding = prompts(batch=len(lengths), length=width, seed=pad_seed)
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return torch.where(keep, ids, padding)


@pytest.mark.parametrize("global_attention, kconv_size", VARIANTS)
@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_ragged_greedy_generation_equals_each_row_alone(global_attention, kconv_size, decode_mode):
    """Each row of a ragged batch gets, token for token, the greedy tokens of its own prompt generated
    alone (and those of full recomputation): its own positions, MoBA blocks and caches."""
    model = tiny_model(global_attention, kconv_size, torch.float64)
    input_ids = ragged_prompts(width=13)  # wider than the longest prompt
    lengths = torch.tensor(RAGGED_LENGTHS)
    generated = model.generate(input_ids, NEW, decode_mode=decode_mode, prompt_lengths=lengths)
    assert generated.shape == (len(RAGGED_LENGTHS), NEW) and generated.dtype == torch.int64
    for row, length in enumerate(RAGGED_LENGTHS):
        prompt = input_ids[row : row + 1, :length]
        alone = model.generate(prompt, NEW, decode_mode="eager")
        assert torch.equal(generated[row], alone[0]), (row, length)
        assert torch.equal(alone, greedy_by_recomputation(model, prompt, NEW)), (row, length)
    # The padding is never read: other padding, the same tokens; a list of ints is the same lengths.
    repadded = ragged_prompts(width=13, pad_seed=8)
    assert not torch.equal(repadded, input_ids)
    again = model.generate(repadded, NEW, decode_mode=decode_mode, prompt_lengths=RAGGED_LENGTHS)
    assert torch.equal(again, generated)


@pytest.mark.parametrize("global_attention, kconv_size", [("moba", 3), ("dense", 0)])
def test_ragged_compiled_static_decode_equals_eager(global_attention, kconv_size):
    """decode_mode="compiled" reads the per-row positions on the device like "static": the eager tokens."""
    torch._dynamo.reset()
    model = tiny_model(global_attention, kconv_size, torch.float64)
    input_ids = ragged_prompts()
    eager = model.generate(input_ids, 8, decode_mode="eager", prompt_lengths=RAGGED_LENGTHS)
    compiled = model.generate(input_ids, 8, decode_mode="compiled", prompt_lengths=RAGGED_LENGTHS)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("global_attention, kconv_size", VARIANTS)
def test_ragged_cache_logits_equal_each_row_s_forward(global_attention, kconv_size):
    """The logits of a ragged cache's prefill and of its eager and static decode steps are each row's
    forward over its own sequence (so sampling draws from each row's own distribution), also after a
    beam-search reorder that repeats and drops rows."""
    model = tiny_model(global_attention, kconv_size, torch.float32)
    steps = 8
    lengths = RAGGED_LENGTHS
    sequence = prompts(batch=len(lengths), length=max(lengths) + steps)
    # Row b's prompt is sequence[b, :lengths[b]]; its next tokens, sequence[b, lengths[b] + t].
    padded = ragged_prompts(lengths, seed=1)
    padded = torch.where(
        torch.arange(padded.shape[1]) < torch.tensor(lengths)[:, None], sequence[:, : max(lengths)], padded
    )
    rows = torch.arange(len(lengths))
    next_token = lambda t: sequence[rows, torch.tensor(lengths) + t]  # noqa: E731
    with torch.no_grad():
        full, _ = model(sequence)
        cache, logits = HybridCache.prefill_ragged(model, padded, lengths, max(lengths) + steps)
        assert cache.lengths.tolist() == lengths and cache.length == max(lengths)
        if global_attention == "moba":
            assert cache[1].cache.seqlens.tolist() == lengths
        expected = full[rows, torch.tensor(lengths) - 1]
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
        for t in range(steps // 2):  # eager steps
            logits = model.forward_with_cache(next_token(t)[:, None], cache)[:, -1]
            torch.testing.assert_close(logits, full[rows, torch.tensor(lengths) + t], rtol=0, atol=1e-5)
        assert cache.lengths.tolist() == [length + steps // 2 for length in lengths]
        index = torch.tensor([4, 0, 0, 2, 1, 3])  # beam search: repeat row 0, drop row 5
        cache.reorder(index)
        decoder = StaticDecoder(model, cache, cuda_graph=False)
        assert decoder.position.tolist() == [lengths[i] + steps // 2 for i in index.tolist()]
        for t in range(steps // 2, steps):  # static steps
            logits = decoder.step(next_token(t)[index])
            at = torch.tensor(lengths)[index] + t
            torch.testing.assert_close(logits, full[index, at], rtol=0, atol=1e-5)


@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_equal_prompt_lengths_are_the_equal_length_path(decode_mode):
    model = tiny_model("moba", 3, torch.float64)
    input_ids = prompts(batch=3, length=9)
    plain = model.generate(input_ids, NEW, decode_mode=decode_mode)
    assert torch.equal(model.generate(input_ids, NEW, decode_mode=decode_mode, prompt_lengths=[9] * 3), plain)
    shorter = model.generate(input_ids, NEW, decode_mode=decode_mode, prompt_lengths=torch.tensor([6] * 3))
    assert torch.equal(shorter, model.generate(input_ids[:, :6], NEW, decode_mode=decode_mode))


def test_ragged_eos_stats_and_sampling():
    model = tiny_model("dense", 0, torch.float64)
    input_ids = ragged_prompts()
    greedy = model.generate(input_ids, NEW, prompt_lengths=RAGGED_LENGTHS)
    eos = int(greedy[0, 3])
    stopped = model.generate(input_ids, NEW, eos_token_id=eos, prompt_lengths=RAGGED_LENGTHS)
    for row, length in enumerate(RAGGED_LENGTHS):
        alone = model.generate(input_ids[row : row + 1, :length], NEW, eos_token_id=eos)[0].tolist()
        got = stopped[row].tolist()
        assert got[: len(alone)] == alone and set(got[len(alone) :]) <= {eos}
    stats = {}
    generate(model, input_ids, 3, stats=stats, prompt_lengths=RAGGED_LENGTHS)
    assert stats["prefill_tokens"] == sum(RAGGED_LENGTHS) and stats["decode_tokens"] == 2 * len(
        RAGGED_LENGTHS
    )

    def sampled(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(
            input_ids, 8, temperature=1.0, generator=generator, prompt_lengths=RAGGED_LENGTHS, **kwargs
        )

    assert torch.equal(sampled(3), sampled(3)) and not torch.equal(sampled(3), sampled(4))
    assert torch.equal(sampled(5, top_p=1e-6), greedy[:, :8])


@pytest.mark.parametrize(
    "prompt_lengths, error, message",
    [
        (torch.tensor([2.0, 3.0]), TypeError, "prompt_lengths must be an integer tensor"),
        (torch.tensor([True, True]), TypeError, "prompt_lengths must be an integer tensor"),
        ([2, 3.0], TypeError, "prompt_lengths must hold ints"),
        (3, TypeError, "prompt_lengths must be an integer torch.Tensor"),
        (torch.tensor([2, 3, 4]), ValueError, r"prompt_lengths must have shape \[batch\] = \(2,\)"),
        (torch.tensor([[2, 3]]), ValueError, r"prompt_lengths must have shape \[batch\]"),
        ([2], ValueError, r"prompt_lengths must have shape \[batch\]"),
        (torch.tensor([0, 3]), ValueError, r"prompt_lengths must be in \[1, input_ids.shape\[1\] = 5\]"),
        ([2, 6], ValueError, r"prompt_lengths must be in \[1, .* got 6 for row 1"),
    ],
)
def test_bad_prompt_lengths_are_refused(prompt_lengths, error, message):
    model = tiny_model("moba", 0)
    with pytest.raises(error, match=message):
        model.generate(prompts(), 2, prompt_lengths=prompt_lengths)


def test_short_sequences_keep_every_key_of_their_sliding_window():
    """A sequence shorter than window - 1 keeps all its keys (a negative slice start would drop the
    oldest): eager generation from prompts of every length up to the window equals recomputation."""
    model = tiny_model("dense", 0, torch.float64)
    for length in range(1, 7):
        input_ids = prompts(batch=1, length=length, seed=3)
        cache = HybridCache(model, 1, length)
        with torch.no_grad():
            model.forward_with_cache(input_ids, cache)
        assert cache[0].k.shape[1] == min(length, 5)
        generated = model.generate(input_ids, 12, decode_mode="eager")
        assert torch.equal(generated, greedy_by_recomputation(model, input_ids, 12)), length


@pytest.mark.triton
@pytest.mark.parametrize("kconv_size", [0, 3])
def test_ragged_static_decode_on_the_triton_moba_decode(kconv_size):
    """A ragged cache's static steps with the MoBA layers on the Triton decode (the kernels a CUDA graph
    replays; Triton's interpreter on CPU), which read the per-row lengths on the device: each row's
    forward logits."""
    model = tiny_model("moba", kconv_size, torch.float32)
    lengths = [1, 4, 5, 11]
    steps = 6
    sequence = prompts(batch=len(lengths), length=max(lengths) + steps)
    rows, at = torch.arange(len(lengths)), torch.tensor(lengths)
    with torch.no_grad():
        full, _ = model(sequence)
        cache, logits = HybridCache.prefill_ragged(model, sequence, lengths, max(lengths) + steps)
        for layer in cache:
            if isinstance(layer, MoBALayerCache):
                layer.cache.backend = "triton"
        decoder = StaticDecoder(model, cache, cuda_graph=False)
        for t in range(steps):
            torch.testing.assert_close(logits, full[rows, at + t - 1], rtol=0, atol=1e-5)
            logits = decoder.step(sequence[rows, at + t])
    assert decoder.position.tolist() == [length + steps for length in lengths]
    assert cache[1].cache.cache_seqlens.tolist() == [length + steps for length in lengths]
