"""The model benchmark library (flashmoba.bench.model) on CPU: FLOP formula by hand, kernel classes,
the idle time of a profiled step from synthetic kernel intervals, and one measured row."""

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from flashmoba.bench import model as bench_model
from flashmoba.models.hybrid import HybridLM, ModelConfig

# 2 layers (0: sliding window 3, 1: global), hidden 8 = 2 heads x 4, MLP 16, vocab 10
TINY = dict(
    vocab_size=10,
    num_layers=2,
    hidden_size=8,
    num_heads=2,
    num_kv_heads=2,
    head_dim=4,
    mlp_hidden_size=16,
    window_size=3,
    moba_block_size=2,
    moba_topk=2,
)


def test_attention_pairs_by_hand():
    # N = 8. dense: 1 + 2 + ... + 8. sliding W = 3: 1 + 2 + 3 * 6.
    assert bench_model.attention_pairs("dense", 8) == 36
    assert bench_model.attention_pairs("sliding", 8, window=3) == 21
    # MoBA B = 2, k = 2: block 0 sees itself causally (1 + 2); blocks 1..3: one earlier block (2 keys)
    # plus their own causally: (2 + 1) + (2 + 2) = 7 each.
    assert bench_model.attention_pairs("moba", 8, block_size=2, topk=2) == 3 + 3 * 7
    # window longer than the sequence: dense
    assert bench_model.attention_pairs("sliding", 5, window=64) == 15
    with pytest.raises(ValueError, match="kind"):
        bench_model.attention_pairs("sparse", 8)


@pytest.mark.parametrize(
    "seqlen, block_size, topk", [(8, 2, 2), (13, 4, 2), (13, 4, 9), (7, 8, 3), (64, 8, 3)]
)
def test_moba_pairs_count_each_query(seqlen, block_size, topk):
    """Independently per query: its own block causally, min(topk - 1, earlier blocks) whole blocks."""
    expected = 0
    for query in range(seqlen):
        own = query // block_size
        expected += (query - own * block_size + 1) + min(topk - 1, own) * block_size
    assert bench_model.attention_pairs("moba", seqlen, block_size=block_size, topk=topk) == expected
    # topk at least the number of blocks: every earlier key, i.e. dense
    blocks = -(-seqlen // block_size)
    assert bench_model.attention_pairs("moba", seqlen, block_size=block_size, topk=blocks) == (
        bench_model.attention_pairs("dense", seqlen)
    )


def test_model_flops_by_hand():
    config = ModelConfig(**TINY, global_attention="moba")
    model = HybridLM(config)
    # per layer: q, k, v, o 4 * 8 * 8 = 256; SwiGLU 3 * 8 * 16 = 384; two norms 16 -> 656; two layers
    # 1312, final norm 8, output head 10 * 8 = 80 (the input embedding is a lookup and does not count)
    assert bench_model.matmul_parameters(model) == 1400
    tokens = 8 * 2
    # attention: 3 (fwd + bwd) * 4 * head_dim 4 * heads 2 = 96 FLOPs per pair, batch 2
    sliding, moba, dense = 96 * 21 * 2, 96 * 24 * 2, 96 * 36 * 2
    assert bench_model.model_flops_per_step(config, 1400, 8, 2) == 6 * 1400 * tokens + sliding + moba
    dense_config = ModelConfig(**TINY, global_attention="dense")
    assert bench_model.model_flops_per_step(dense_config, 1400, 8, 2) == 6 * 1400 * tokens + sliding + dense


def test_matmul_parameters_tied_head_counts_once():
    model = HybridLM(ModelConfig(**TINY, tie_embeddings=True))
    assert bench_model.matmul_parameters(model) == 1400


@pytest.mark.parametrize(
    "name, kind",
    [
        ("_moba_fwd_partial_kernel", "attention"),
        ("_moba_bwd_dkdv_kernel", "attention"),
        ("_route_topk_kernel", "attention"),
        ("_block_centroids_kernel", "attention"),
        ("_block_table_kernel", "attention"),
        ("_sort_keys_kernel", "attention"),
        (
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
            "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, true>",
            "attention",
        ),
        ("void flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits<64, 128, 128, 8>>", "attention"),
        (
            "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)",
            "attention",
        ),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1", "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_cublas", "matmul"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmul"),
        ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "matmul"),
        (
            "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>",
            "matmul",
        ),
        ("void gemv2T_kernel_val<int, int, float, float, float, 128, 16, 2, 2, false>", "matmul"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
        ("void at::native::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>", "other"),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "other"),
        ("void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor<float, 4>>", "other"),
        ("Memcpy HtoD (Pageable -> Device)", "other"),
    ],
)
def test_classify_kernel(name, kind):
    assert bench_model.classify_kernel(name) == kind


def test_union_length():
    assert bench_model.union_length([]) == 0
    # [0, 3] from two overlapping, [5, 6] containing [5.5, 5.7], an empty one
    assert bench_model.union_length([(5, 6), (1, 3), (0, 2), (5.5, 5.7), (10, 10)]) == pytest.approx(4)
    assert bench_model.union_length([(0, 4), (1, 2), (2, 3)]) == 4  # nested
    assert bench_model.union_length([(0, 1), (1, 2)]) == 2  # touching


def test_kernel_split_idle_is_the_window_minus_the_union():
    kernels = [
        ("_moba_fwd_partial_kernel", 0, 2000),
        ("nvjet_tst_128x256", 1000, 3000),  # overlaps the attention kernel (another stream)
        ("void at::native::elementwise_kernel", 5000, 6000),
        ("void at::native::elementwise_kernel", 9000, 12000),  # clipped to the window's end
        ("nvjet_tst_128x256", 11000, 12000),  # outside the window
    ]
    split = bench_model.kernel_split(kernels, (0, 10000))
    top_kernels = split.pop("top_kernels")
    assert split == pytest.approx(
        dict(
            attention_ms=2.0,
            matmul_ms=2.0,
            other_ms=2.0,
            idle_ms=5.0,
            busy_ms=5.0,
            profiled_step_ms=10.0,
            flashmoba_ms=2.0,
        )
    )
    # Heaviest first, launches and time within the window: the two elementwise launches add to 2 ms.
    assert top_kernels == [
        ["_moba_fwd_partial_kernel", "attention", 1, pytest.approx(2.0)],
        ["nvjet_tst_128x256", "matmul", 1, pytest.approx(2.0)],
        ["void at::native::elementwise_kernel", "other", 2, pytest.approx(2.0)],
    ]


def _event(name, device_type, start, end, annotation=False):
    return SimpleNamespace(
        name=name,
        device_type=device_type,
        is_user_annotation=annotation,
        time_range=SimpleNamespace(start=start, end=end),
    )


def test_device_kernels_and_step_window_from_events():
    events = [
        _event(bench_model.STEP_RANGE, DeviceType.CPU, 10, 110, annotation=True),
        _event(bench_model.STEP_RANGE, DeviceType.CUDA, 12, 100, annotation=True),  # GPU mirror: no kernel
        _event("aten::mm", DeviceType.CPU, 20, 30),
        _event("nvjet_tst_128x256", DeviceType.CUDA, 40, 60),
    ]
    assert bench_model.device_kernels(events) == [("nvjet_tst_128x256", 40, 60)]
    assert bench_model.step_window(events) == (10, 110)
    with pytest.raises(RuntimeError, match="no 'flashmoba_bench_step'"):
        bench_model.step_window(events[2:])


def test_real_cpu_profile_has_no_device_kernels():
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        with record_function(bench_model.STEP_RANGE):
            torch.ones(4, 4) @ torch.ones(4, 4)
    events = profiler.events()
    assert bench_model.device_kernels(events) == []
    start, end = bench_model.step_window(events)
    assert end > start
    assert bench_model.profiled_split(lambda: None, torch.device("cpu")) is None


def test_peak_bf16_flops():
    assert bench_model.peak_bf16_flops("NVIDIA H200") == 989e12
    assert bench_model.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_model.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert bench_model.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench_model.peak_bf16_flops("NVIDIA GeForce RTX 4090") is None
    assert bench_model.peak_bf16_flops("cpu") is None


def test_train_step_updates_the_weights():
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**TINY))
    from flashmoba.training.config import TrainConfig
    from flashmoba.training.loop import make_optimizer

    optimizer = make_optimizer(model, TrainConfig())
    batch = bench_model.synthetic_batch(10, 8, 2, device)
    assert batch["input_ids"].shape == (16,) and batch["cu_seqlens"].tolist() == [0, 8, 16]
    before = model.lm_head.weight.detach().clone()
    bench_model.make_train_step(model, optimizer, batch, device, grad_clip=1.0)()
    assert not torch.equal(before, model.lm_head.weight)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("compile_mode, marks", [(None, 0), ("default", 0), ("reduce-overhead", 2)])
def test_train_step_begins_an_iteration_of_the_cuda_graphs_as_train_step_does(
    compile_mode, marks, monkeypatch
):
    # With CUDA graphs (reduce-overhead) every step marks a new iteration of the blocks' graphs, as
    # training.loop.train_step does; the blocks run eagerly here (the mark is all that is checked).
    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    device = torch.device("cpu")
    model = HybridLM(ModelConfig(**TINY))
    from flashmoba.training.config import TrainConfig
    from flashmoba.training.loop import make_optimizer

    optimizer = make_optimizer(model, TrainConfig())
    batch = bench_model.synthetic_batch(10, 8, 2, device)
    step = bench_model.make_train_step(model, optimizer, batch, device, 1.0, compile_mode)
    step()
    step()
    assert len(calls) == marks


@pytest.mark.parametrize("attention", ["dense", "moba"])
def test_measure_model_on_cpu(attention):
    moba = dict(block_size=32, topk=2) if attention == "moba" else {}
    row = bench_model.measure_model(
        "tiny", 64, attention, steps=2, warmup=1, device="cpu", backend="reference", **moba
    )
    assert tuple(row) == bench_model.ROW_FIELDS
    assert row["card"] == "cpu" and row["preset"] == "tiny" and row["seqlen"] == 64
    assert row["tokens_per_s"] > 0 and row["step_ms"] > 0
    assert row["tokens_per_s"] == pytest.approx(64 / (row["step_ms"] / 1e3))
    assert row["host_ms"] == row["step_ms"]  # on CPU the whole step is the host's
    assert all(row[field] is None for field in (*bench_model.SPLIT_FIELDS, "profiled_step_ms"))
    assert row["peak_gib"] is None and row["mfu"] is None
    assert row["model_tflop_per_step"] > 0
    assert (row["block_size"], row["topk"]) == ((32, 2) if attention == "moba" else (None, None))
    # The MoBA kernels' rows_per_item: KernelConfig's default unless given; none for dense.
    from flashmoba.ops import KernelConfig  # imports Triton

    assert row["rows_per_item"] == (KernelConfig().rows_per_item if attention == "moba" else None)


def test_dense_kernel_is_checked_and_recorded():
    run = dict(steps=1, warmup=1, device="cpu", backend="reference")
    with pytest.raises(ValueError, match="dense_kernel must be one of"):
        bench_model.measure_model("tiny", 32, "dense", dense_kernel="flash", **run)
    with pytest.raises(ValueError, match="dense_kernel 'cudnn' needs a CUDA device"):
        bench_model.measure_model("tiny", 32, "dense", dense_kernel="cudnn", **run)
    assert bench_model.measure_model("tiny", 32, "dense", **run)["dense_kernel"] == "flash_varlen"
    # MoBA rows have no dense layers: whatever the setting, they record none.
    moba = dict(block_size=16, topk=2, **run)
    assert bench_model.measure_model("tiny", 32, "moba", dense_kernel="cudnn", **moba)["dense_kernel"] is None


def test_cudnn_dense_kernel_takes_the_global_layers_off_flash_varlen_and_allows_only_cudnn():
    model = HybridLM(ModelConfig(**TINY, global_attention="dense"))
    seen = []

    def step():
        seen.append(
            (
                torch.backends.cuda.cudnn_sdp_enabled(),
                torch.backends.cuda.flash_sdp_enabled(),
                torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.math_sdp_enabled(),
            )
        )

    assert bench_model.on_dense_kernel(model, step, "flash_varlen") is step
    assert all(block.attn.use_flash_varlen for block in model.blocks)
    bench_model.on_dense_kernel(model, step, "cudnn")()
    assert seen == [(True, False, False, False)]
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the step
    # The global (dense) layer leaves flash varlen; the sliding-window layer keeps it.
    assert [(block.attn.attention, block.attn.use_flash_varlen) for block in model.blocks] == [
        ("sliding", True),
        ("dense", False),
    ]


def test_head_is_compiled_where_the_blocks_are(monkeypatch):
    """As in training: blocks compiled in reduce-overhead give a head compiled in default mode (no CUDA
    graphs); ``compile_head=False`` keeps it eager; on CPU, with eager blocks, it stays eager."""
    compiled = []
    monkeypatch.setattr(HybridLM, "compile_blocks", lambda self, **options: None)
    monkeypatch.setattr(HybridLM, "compile_head", lambda self, **options: compiled.append(options))
    run = dict(steps=1, warmup=1, device="cpu", backend="reference")
    row = bench_model.measure_model("tiny", 32, "dense", compile_blocks=True, **run)
    assert row["compile_mode"] == "reduce-overhead" and row["head_compile_mode"] == "default"
    assert compiled == [dict(mode="default")]
    row = bench_model.measure_model("tiny", 32, "dense", compile_blocks=True, compile_head=False, **run)
    assert row["head_compile_mode"] is None and len(compiled) == 1
    row = bench_model.measure_model("tiny", 32, "dense", **run)
    assert row["compile_mode"] is None and row["head_compile_mode"] is None and len(compiled) == 1
    with pytest.raises(ValueError, match="compile_head needs compiled blocks"):
        bench_model.measure_model("tiny", 32, "dense", compile_head=True, **run)


def test_moba_row_and_its_kernel_benchmark_take_one_kernel_config(monkeypatch):
    """rows_per_item reaches the model's MoBA layers, the row, and the kernel-only benchmark (CUDA only:
    stood in for here, as is the profiled split that triggers it)."""
    from flashmoba.ops import KernelConfig  # imports Triton

    split = dict(
        attention_ms=0.5,
        matmul_ms=0.25,
        other_ms=0.25,
        idle_ms=0.0,
        busy_ms=1.0,
        profiled_step_ms=2.0,
        flashmoba_ms=0.5,
        top_kernels=[],
    )
    monkeypatch.setattr(bench_model, "profiled_split", lambda step, device: dict(split))
    model_configs, bench_configs = [], []
    set_kernel_config = HybridLM.set_kernel_config

    def recording_set_kernel_config(model, config):
        model_configs.append(config)
        set_kernel_config(model, config)

    def kernel_bench(config, seqlen, batch, kernel_config=None):
        bench_configs.append(kernel_config)
        return 1.5

    monkeypatch.setattr(HybridLM, "set_kernel_config", recording_set_kernel_config)
    monkeypatch.setattr(bench_model, "moba_kernel_bench_ms", kernel_bench)
    row = bench_model.measure_model(
        "tiny", 64, "moba", block_size=32, topk=2, rows_per_item=48, steps=1, warmup=1, backend="reference"
    )
    assert model_configs == bench_configs == [KernelConfig(rows_per_item=48)]
    assert row["rows_per_item"] == 48 and row["kernel_bench_ms"] == 1.5
    assert row["moba_layer_ms"] == pytest.approx(0.5 / 2)  # two MoBA layers in the tiny preset


def test_idle_is_taken_against_the_unprofiled_step(monkeypatch):
    """Profiling slows the launches, not the kernels: idle = median step - union of profiled kernels."""
    split = dict(
        attention_ms=0.5,
        matmul_ms=0.25,
        other_ms=0.25,
        idle_ms=99.0,
        busy_ms=1.0,
        profiled_step_ms=100,
        flashmoba_ms=0.0,
        top_kernels=[["sdpa_kernel", "attention", 4, 0.5]],
    )
    monkeypatch.setattr(bench_model, "profiled_split", lambda step, device: dict(split))
    row = bench_model.measure_model("tiny", 64, "dense", steps=2, warmup=1, device="cpu")
    assert row["idle_ms"] == pytest.approx(max(row["step_ms"] - 1.0, 0.0))
    assert row["profiled_step_ms"] == 100 and row["attention_ms"] == 0.5 and "busy_ms" not in row
    assert row["top_kernels"] == split["top_kernels"] and row["moba_layer_ms"] is None
