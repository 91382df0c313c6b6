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
