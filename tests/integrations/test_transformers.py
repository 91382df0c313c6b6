"""flashmoba.integrations.transformers: attn_implementation="moba" in tiny random transformers models
built from configs (no downloads), against SDPA at dense settings and flashmoba's reference backend at
sparse ones, with and without the cache, padded and packed."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashmoba.integrations.transformers as moba_integration  # noqa: E402  (registers "moba")

VOCAB = 97
FAMILIES = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "mistral": transformers.MistralConfig,
}


def tiny_config(family="llama", **moba):
    config = FAMILIES[family](
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=None,
        use_sliding_window=False,
        tie_word_embeddings=False,
    )
    for name, value in {"moba_block_size": 8, "moba_topk": 2, "moba_backend": "reference", **moba}.items():
        setattr(config, name, value)
    return config


def build(config, attn_implementation, state=None):
    """A model of its own copy of ``config``: from_config records the attention implementation in the
    config it is given, which a second model of the same object would then take."""
    torch.manual_seed(0)
    config = copy.deepcopy(config)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def ids(*shape, seed=0):
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the MoBA function that ran MoBA (not the SDPA fallback)."""
    counter = {"moba": 0}
    real = moba_integration.moba_attn

    def counted(*args, **kwargs):
        counter["moba"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(moba_integration, "moba_attn", counted)
    return counter


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dense_settings_give_sdpa_s_logits(family, calls):
    config = tiny_config(family, moba_topk=100)  # every block selected: MoBA is dense causal attention
    sdpa = build(config, "sdpa")
    moba = build(config, "moba", sdpa.state_dict())
    tokens = ids(2, 45)
    torch.testing.assert_close(moba(tokens).logits, sdpa(tokens).logits, atol=1e-5, rtol=1e-5)
    assert calls["moba"] == config.num_hidden_layers


def test_sparse_settings_equal_the_reference_and_differ_from_dense():
    config = tiny_config(moba_backend="triton")  # the kernels, in Triton's interpreter on the CPU
    triton_model = build(config, "moba")
    reference_model = build(tiny_config(), "moba", triton_model.state_dict())
    sdpa = build(tiny_config(), "sdpa", triton_model.state_dict())
    tokens = ids(2, 45)
    logits = triton_model(tokens).logits
    torch.testing.assert_close(logits, reference_model(tokens).logits, atol=1e-4, rtol=1e-4)
    assert (logits - sdpa(tokens).logits).abs().max() > 1e-3  # 2 of 6 blocks: not dense attention


def test_backward_matches_the_reference_s_gradients():
    triton_model = build(tiny_config(moba_backend="triton"), "moba").train()
    reference_model = build(tiny_config(), "moba", triton_model.state_dict()).train()
    tokens = ids(1, 40)
    grads = []
    for model in (triton_model, reference_model):
        model(tokens, labels=tokens).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_moba_layers_chooses_the_layers_and_the_others_run_sdpa(calls):
    sdpa = build(tiny_config(), "sdpa")
    none = build(tiny_config(moba_layers=[]), "moba", sdpa.state_dict())
    tokens = ids(1, 40)
    torch.testing.assert_close(none(tokens).logits, sdpa(tokens).logits, atol=1e-6, rtol=1e-6)
    assert calls["moba"] == 0
    one = build(tiny_config(moba_layers=[1]), "moba", sdpa.state_dict())
    one(tokens)
    assert calls["moba"] == 1


def test_cached_greedy_generation_equals_generation_without_the_cache():
    model = build(tiny_config(), "moba")
    prompt = ids(1, 21)
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_a_left_padded_batch_generates_as_each_prompt_alone():
    model = build(tiny_config(), "moba")
    prompts = [ids(1, 19, seed=1)[0], ids(1, 30, seed=2)[0]]
    pad = 0
    batch = torch.full((2, 30), pad)
    mask = torch.zeros(2, 30, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 30 - len(prompt) :] = prompt
        mask[row, 30 - len(prompt) :] = 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=8, do_sample=False, pad_token_id=pad)
        assert together[row, 30:].tolist() == alone[0, len(prompt) :].tolist(), row


def test_packed_inputs_equal_each_sequence_alone():
    model = build(tiny_config(), "moba")
    lengths = [17, 30, 9]
    sequences = [ids(1, n, seed=n)[0] for n in lengths]
    cu = torch.tensor([0, 17, 47, 56], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(
        torch.cat(sequences)[None],
        position_ids=positions,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=30,
        max_length_k=30,
    ).logits[0]
    for start, sequence in zip(cu[:-1].tolist(), sequences):
        alone = model(sequence[None]).logits[0]
        torch.testing.assert_close(packed[start : start + len(sequence)], alone, atol=1e-5, rtol=1e-5)


def test_missing_or_bad_settings_are_named():
    config = tiny_config()
    del config.moba_topk
    with pytest.raises(ValueError, match=r"needs config fields \['moba_topk'\]"):
        build(config, "moba")(ids(1, 10))
    with pytest.raises(ValueError, match="config.moba_backend must be one of"):
        build(tiny_config(moba_backend="cuda"), "moba")(ids(1, 10))
    with pytest.raises(TypeError, match="config.moba_layers must be a list of layer indices"):
        build(tiny_config(moba_layers="1"), "moba")(ids(1, 10))


def test_import_flashmoba_does_not_load_transformers():
    import subprocess
    import sys

    code = "import sys, flashmoba; sys.exit(1 if 'transformers' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------------------------------------------
# The centroid cache layer (MoBACache)
# ----------------------------------------------------------------------------------------------------


def cache_argument(model, cache):
    """The keyword under which this transformers' models take a cache (5.24 renamed past_key_values)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the decode steps that went through moba_attn_with_kvcache (the centroid cache)."""
    counter = {"decode": 0}
    real = moba_integration.moba_attn_with_kvcache

    def counted(*args, **kwargs):
        counter["decode"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(moba_integration, "moba_attn_with_kvcache", counted)
    return counter


def left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return batch, mask


def test_the_cache_has_moba_layers_where_the_config_says():
    config = tiny_config(moba_layers=[1])
    cache = moba_integration.MoBACache(config)
    assert [type(layer).__name__ for layer in cache.layers] == ["DynamicLayer", "MoBACacheLayer"]
    assert all(
        isinstance(x, moba_integration.MoBACacheLayer)
        for x in moba_integration.MoBACache(tiny_config()).layers
    )
    del config.moba_block_size
    with pytest.raises(ValueError, match="moba_block_size"):
        moba_integration.MoBACache(config)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_steps_through_the_centroid_cache_equal_recomputation(family, decode_calls):
    """float64: prefill 37 tokens (5 blocks of 8, top-2), then 14 steps of one token, each step's logits
    against the full recomputation's last row."""
    model = build(tiny_config(family), "moba").double()
    tokens = ids(1, 51, seed=3)
    cache = moba_integration.MoBACache(model.config)
    with torch.no_grad():
        full = model(tokens).logits
        steps = [model(tokens[:, :37], use_cache=True, **cache_argument(model, cache)).logits[:, -1]]
        for position in range(37, 51):
            out = model(tokens[:, position : position + 1], use_cache=True, **cache_argument(model, cache))
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], dim=1), full[:, 36:50], atol=1e-10, rtol=1e-10)
    assert decode_calls["decode"] == 14 * model.config.num_hidden_layers
    layer = cache.layers[0]
    assert layer.seqlens.tolist() == [51] and layer.routable
    keys = layer.keys.transpose(1, 2)[0]  # [51, heads_kv, head_dim]
    sums = torch.stack([keys[j * 8 : (j + 1) * 8].sum(dim=0) for j in range(7)])
    torch.testing.assert_close(layer.block_sums[0, :7], sums, atol=1e-12, rtol=1e-12)
    # sparse: the decode steps selected 2 of up to 7 blocks, which dense attention does not reproduce
    sdpa = build(tiny_config(family), "sdpa", model.state_dict()).double()
    assert (sdpa(tokens).logits[:, 36:50] - full[:, 36:50]).abs().max() > 1e-4


def test_chunks_of_several_tokens_after_the_prompt_equal_recomputation(decode_calls):
    """Chunked prefill (or speculative verification): chunks of 9, 1 and 12 tokens after a prompt of 20,
    each through moba_attn_with_kvcache with seqlen_q > 1, in a left-padded batch (float64)."""
    model = build(tiny_config(), "moba").double()
    batch, mask = left_padded([ids(1, 20, seed=10)[0], ids(1, 14, seed=11)[0]])
    more = ids(2, 22, seed=12)
    cache = moba_integration.MoBACache(model.config)
    full_mask = torch.cat([mask, torch.ones(2, 22, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        full = model(torch.cat([batch, more], dim=1), attention_mask=full_mask).logits[:, 20:]
        model(batch, attention_mask=mask, use_cache=True, **cache_argument(model, cache))
        chunks, start = [], 0
        for size in (9, 1, 12):
            chunk_mask = full_mask[:, : 20 + start + size]
            out = model(
                more[:, start : start + size],
                attention_mask=chunk_mask,
                use_cache=True,
                **cache_argument(model, cache),
            )
            chunks.append(out.logits)
            start += size
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-10, rtol=1e-10)
    assert decode_calls["decode"] == 3 * model.config.num_hidden_layers


@pytest.mark.parametrize("moba_layers", [None, [1]])
def test_greedy_generation_with_the_centroid_cache_equals_generation_without_a_cache(
    moba_layers, decode_calls
):
    model = build(tiny_config(moba_layers=moba_layers), "moba")
    prompt = ids(1, 21)
    cache = moba_integration.MoBACache(model.config)
    cached = model.generate(prompt, max_new_tokens=20, do_sample=False, **cache_argument(model, cache))
    uncached = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert decode_calls["decode"] == 19 * len(moba_layers or range(model.config.num_hidden_layers))


@pytest.mark.triton
def test_triton_decode_of_a_left_padded_batch_equals_the_reference(decode_calls):
    """The Triton decode kernels (Triton's interpreter on the CPU) read the cache as transformers'
    layout gives it, the padded rows through the block table of one-position pages."""
    triton_model = build(tiny_config(moba_backend="triton"), "moba")
    reference_model = build(tiny_config(), "moba", triton_model.state_dict())
    batch, mask = left_padded([ids(1, 13, seed=7)[0], ids(1, 26, seed=8)[0]])
    steps = ids(2, 3, seed=9)
    logits = []
    for model in (triton_model, reference_model):
        cache = moba_integration.MoBACache(model.config)
        with torch.no_grad():
            model(batch, attention_mask=mask, use_cache=True, **cache_argument(model, cache))
            for step in range(3):
                mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
                out = model(
                    steps[:, step : step + 1],
                    attention_mask=mask,
                    use_cache=True,
                    **cache_argument(model, cache),
                )
                logits.append(out.logits[:, -1])
        mask = mask[:, :-3]
    assert decode_calls["decode"] == 2 * 3 * triton_model.config.num_hidden_layers
    torch.testing.assert_close(torch.stack(logits[:3]), torch.stack(logits[3:]), atol=1e-4, rtol=1e-4)


def test_a_left_padded_batch_with_the_centroid_cache_generates_as_each_prompt_alone(decode_calls):
    model = build(tiny_config(), "moba")
    prompts = [ids(1, 19, seed=1)[0], ids(1, 30, seed=2)[0], ids(1, 5, seed=4)[0]]
    batch, mask = left_padded(prompts)
    cache = moba_integration.MoBACache(model.config)
    together = model.generate(
        batch,
        attention_mask=mask,
        max_new_tokens=14,
        do_sample=False,
        pad_token_id=0,
        **cache_argument(model, cache),
    )
    assert decode_calls["decode"] == 13 * model.config.num_hidden_layers  # every step used the block sums
    assert cache.layers[1].offsets.tolist() == [11, 0, 25] and cache.layers[1].seqlens.tolist() == [
        32,
        43,
        18,
    ]
    for row, prompt in enumerate(prompts):
        alone = model.generate(
            prompt[None], max_new_tokens=14, do_sample=False, use_cache=False, pad_token_id=0
        )
        assert together[row, 30:].tolist() == alone[0, len(prompt) :].tolist(), row


def test_right_padding_falls_back_to_recomputation(decode_calls):
    """Padding the centroid state cannot follow (not on the left) turns the layer's routing off: the
    calls then recompute over the keys they are given, and the logits stay those without a cache."""
    model = build(tiny_config(), "moba").double()
    tokens = ids(2, 20, seed=5)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 15:] = 0
    cache = moba_integration.MoBACache(model.config)
    with torch.no_grad():
        cached = model(tokens, attention_mask=mask, use_cache=True, **cache_argument(model, cache)).logits
        uncached = model(tokens, attention_mask=mask).logits
    torch.testing.assert_close(cached[0], uncached[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(cached[1, :15], uncached[1, :15], atol=1e-10, rtol=1e-10)
    assert not cache.layers[0].routable and decode_calls["decode"] == 0


def test_beam_search_with_the_centroid_cache_equals_beam_search_without_a_cache():
    model = build(tiny_config(), "moba")
    prompt = ids(1, 23, seed=6)
    cache = moba_integration.MoBACache(model.config)
    settings = dict(max_new_tokens=10, do_sample=False, num_beams=3, num_return_sequences=3)
    cached = model.generate(prompt, **settings, **cache_argument(model, cache))
    uncached = model.generate(prompt, **settings, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_crop_rebuilds_the_block_sums():
    layer = moba_integration.MoBACacheLayer()
    keys = torch.randn(2, 3, 29, 4, dtype=torch.float64)
    layer.update(keys, keys.clone())
    assert layer.sync(None, 8)
    layer.crop(-10)
    assert layer.get_seq_length() == 19 and layer.sync(None, 8)
    kept = keys[:, :, :19].transpose(1, 2)
    sums = torch.stack([kept[:, j * 8 : (j + 1) * 8].sum(dim=1) for j in range(3)], dim=1)
    torch.testing.assert_close(layer.block_sums[:, :3], sums)
    assert not layer.block_sums[:, 3:].any() and layer.seqlens.tolist() == [19, 19]
    with pytest.raises(ValueError, match="tokens_to_remove"):
        layer.crop(3)
