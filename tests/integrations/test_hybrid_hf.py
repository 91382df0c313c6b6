"""flashmoba.integrations.hybrid_hf and ``flashmoba export-hf``: a tiny HybridLM, created in the test and
saved as a ``flashmoba train`` checkpoint, exported as a transformers model, loaded back with
``from_pretrained`` and generated from with transformers' ``generate`` (CPU, no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashmoba.cli import main as flashmoba_main  # noqa: E402
from flashmoba.data import ByteTokenizer  # noqa: E402
from flashmoba.integrations.hybrid_hf import (  # noqa: E402
    HybridLMConfig,
    HybridLMForCausalLM,
    export_checkpoint,
)
from flashmoba.models import HybridLM  # noqa: E402
from flashmoba.models.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402
from flashmoba.models.generation import generate as flashmoba_generate  # noqa: E402
from flashmoba.training.config import config_from_preset  # noqa: E402
from flashmoba.training.loop import make_optimizer  # noqa: E402

# Odd sizes: 3 layers (sliding, MoBA, sliding), 4 query heads on 2 kv heads, blocks of 5 with top-2, a
# window of 7, a key convolution (its decode state in flashmoba generate), a vocabulary of 257 (bytes).
MODEL = dict(
    num_layers=3,
    hidden_size=40,
    num_heads=4,
    num_kv_heads=2,
    head_dim=10,
    mlp_hidden_size=72,
    window_size=7,
    moba_block_size=5,
    moba_topk=2,
    kconv_size=3,
    init_std=0.1,  # peaked logits: greedy choices far from ties
    backend="reference",
)


def save_run(directory, **overrides):
    config = config_from_preset("tiny")
    for name, value in {**MODEL, **overrides}.items():
        setattr(config.model, name, value)
    torch.manual_seed(0)
    model = HybridLM(config.model)
    path = directory / "checkpoints" / "step_0000003.pt"
    save_checkpoint(path, model, make_optimizer(model, config), 3, config, 0)
    return directory


@pytest.fixture
def run(tmp_path):
    return save_run(tmp_path / "run")


@pytest.fixture
def exported(run, tmp_path):
    out = tmp_path / "hf"
    assert flashmoba_main(["export-hf", str(run), str(out)]) == 0
    return out


def ids(*shape, seed=0):
    return torch.randint(257, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [False, True])
def test_export_then_from_pretrained_round_trips_the_weights_and_the_config(tmp_path, tie):
    run = save_run(tmp_path / "run", tie_embeddings=tie)
    out = tmp_path / "hf"
    export_checkpoint(run, out)
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    checkpoint = read_checkpoint(run / "checkpoints" / "step_0000003.pt")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, HybridLMForCausalLM)
    assert loaded.model.config.to_dict() == checkpoint["config"]["model"]
    state = loaded.model.state_dict()
    assert sorted(state) == sorted(checkpoint["model"])
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(state[name], tensor), name
    assert (loaded.model.lm_head.weight is loaded.model.embed.weight) == tie


@pytest.fixture
def cached_steps(monkeypatch):
    """Counts the calls of HybridLM.forward_with_cache (flashmoba's cache) and their tokens."""
    counter = {"calls": 0, "tokens": 0}
    real = HybridLM.forward_with_cache

    def counted(self, input_ids, cache, **options):  # options: generate's last_position_only
        counter["calls"] += 1
        counter["tokens"] += input_ids.shape[1]
        return real(self, input_ids, cache, **options)

    monkeypatch.setattr(HybridLM, "forward_with_cache", counted)
    return counter


def test_transformers_generate_equals_flashmoba_s_cached_generate(exported, cached_steps):
    """float64, a batch of two prompts of 13 tokens: 16 greedy tokens, over 6 blocks by the end; cached
    (flashmoba's cache through generate's steps) and recomputed (use_cache=False) alike."""
    model = HybridLMForCausalLM.from_pretrained(exported, dtype=torch.float64).eval()
    prompts = ids(2, 13, seed=1)
    ours = flashmoba_generate(model.model, prompts, 16)
    cached_steps.update(calls=0, tokens=0)
    theirs = model.generate(prompts, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert cached_steps == {"calls": 16, "tokens": 13 + 15}  # the prompt once, then one token a step
    recomputed = model.generate(prompts, max_new_tokens=16, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached_steps["calls"] == 16
    assert theirs[:, :13].tolist() == prompts.tolist()
    assert theirs[:, 13:].tolist() == ours.tolist() == recomputed[:, 13:].tolist()
    assert len(set(ours[0].tolist())) > 1  # not a model stuck on one token


def test_beam_search_recomputes_and_sampling_uses_the_cache(exported, cached_steps):
    model = HybridLMForCausalLM.from_pretrained(exported, dtype=torch.float64).eval()
    prompt = ids(1, 11, seed=5)
    settings = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    beams = model.generate(prompt, **settings)
    assert cached_steps["calls"] == 0
    assert beams.tolist() == model.generate(prompt, **settings, use_cache=False).tolist()
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        sampled.append(model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=0, use_cache=use_cache))
    assert cached_steps["calls"] == 8 and sampled[0].tolist() == sampled[1].tolist()


def test_transformers_generate_equals_the_flashmoba_generate_command(run, exported, capsys):
    argv = ["generate", "--checkpoint", str(run), "--prompt", "moba!", "--max-new-tokens", "12"]
    assert flashmoba_main(argv) == 0
    text = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[0]
    tokenizer = ByteTokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    prompt = torch.tensor([tokenizer.encode("moba!", bos=True)])
    out = model.generate(
        prompt,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=tokenizer.bos_id,
        pad_token_id=tokenizer.bos_id,
    )
    new = out[0, prompt.shape[1] :].tolist()
    new = new[: new.index(tokenizer.bos_id)] if tokenizer.bos_id in new else new
    assert text == "moba!" + tokenizer.decode(new)


def test_a_left_padded_batch_generates_as_each_prompt_alone(exported, cached_steps):
    model = HybridLMForCausalLM.from_pretrained(exported, dtype=torch.float64).eval()
    prompts = [ids(1, 9, seed=2)[0], ids(1, 17, seed=3)[0]]
    batch = torch.zeros(2, 17, dtype=torch.long)
    mask = torch.zeros(2, 17, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 17 - len(prompt) :] = prompt
        mask[row, 17 - len(prompt) :] = 1
    together = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for row, prompt in enumerate(prompts):
        alone = flashmoba_generate(model.model, prompt[None], 10)
        assert together[row, 17:].tolist() == alone[0].tolist(), row
    assert cached_steps["calls"] == 2 * 10  # only flashmoba_generate's: the padded batch recomputed
    gaps = torch.ones(1, 8, dtype=torch.long)
    gaps[0, 3] = 0
    with pytest.raises(ValueError, match="one run"):
        model(ids(1, 8), attention_mask=gaps)


def test_labels_give_the_shifted_next_token_cross_entropy(exported):
    model = HybridLMForCausalLM.from_pretrained(exported, dtype=torch.float64)
    tokens = ids(2, 11, seed=4)
    out = model(tokens, labels=tokens)
    targets = torch.nn.functional.pad(tokens[:, 1:], (0, 1), value=-100)
    _, expected = model.model(tokens, targets=targets)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.embed.weight.grad is not None
    assert model(tokens, logits_to_keep=1).logits.shape == (2, 1, 257)


def test_export_refuses_a_non_empty_out_dir_unless_told_and_never_removes_a_file(run, exported, capsys):
    keep = exported / "notes.txt"
    keep.write_text("mine")
    before = (exported / "model.safetensors").read_bytes()
    assert flashmoba_main(["export-hf", str(run), str(exported)]) == 1
    error = capsys.readouterr().err
    assert "is not empty" in error and "--overwrite" in error
    assert flashmoba_main(["export-hf", str(run), str(exported), "--overwrite"]) == 0
    assert keep.read_text() == "mine" and (exported / "model.safetensors").read_bytes() == before
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".hf.export-")]  # staging removed
    with pytest.raises(ValueError, match="outside the run directory"):
        export_checkpoint(run, run / "hf", overwrite=True)
    with pytest.raises(ValueError, match="outside the run directory"):
        export_checkpoint(run / "checkpoints" / "step_0000003.pt", run, overwrite=True)
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        export_checkpoint(run, exported, overwrite="yes")
    with pytest.raises(ValueError, match="no checkpoints"):
        export_checkpoint(exported, exported.parent / "other")


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ModelConfig.num_heads"):
        HybridLMConfig(num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="ModelConfig.moba_topk"):
        HybridLMConfig(moba_topk=0)
    config = HybridLMConfig(**MODEL)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (3, 4, 2)
    with pytest.raises(ValueError, match="input_ids"):
        HybridLMForCausalLM(config)(None)
