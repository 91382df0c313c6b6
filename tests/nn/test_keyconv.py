"""KeyConv: values and gradients against a naive loop, identity at zero weights, causality, no leakage."""

import pytest
import torch
import torch.nn.functional as F

from flashmoba.nn import KeyConv


def naive_keyconv(k: torch.Tensor, weight: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """One token at a time: k'_t = k_t + SiLU(sum_l weight[:, W-1-l] * k_{t-l}) within each sequence."""
    kernel_size = weight.shape[1]
    out = torch.empty_like(k)
    start = 0
    for length in lengths:
        for t in range(length):
            acc = torch.zeros_like(k[0])
            for lag in range(kernel_size):
                if t - lag >= 0:
                    acc = acc + weight[:, kernel_size - 1 - lag] * k[start + t - lag]
            out[start + t] = k[start + t] + F.silu(acc)
        start += length
    return out


def random_conv(channels: int, kernel_size: int) -> KeyConv:
    conv = KeyConv(channels, kernel_size).double()
    with torch.no_grad():
        conv.weight.normal_()
    return conv


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_packed_matches_naive_loop_values_and_gradients(kernel_size):
    torch.manual_seed(0)
    lengths = [1, 2, 7, 4, 11]  # sequences shorter than the kernel too
    channels = 6
    conv = random_conv(channels, kernel_size)
    k = torch.randn(sum(lengths), channels, dtype=torch.float64, requires_grad=True)
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)

    out = conv(k, cu_seqlens)
    expected = naive_keyconv(k, conv.weight, lengths)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (k, conv.weight), grad_out)
    expected_grads = torch.autograd.grad(expected, (k, conv.weight), grad_out)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_batched_matches_naive_loop_and_gradcheck():
    torch.manual_seed(1)
    conv = random_conv(4, 3)
    k = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    out = conv(k)
    for row in range(2):
        torch.testing.assert_close(out[row], naive_keyconv(k[row], conv.weight, [9]), rtol=1e-12, atol=1e-12)
    weight = conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda k_, w_: torch.func.functional_call(conv, {"weight": w_}, (k_,)), (k, weight)
    )


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_zero_weights_are_exactly_the_identity(kernel_size):
    conv = KeyConv(8, kernel_size, init="zeros")
    k = torch.randn(3, 17, 8)
    assert torch.equal(conv(k), k)
    cu_seqlens = torch.tensor([0, 5, 20, 51], dtype=torch.int32)
    packed = torch.randn(51, 8, dtype=torch.bfloat16)
    assert torch.equal(conv(packed, cu_seqlens), packed)
    with torch.no_grad():
        conv.weight.zero_()  # a default-initialised module zeroed by hand
    assert torch.equal(conv(k), k)


def test_causal_later_tokens_never_change_earlier_outputs():
    torch.manual_seed(2)
    conv = random_conv(5, 5)
    k = torch.randn(1, 20, 5, dtype=torch.float64)
    changed = k.clone()
    changed[:, 12:] = torch.randn(1, 8, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(k)[:, :12], conv(changed)[:, :12], rtol=0, atol=0)
    # The gradient of an output reaches back at most kernel_size - 1 tokens.
    k.requires_grad_(True)
    (grad,) = torch.autograd.grad(conv(k)[0, 10].sum(), k)
    touched = grad[0].abs().sum(-1) != 0
    assert touched.nonzero().flatten().tolist() == [6, 7, 8, 9, 10]


def test_packed_sequences_never_leak_into_each_other():
    torch.manual_seed(3)
    conv = random_conv(4, 5)
    lengths = [6, 3, 9]
    cu_seqlens = torch.tensor([0, 6, 9, 18], dtype=torch.int32)
    k = torch.randn(18, 4, dtype=torch.float64)
    packed_out = conv(k, cu_seqlens)
    for start, length in zip([0, 6, 9], lengths):
        alone = conv(k[start : start + length].unsqueeze(0))[0]
        torch.testing.assert_close(packed_out[start : start + length], alone, rtol=0, atol=0)
    # Changing one sequence leaves the others bit-for-bit unchanged.
    other = k.clone()
    other[6:9] += 100.0
    changed = conv(other, cu_seqlens)
    assert torch.equal(changed[:6], packed_out[:6]) and torch.equal(changed[9:], packed_out[9:])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="kernel_size"):
        KeyConv(4, 0)
    with pytest.raises(ValueError, match="channels"):
        KeyConv(0, 3)
    conv = KeyConv(4, 3)
    with pytest.raises(ValueError, match="channels"):
        conv(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="cu_seqlens"):
        conv(torch.randn(2, 5, 4), torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        conv(torch.randn(10, 4), torch.tensor([0, 4, 8], dtype=torch.int32))  # does not end at the total


def test_flash_attn_style_batch_of_one_with_cu_seqlens():
    conv = random_conv(4, 3)
    cu_seqlens = torch.tensor([0, 3, 10], dtype=torch.int32)
    k = torch.randn(10, 4, dtype=torch.float64)
    torch.testing.assert_close(conv(k.unsqueeze(0), cu_seqlens)[0], conv(k, cu_seqlens), rtol=0, atol=0)
