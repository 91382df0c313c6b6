"""GPU checks of the model side (skipped without CUDA): flash varlen paths, Triton MoBA in the layer,
bf16 training."""

import time
import warnings

import pytest
import torch

from flashmoba.models import HybridLM, model_config_from_preset
from flashmoba.nn import KeyConv, MoBAAttention, PackedSequences
from flashmoba.nn import attention as attention_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CU_SEQLENS = [0, 700, 701, 2900, 4096, 8000]


def packed_input(hidden=256, dtype=torch.bfloat16, bounds=CU_SEQLENS):
    torch.manual_seed(0)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    x = torch.randn(bounds[-1], hidden, device="cuda", dtype=dtype, requires_grad=True)
    return x, cu_seqlens


def run_layer(layer, x, cu_seqlens, use_flash_varlen):
    previous = layer.use_flash_varlen
    layer.use_flash_varlen = use_flash_varlen
    try:
        x = x.detach().requires_grad_(True)
        out = layer(x, cu_seqlens)
        out.float().square().mean().backward()
        return out.detach().float(), x.grad.float()
    finally:
        layer.use_flash_varlen = previous


@pytest.mark.parametrize("attention", ["dense", "sliding"])
def test_flash_varlen_path_matches_the_sdpa_path(attention):
    layer = MoBAAttention(
        256, 4, 2, 64, attention=attention, window_size=256, rope=attention == "sliding"
    ).cuda()
    x, cu_seqlens = packed_input()
    found = attention_module._flash_varlen_function()
    if found is None or (attention == "sliding" and "window_size" not in found[1]):
        pytest.skip("this PyTorch has no flash varlen attention (with window)")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_flash, grad_flash = run_layer(layer, x, cu_seqlens, True)
        out_sdpa, grad_sdpa = run_layer(layer, x, cu_seqlens, False)
    assert (out_flash - out_sdpa).abs().max() < 2e-2 * out_sdpa.abs().max()
    assert (grad_flash - grad_sdpa).abs().max() < 5e-2 * grad_sdpa.abs().max()


def test_dense_layer_on_cudnn_alone_matches_flash_varlen():
    # The kernel `flashmoba bench model --dense-kernels cudnn` times (bench.model.on_dense_kernel): SDPA
    # per document with cuDNN the only backend, against the flash varlen path of training.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if attention_module._flash_varlen_function() is None:
        pytest.skip("this PyTorch has no flash varlen attention")
    layer = MoBAAttention(256, 4, 4, 64, attention="dense").cuda()
    # Ragged documents, none of one token (cuDNN found no kernel for CU_SEQLENS's 1-token document,
    # 2026-12-03): the bench's documents are whole rows of thousands of tokens.
    x, cu_seqlens = packed_input(bounds=[0, 1000, 3048, 8192])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_flash, grad_flash = run_layer(layer, x, cu_seqlens, True)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out_cudnn, grad_cudnn = run_layer(layer, x, cu_seqlens, False)
            except RuntimeError as error:  # SDPA says why in its warnings
                raise AssertionError(f"{error}; warnings: {[str(w.message) for w in caught]}") from error
    assert (out_flash - out_cudnn).abs().max() < 2e-2 * out_flash.abs().max()
    assert (grad_flash - grad_cudnn).abs().max() < 5e-2 * grad_flash.abs().max()


def test_triton_moba_layer_matches_the_reference_layer():
    torch.manual_seed(1)
    layer = MoBAAttention(256, 4, 2, 64, attention="moba", block_size=128, topk=4, kconv_size=3).cuda()
    x, cu_seqlens = packed_input()
    results = {}
    for backend in ("triton", "reference"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            results[backend] = run_layer(layer, x, cu_seqlens, True)
    (out_t, grad_t), (out_r, grad_r) = results["triton"], results["reference"]
    assert (out_t - out_r).abs().max() < 3e-2 * out_r.abs().max()
    assert (grad_t - grad_r).abs().max() < 5e-2 * grad_r.abs().max()


def test_keyconv_on_cuda_bf16():
    conv = KeyConv(128, 5, init="zeros").cuda()
    packed = PackedSequences(torch.tensor(CU_SEQLENS, dtype=torch.int32, device="cuda"))
    k = torch.randn(CU_SEQLENS[-1], 128, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(conv(k, packed.cu_seqlens), k)
    torch.nn.init.normal_(conv.weight)
    out = conv(k, packed.cu_seqlens)
    for start, end in zip(CU_SEQLENS[:-1], CU_SEQLENS[1:]):
        assert torch.equal(out[start:end], conv(k[start:end].unsqueeze(0))[0])


def test_small_model_trains_in_bf16_with_triton_and_reports_speed():
    torch.manual_seed(0)
    results = {}
    for global_attention, flash_varlen in (
        ("moba", False),
        ("dense", False),
        ("moba", True),
        ("dense", True),
    ):
        model = HybridLM(
            model_config_from_preset(
                "small", global_attention=global_attention, kconv_size=3, use_flash_varlen=flash_varlen
            )
        ).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, 256, (16 * 4096 + 1,), device="cuda")
        cu_seqlens = torch.tensor([0, 3000, 8192, 20000, 40000, 65536], dtype=torch.int32, device="cuda")
        losses = []
        for step in range(25):
            if step == 5:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(ids[:-1], ids[1:], cu_seqlens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        torch.cuda.synchronize()
        results[f"{global_attention} (flash varlen {flash_varlen})"] = (
            20 * 65536 / (time.perf_counter() - start)
        )
        assert losses[-1] < losses[0]  # memorises the fixed batch
    print(
        f"\nsmall preset fwd+bwd+step, 64K packed tokens, {torch.cuda.get_device_name()}: "
        + ", ".join(f"{k} {v / 1e3:.0f}K tokens/s" for k, v in results.items())
    )


@pytest.mark.parametrize("global_attention", ["moba", "dense"])
def test_compiled_training_follows_the_eager_loss_curve(global_attention):
    """The default training path (blocks, head and loss compiled, fused AdamW, offsets on the host) against
    eager blocks and the same optimizer: the same weights and batches give the same losses within bf16 noise.

    The batch repeats 64 distinct tokens, so that 12 steps learn it (random tokens barely move the loss in
    12 steps, which would leave the curve flat and the comparison weak); the first loss (same weights, same
    batch) shows the forward's numerics alone, the rest the training's (bf16 noise grows along the curve)."""
    from flashmoba.training.config import TrainConfig
    from flashmoba.training.loop import build_model

    cu_seqlens = torch.tensor([0, 3000, 8192, 9000, 16384], dtype=torch.int32)  # on the host, as trained
    period = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64]
    ids = period.repeat(16384 // 64 + 1)[: 16384 + 1].cuda()
    curves = {}
    for compiled in (True, False):
        config = TrainConfig(
            preset="small",
            model=model_config_from_preset("small", global_attention=global_attention, kconv_size=3),
            compile_blocks=compiled,
            lr=1e-3,
        )
        model, wrapped, optimizer = build_model(config, torch.device("cuda"))
        assert optimizer.defaults["fused"]
        losses = []
        for _ in range(12):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                # As training's batch_loss: the loss alone, from the head and loss compiled with the blocks.
                _, loss = wrapped(ids[:-1], ids[1:], cu_seqlens, 8192, return_logits=False)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        curves[compiled] = torch.tensor(losses)
    difference = (curves[True] - curves[False]).abs()
    print(f"\ncompiled {curves[True].tolist()}\neager {curves[False].tolist()}")
    assert float(curves[True][-1]) < float(curves[True][0]) - 1.0  # it learns the fixed batch
    assert float(difference[0]) < 1e-2
    assert bool((difference < 0.05 * curves[False]).all())


def test_flashmoba_train_default_path_follows_the_eager_run(tmp_path):
    """``train`` as a user runs it on one GPU (blocks compiled with CUDA graphs, packed batches of varying
    documents padded to static shapes, fused AdamW) against eager blocks: the same loss curve within bf16
    noise, and the validation loss too."""
    from flashmoba.training import train
    from flashmoba.training.config import TrainConfig

    runs = {}
    for compiled in (True, False):
        config = TrainConfig(
            preset="small",
            model=model_config_from_preset("small", kconv_size=3),
            seq_len=2048,
            batch_size=2,
            max_steps=12,
            out=str(tmp_path / f"compiled_{compiled}"),
            progress=False,
            compile_blocks=compiled,
        )
        runs[compiled] = train(config)
    compiled_losses = torch.tensor([row["loss"] for row in runs[True]])
    eager_losses = torch.tensor([row["loss"] for row in runs[False]])
    difference = float((compiled_losses - eager_losses).abs().max())
    print(f"\ncompiled - eager loss over 12 steps: max {difference:.2e}")
    assert difference < 3e-2
    assert abs(runs[True][-1]["val_loss"] - runs[False][-1]["val_loss"]) < 3e-2


def decode_model_and_prompt(global_attention: str):
    """A bf16 tiny model with GQA and the key convolution, and 3 prompts of 1000 tokens (not a multiple of
    its block size of 64), for the decode-mode tests."""
    config = model_config_from_preset(
        "tiny",
        global_attention=global_attention,
        moba_block_size=64,
        moba_topk=3,
        kconv_size=3,
        num_kv_heads=2,
    )
    torch.manual_seed(0)
    model = HybridLM(config).cuda().to(torch.bfloat16).eval()
    return model, torch.randint(config.vocab_size, (3, 1000), device="cuda")


@pytest.mark.parametrize("global_attention", ["moba", "dense"])
def test_cuda_graph_generation_replays_the_static_steps(global_attention):
    """generate(decode_mode="cuda_graph") captures one decode step and replays it: the same tokens as the
    static steps run eagerly (the same kernels on the same buffers), and logits within bf16 noise of the
    eager growing caches, on a bf16 model with GQA, the key convolution and a prompt that is not a multiple
    of the block size; then a reused cache after the graph starts where it should."""
    from flashmoba.models.generation import HybridCache, StaticDecoder

    model, prompt = decode_model_and_prompt(global_attention)
    static = model.generate(prompt, 40, decode_mode="static")
    graphed = model.generate(prompt, 40, decode_mode="cuda_graph")
    assert torch.equal(static, graphed)
    sequence = torch.cat([prompt, graphed], dim=1)
    with torch.no_grad():
        eager_cache, graph_cache = HybridCache(model, 3, 1040), HybridCache(model, 3, 1040)
        eager = [model.forward_with_cache(prompt, eager_cache)[:, -1].float()]
        model.forward_with_cache(prompt, graph_cache)
        decoder = StaticDecoder(model, graph_cache, cuda_graph=True)
        replayed = [eager[0]]
        for i in range(1000, 1039):
            eager.append(model.forward_with_cache(sequence[:, i : i + 1], eager_cache)[:, -1].float())
            replayed.append(decoder.step(sequence[:, i]).float().clone())
    assert decoder.graph is not None and decoder.length == 1039
    eager, replayed = torch.stack(eager), torch.stack(replayed)
    assert (replayed - eager).abs().max() < 3e-2 * eager.abs().max()


@pytest.mark.parametrize("global_attention", ["moba", "dense"])
def test_compiled_graph_generation_equals_the_static_steps(global_attention):
    """generate(decode_mode="compiled_graph"): the static step's forward compiled by Inductor (the MoBA
    layers' decode is the custom op flashmoba::moba_decode, so the forward is one graph), captured in a
    CUDA graph and replayed. Replays give the tokens of the compiled step run without a graph (the same
    kernels on the same buffers), bit for bit. Against the eager static steps, teacher-forced on their
    tokens, the logits agree within bf16 noise (Inductor keeps fused intermediates in float32 where eager
    rounds each op to bf16) and so does every greedy token whose top-2 margin is above that noise."""
    from flashmoba.models.generation import HybridCache, StaticDecoder

    torch._dynamo.reset()
    model, prompt = decode_model_and_prompt(global_attention)
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = model.generate(prompt, 40, decode_mode="compiled")
    assert not counters["graph_break"], dict(counters["graph_break"])  # the step is one graph
    graphed = model.generate(prompt, 40, decode_mode="compiled_graph")
    assert torch.equal(compiled, graphed)
    static = model.generate(prompt, 40, decode_mode="static")
    sequence = torch.cat([prompt, static], dim=1)
    with torch.no_grad():
        static_cache, graph_cache = HybridCache(model, 3, 1040), HybridCache(model, 3, 1040)
        first = model.forward_with_cache(prompt, static_cache)[:, -1].float()
        model.forward_with_cache(prompt, graph_cache)
        static_decoder = StaticDecoder(model, static_cache, cuda_graph=False)
        graph_decoder = StaticDecoder(model, graph_cache, cuda_graph=True, compile=True)
        expected, replayed = [first], [first]
        for i in range(1000, 1039):
            expected.append(static_decoder.step(sequence[:, i]).float())
            replayed.append(graph_decoder.step(sequence[:, i]).float().clone())
    assert graph_decoder.graph is not None and graph_decoder.length == 1039
    expected, replayed = torch.stack(expected), torch.stack(replayed)
    noise = (replayed - expected).abs().max()
    assert noise < 3e-2 * expected.abs().max()
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * noise
    assert clear.any(), "no greedy choice clear of the noise to compare"
    assert torch.equal(replayed.argmax(-1)[clear], expected.argmax(-1)[clear])
    assert torch.equal(expected.argmax(-1).T, static)  # the teacher-forced path is static's own
