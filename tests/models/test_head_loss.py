"""The head and loss of the hybrid LM: ``head_loss`` against the logits formula, ``return_logits=False``,
and ``compile_head`` (traced on CPU with eager-running backends)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from flashmoba.models import HybridLM, model_config_from_preset
from tests.helpers import cu_seqlens

VOCAB = 37  # odd, and not a multiple of any tile size


def tiny_model(dtype=torch.float64) -> HybridLM:
    torch.manual_seed(5)
    config = model_config_from_preset(
        "tiny", vocab_size=VOCAB, window_size=8, moba_block_size=4, moba_topk=2, backend="reference"
    )
    return HybridLM(config).to(dtype)


def logits_formula_loss(model, x, targets, loss_weights=None):
    """The loss as the model computes it on its logits path: float32 logits, then cross-entropy."""
    logits = model.lm_head(model.final_norm(x)).float()
    flat_logits, flat_targets = logits.view(-1, logits.shape[-1]), targets.reshape(-1)
    if loss_weights is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
    per_token = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="none")
    scored = flat_targets != -100
    return (per_token * loss_weights.reshape(-1).float()).sum() / scored.sum().clamp(min=1)


def head_inputs(shape, hidden_size, dtype):
    """(x, targets with -100 at every fifth position, loss weights) of ``shape`` tokens."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(*shape, hidden_size, generator=generator, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, VOCAB, shape, generator=generator)
    targets.view(-1)[::5] = -100
    weights = torch.rand(shape, generator=generator) * 3
    return x, targets, weights


def loss_and_gradients(model, loss_function, inputs):
    """The loss and the gradients of x and of every parameter, from fresh gradients."""
    model.zero_grad(set_to_none=True)
    x = inputs[0].detach().requires_grad_(True)
    loss = loss_function(x, *inputs[1:])
    loss.backward()
    gradients = [x.grad] + [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    return loss.detach(), gradients


def assert_same(first, second, **tolerance):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    torch.testing.assert_close(loss_a, loss_b, **tolerance)
    assert len(grads_a) == len(grads_b)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, **tolerance)


@pytest.fixture
def fresh_dynamo():
    """Each compiling test starts with empty compile caches: the caches of ``_head_loss`` are shared by
    every model, and a test must not run into another's recompile limit (which would fall back to eager)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_head_loss_is_the_logits_formula(dtype, weighted):
    # Eager, head_loss runs the same operations as the logits path: bitwise the same loss and gradients.
    model = tiny_model(dtype)
    x, targets, weights = head_inputs((3, 29), model.config.hidden_size, dtype)
    inputs = (x, targets, weights if weighted else None)
    expected = loss_and_gradients(model, lambda *a: logits_formula_loss(model, *a), inputs)
    got = loss_and_gradients(model, model.head_loss, inputs)
    assert got[0].dtype == torch.float32
    assert_same(got, expected, rtol=0, atol=0)
    # Only the lm_head, the final norm and x receive gradients here.
    assert len(got[1]) == 3


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_return_logits_false_gives_no_logits_and_the_same_loss(packed, weighted):
    model = tiny_model().train()
    generator = torch.Generator().manual_seed(2)
    shape = (45,) if packed else (3, 15)
    ids = torch.randint(0, VOCAB, shape, generator=generator)
    targets = torch.randint(0, VOCAB, shape, generator=generator)
    targets.view(-1)[[0, 7, 44]] = -100
    keywords = dict(targets=targets)
    if packed:
        keywords["cu_seqlens"] = cu_seqlens([12, 18, 15])
    if weighted:
        keywords["loss_weights"] = torch.rand(shape, generator=generator) * 3

    def full_model_loss(return_logits):
        model.zero_grad(set_to_none=True)
        logits, loss = model(ids, **keywords, return_logits=return_logits)
        loss.backward()
        return logits, loss.detach(), [parameter.grad for parameter in model.parameters()]

    logits, loss, gradients = full_model_loss(return_logits=True)
    no_logits, loss_alone, gradients_alone = full_model_loss(return_logits=False)
    assert logits.shape == (*shape, VOCAB) and logits.dtype == torch.float32
    assert no_logits is None
    assert_same((loss_alone, gradients_alone), (loss, gradients), rtol=0, atol=0)


def test_return_logits_errors():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 9))
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        model(ids, return_logits=False)
    with pytest.raises(TypeError, match="return_logits must be a bool"):
        model(ids, targets=ids, return_logits="False")


@pytest.mark.parametrize("weighted", [False, True])
def test_compiled_head_gives_the_same_loss_and_gradients(fresh_dynamo, weighted):
    # aot_eager: Dynamo traces head_loss whole (fullgraph) and AOTAutograd builds its forward and
    # backward graphs, run eagerly (no C++ compiler needed).
    model = tiny_model(torch.float32)
    x, targets, weights = head_inputs((2, 23), model.config.hidden_size, torch.float32)
    inputs = (x, targets, weights if weighted else None)
    expected = loss_and_gradients(model, model.head_loss, inputs)
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_head(backend=counter, fullgraph=True)
    got = loss_and_gradients(model, model.head_loss, inputs)
    assert counter.frame_count == 1
    assert_same(got, expected, rtol=1e-6, atol=1e-6)
    # The parameters and checkpoints are unchanged by compiling.
    assert set(model.state_dict()) == set(tiny_model(torch.float32).state_dict())


def test_compiled_head_through_forward_with_packed_documents(fresh_dynamo):
    model = tiny_model(torch.float32).train()
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (45,), generator=generator)
    targets = torch.randint(0, VOCAB, (45,), generator=generator)
    targets[[3, 30]] = -100
    keywords = dict(targets=targets, cu_seqlens=cu_seqlens([12, 18, 15]), loss_weights=torch.rand(45) * 3)

    def full_model_loss():
        model.zero_grad(set_to_none=True)
        logits, loss = model(ids, **keywords, return_logits=False)
        loss.backward()
        assert logits is None
        return loss.detach(), [parameter.grad for parameter in model.parameters()]

    expected = full_model_loss()
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_head(backend=counter, fullgraph=True)
    assert_same(full_model_loss(), expected, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
    # The logits path stays eager.
    logits, _ = model(ids, **keywords)
    assert logits.dtype == torch.float32 and counter.frame_count == 1


def test_compiled_head_saves_no_float32_logits(fresh_dynamo):
    # Under bf16 autocast the eager head saves float32 [tokens, vocab] tensors for backward; with
    # Inductor's decompositions and partitioner (aot_eager_decomp_partition: Inductor's graphs, run
    # eagerly) only the bf16 logits are saved.
    model = tiny_model(torch.float32)
    x, targets, _ = head_inputs((3, 29), model.config.hidden_size, torch.float32)
    tokens = targets.numel()

    def saved_for_backward():
        saved = []

        def pack(tensor):
            saved.append((tuple(tensor.shape), tensor.dtype))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model.head_loss(x, targets)
        loss.backward()
        return saved

    assert ((tokens, VOCAB), torch.float32) in saved_for_backward()
    model.compile_head(backend="aot_eager_decomp_partition", fullgraph=True)
    saved = saved_for_backward()
    assert ((tokens, VOCAB), torch.bfloat16) in saved
    assert ((tokens, VOCAB), torch.float32) not in saved


def test_a_deep_copy_of_a_compiled_model_uses_its_own_weights(fresh_dynamo):
    model = tiny_model(torch.float32)
    model.compile_head(backend="aot_eager")
    x, targets, _ = head_inputs((2, 7), model.config.hidden_size, torch.float32)
    original = model.head_loss(x, targets)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.lm_head.weight.mul_(2.0)
    torch.testing.assert_close(copied.head_loss(x, targets), logits_formula_loss(copied, x, targets))
    torch.testing.assert_close(model.head_loss(x, targets), original)
    assert not torch.allclose(copied.head_loss(x, targets), original)
