"""Decode with a KV cache on a GPU (flashmoba.ops.decode) at serving sizes, in bf16 (skipped without CUDA).

The oracle is the reference backend on the same bf16 inputs: it routes on the same bf16-rounded centroids
and computes in float32, so both sides differ only by float32 summation order before one bf16 rounding of
o. Caches hold NaN wherever no key was written and unused block_table entries are -1, so a read past a
sequence's length or of a page it does not own shows up; scratch the library allocates with torch.empty is
NaN-poisoned (``poison_empty``). The CUDA-graph test captures a whole decode step (append + route +
attend + advancing the lengths) and replays it against eager steps on a twin cache.
"""

from __future__ import annotations

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU tests need CUDA", allow_module_level=True)

import flashmoba  # noqa: E402
from flashmoba import kvcache, reference  # noqa: E402
from flashmoba.ops import decode  # noqa: E402
from flashmoba.ops.utils import supports_pdl  # noqa: E402

DEVICE = "cuda"
BLOCK, TOPK, HEADS_Q, HEADS_KV, HEAD_DIM = 128, 8, 32, 8, 128
CAPACITY = 32768
# bf16 outputs (|o| <~ 0.3 for unit values over >= 128 keys) rounded once on each side: within a few ulps.
OUT_TOLERANCE = dict(atol=4e-3, rtol=2e-2)
LSE_TOLERANCE = dict(atol=2e-3, rtol=1e-4)  # float32 on both sides
DECODE_SM_COUNT = torch.cuda.get_device_properties(0).multi_processor_count


class DecodeState:
    """Caches of a batch on the GPU: the first ``lengths[b]`` positions of sequence b hold keys, NaN the
    rest; paged with shuffled pages of one block each when ``paged``."""

    def __init__(self, lengths, paged, dtype=torch.bfloat16, seed=0, heads_kv=HEADS_KV, head_dim=HEAD_DIM):
        generator = torch.Generator(device=DEVICE).manual_seed(seed)
        self.generator, self.dtype = generator, dtype
        self.batch = len(lengths)
        if paged:
            max_pages = CAPACITY // BLOCK
            num_pages = self.batch * max_pages + 5
            order = torch.randperm(num_pages, generator=generator, device=DEVICE)[: self.batch * max_pages]
            self.block_table = order.view(self.batch, max_pages).to(torch.int32)
            shape = (num_pages, BLOCK, heads_kv, head_dim)
        else:
            self.block_table = None
            shape = (self.batch, CAPACITY, heads_kv, head_dim)
        self.k_cache = torch.full(shape, math.nan, dtype=dtype, device=DEVICE)
        self.v_cache = torch.full(shape, math.nan, dtype=dtype, device=DEVICE)
        for b, length in enumerate(lengths):
            positions = torch.arange(length, device=DEVICE)
            index = self.index(b, positions)
            self.k_cache[index] = self.randn(length, heads_kv, head_dim)
            self.v_cache[index] = self.randn(length, heads_kv, head_dim)
        if paged:  # entries past the pages a sequence will use (after one chunk of 512) are never read
            for b, length in enumerate(lengths):
                self.block_table[b, -(-(length + 512) // BLOCK) :] = -1
        self.cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        self.block_sums = flashmoba.kvcache_block_sums(
            self.k_cache, self.cache_seqlens, BLOCK, block_table=self.block_table
        )

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.generator, device=DEVICE, dtype=torch.float32).to(
            self.dtype
        )

    def index(self, b, positions):
        if self.block_table is None:
            return b, positions
        return self.block_table[b].long()[positions // BLOCK], positions % BLOCK

    def clone(self):
        twin = object.__new__(DecodeState)
        twin.__dict__.update(self.__dict__)
        for name in ("k_cache", "v_cache", "block_sums", "cache_seqlens"):
            setattr(twin, name, getattr(self, name).clone())
        return twin

    def step(self, q, k, v, backend):
        return flashmoba.moba_attn_with_kvcache(
            q,
            self.k_cache,
            self.v_cache,
            self.block_sums,
            self.cache_seqlens,
            BLOCK,
            TOPK,
            k=k,
            v=v,
            block_table=self.block_table,
            backend=backend,
            return_lse=True,
        )


def selections_agree(state, q, lengths):
    """[batch, seqlen_q, heads_q] bool: where the Triton router's selection (``decode_route`` on the
    state's block sums) equals the reference's (``reference._route_chunk`` on the same sums). Both score in
    float32 in another order, so a near-tie may go either way; outputs are compared where they agree."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    max_blocks = state.block_sums.shape[1]
    tiles = decode.decode_tiles(
        head_dim,
        BLOCK,
        TOPK,
        max_blocks,
        batch * seqlen_q * heads_q,
        heads_q // HEADS_KV,
        seqlen_q,
        DECODE_SM_COUNT,
    )
    selected = decode.decode_route(q, state.block_sums, lengths, BLOCK, TOPK, 0, tiles)
    agree = torch.ones(batch, seqlen_q, heads_q, dtype=torch.bool, device=DEVICE)
    for b, length in enumerate(lengths.tolist()):
        if length == 0:
            continue
        num_blocks = -(-length // BLOCK)
        counts = kvcache._block_counts(length, BLOCK, torch.float32, DEVICE)
        keys = reference._routing_keys_from_sums(state.block_sums[b, :num_blocks], counts, q.dtype)
        for start in range(0, seqlen_q, 64):  # the reference's scores are [rows, heads, blocks, D]
            rows = slice(start, min(seqlen_q, start + 64))
            positions = torch.arange(rows.start, rows.stop, device=DEVICE) + length - seqlen_q
            expected = reference._route_chunk(q[b, rows], keys, positions, BLOCK, TOPK, causal=True)
            chosen = selected[b, rows].long()
            mask = torch.zeros(*chosen.shape[:2], num_blocks + 1, dtype=torch.bool, device=DEVICE)
            mask.scatter_(-1, torch.where(chosen >= 0, chosen, num_blocks), True)
            agree[b, rows] = (mask[..., :num_blocks] == expected).all(-1)
    return agree


def check_against_reference(state, seqlen_q, new_kv):
    """One call of the Triton backend against the reference: its append against the reference's append
    (caches equal, block sums close), then its outputs against the reference's on the very caches and
    sums the Triton call left (so that both route on the same centroids), where the selections agree."""
    q = state.randn(state.batch, seqlen_q, HEADS_Q, HEAD_DIM)
    k = state.randn(state.batch, seqlen_q, HEADS_KV, HEAD_DIM) if new_kv else None
    v = state.randn(state.batch, seqlen_q, HEADS_KV, HEAD_DIM) if new_kv else None
    before = state.clone()
    with torch.no_grad():
        out, lse = state.step(q, k, v, "triton")
        if new_kv:
            before.step(q, k, v, "reference")
            for name in ("k_cache", "v_cache"):  # the same positions written, NaN elsewhere on both
                assert torch.equal(getattr(state, name).isnan(), getattr(before, name).isnan()), name
                written = ~getattr(before, name).isnan()
                assert torch.equal(getattr(state, name)[written], getattr(before, name)[written]), name
            torch.testing.assert_close(state.block_sums, before.block_sums, atol=1e-3, rtol=1e-5)
            state.cache_seqlens += seqlen_q  # the keys are in: from here on they are cached
        after = state.clone()
        expected_out, expected_lse = after.step(q, None, None, "reference")
        agree = selections_agree(state, q, state.cache_seqlens)
    assert torch.isfinite(out.float()).all(), "o holds NaN or inf"
    assert agree.float().mean() > 0.999, f"selections differ for {(~agree).sum()} (row, head) pairs"
    torch.testing.assert_close(out.float()[agree], expected_out.float()[agree], **OUT_TOLERANCE)
    lse_agree = agree.permute(0, 2, 1)
    torch.testing.assert_close(lse[lse_agree], expected_lse[lse_agree], **LSE_TOLERANCE)
    error = (out.float() - expected_out.float()).abs()[agree]
    # A few ulps apart at most, and rarely: the mean error stays well below one bf16 ulp of a mean |o|.
    budget = 2**-9 * expected_out.float()[agree].abs().mean()
    assert error.mean() < budget, f"mean |o error| {error.mean():.2e} > {budget:.2e}: more than bf16 rounding"


def assert_mostly_close(actual, expected, fraction=0.99):
    """Within OUT_TOLERANCE for all but a few (row, head) pairs: two caches appended by two backends
    hold float32 sums in another order, whose bf16 centroids may differ by an ulp and flip a near-tie."""
    assert torch.isfinite(actual.float()).all()
    bound = OUT_TOLERANCE["atol"] + OUT_TOLERANCE["rtol"] * expected.float().abs()
    close = ((actual.float() - expected.float()).abs() <= bound).all(-1)
    assert close.float().mean() >= fraction, f"{(~close).sum()} of {close.numel()} (row, head) pairs differ"


def next_step_inputs(state, static_q, static_k, static_v):
    """A new token's q, k, v for every sequence of ``state``, also copied into a captured graph's inputs."""
    q = state.randn(state.batch, 1, HEADS_Q, HEAD_DIM)
    k = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)
    v = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)
    static_q.copy_(q)
    static_k.copy_(k)
    static_v.copy_(v)
    return q, k, v


@pytest.fixture(params=["by-group", "by-head"])
def attention_by(request, monkeypatch):
    """Both attention kernels: by kv head group (the default) and by query head."""
    monkeypatch.setattr(decode, "DEFAULT_ATTN_BY_GROUP", request.param == "by-group")


@pytest.mark.usefixtures("poison_empty", "attention_by")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_step_at_32k_against_the_reference(paged):
    # Ragged lengths: a full cache but one slot, a partial block, a block boundary, a one-key cache.
    state = DecodeState([CAPACITY - 1 - 512, 20000, 8191, 1], paged)
    check_against_reference(state, seqlen_q=1, new_kv=True)
    check_against_reference(state, seqlen_q=1, new_kv=False)


@pytest.mark.usefixtures("poison_empty", "attention_by")
def test_chunked_prefill_of_four_blocks_against_the_reference():
    state = DecodeState([10000, 0, 300, 4096], paged=True, seed=1)
    check_against_reference(state, seqlen_q=4 * BLOCK, new_kv=True)


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("splits", [1, 4])
def test_mha_decode_steps_at_head_dim_64_against_the_reference(splits):
    # The 340m preset's MoBA layers (16 / 16 heads, d 64): a one-token step routes one (row, head) pair
    # per kv head, the first row of the router's 16-row dot (decode_tiles' ROWS 1), with and without the
    # router's block splits. With splits the by-head attention merges the router's lists itself
    # (route_merge_in_attention): the same bits as the route merge kernel's selections.
    heads, head_dim = 16, 64
    state = DecodeState(
        [CAPACITY - 1 - 512, 20000, 8191, 1, 0, 4095], False, seed=7, heads_kv=heads, head_dim=head_dim
    )
    twin, apart = state.clone(), state.clone()
    config = decode.DecodeConfig(route_block_splits=splits)
    merged_apart = decode.DecodeConfig(route_block_splits=splits, route_merge_in_attention=False)
    for _ in range(3):
        q, k, v = (state.randn(state.batch, 1, heads, head_dim) for _ in range(3))
        with torch.no_grad():
            outs = []
            for case, case_config in ((state, config), (apart, merged_apart)):
                arguments = (case.k_cache, case.v_cache, case.block_sums, case.cache_seqlens, BLOCK, TOPK)
                out, lse = decode.moba_decode_triton(q, *arguments, k, v, None, head_dim**-0.5, case_config)
                outs.append((out, lse))
            expected, _ = twin.step(q, k, v, "reference")
        assert_mostly_close(outs[0][0], expected)
        for merged_here, merged_by_kernel in zip(outs[0], outs[1], strict=True):
            assert torch.equal(merged_here, merged_by_kernel)
        for case in (state, twin, apart):
            case.cache_seqlens += 1


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("seqlen_q", [1, 4 * BLOCK])
def test_split_router_selects_what_one_program_per_kv_head_selects(seqlen_q):
    # The same centroid tiles scored by the same kernel: the selections must be equal, bit for bit.
    state = DecodeState([CAPACITY - 512, 20000], paged=False, seed=4)
    q = state.randn(state.batch, seqlen_q, HEADS_Q, HEAD_DIM)
    max_blocks = state.block_sums.shape[1]
    rows = state.batch * seqlen_q * HEADS_Q
    group = HEADS_Q // HEADS_KV
    selections = []
    for splits in (1, 4):
        config = decode.DecodeConfig(route_block_splits=splits)
        tiles = decode.decode_tiles(
            HEAD_DIM, BLOCK, TOPK, max_blocks, rows, group, seqlen_q, DECODE_SM_COUNT, config
        )
        assert tiles["block_splits"] == splits
        selections.append(
            decode.decode_route(q, state.block_sums, state.cache_seqlens, BLOCK, TOPK, 0, tiles)
        )
    assert torch.equal(selections[0], selections[1])
    agree = selections_agree(state, q, state.cache_seqlens)
    assert agree.float().mean() > 0.999


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_folded_append_equals_the_append_kernel_bitwise(paged):
    # fold_append: the route kernel's programs of row tile 0 write the new token and update its block's
    # sums while the other router programs (and block splits) of the same launch score the centroids. No
    # program reads the row being written (the token's block is the own block), which only programs
    # running at once on the device can contradict: the results must be the same bits, steps after steps.
    state = DecodeState([CAPACITY - 1 - 512, 20000, 8191, 1, 0, 128, 4095, 300], paged, seed=6)
    twin = state.clone()
    for _ in range(3):
        q = state.randn(state.batch, 1, HEADS_Q, HEAD_DIM)
        k = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)
        v = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)
        results = []
        for case, fold in ((state, True), (twin, False)):
            arguments = (q, case.k_cache, case.v_cache, case.block_sums, case.cache_seqlens, BLOCK, TOPK)
            config = decode.DecodeConfig(fold_append=fold)
            results.append(
                decode.moba_decode_triton(*arguments, k, v, case.block_table, HEAD_DIM**-0.5, config)
            )
            case.cache_seqlens += 1
        for folded, unfolded in zip(results[0], results[1], strict=True):
            assert torch.equal(folded.isnan(), unfolded.isnan())
            assert torch.equal(folded.nan_to_num(), unfolded.nan_to_num())
        for name in ("k_cache", "v_cache", "block_sums"):
            folded, unfolded = getattr(state, name), getattr(twin, name)
            assert torch.equal(folded.isnan(), unfolded.isnan()) and torch.equal(
                folded.nan_to_num(), unfolded.nan_to_num()
            ), name


@pytest.mark.usefixtures("poison_empty")
@pytest.mark.parametrize(
    "heads", [(HEADS_Q, HEADS_KV, HEAD_DIM), (16, 16, 64)], ids=["32/8 d128 by group", "16/16 d64 by head"]
)
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "cuda-graph"])
def test_programmatic_dependent_launches_equal_stream_ordered_ones_bitwise(heads, graphed):
    # Under PDL (DecodeConfig.pdl, sm_90 on) each decode kernel may start while the one before it runs,
    # and waits for it before touching memory. A read that raced the kernel before (the router's split
    # lists and selections, the attention's partials, the token the router appends) would differ here
    # from stream-ordered launches, on the same inputs, bit for bit; splits force every kernel to run.
    if not supports_pdl(torch.device(DEVICE)):
        pytest.skip("programmatic dependent launch needs compute capability 9.0 or newer")
    heads_q, heads_kv, head_dim = heads
    lengths = [CAPACITY - 1 - 512, 20000, 8191, 1, 0, 128, 4095, 300]
    state = DecodeState(lengths, paged=False, seed=7, heads_kv=heads_kv, head_dim=head_dim)
    twin = state.clone()
    splits = dict(route_block_splits=4, num_splits=3, route_block_n=16)
    static = [state.randn(state.batch, 1, count, head_dim) for count in (heads_q, heads_kv, heads_kv)]

    def step(case, pdl):
        config = decode.DecodeConfig(pdl=pdl, **splits)
        arguments = (case.k_cache, case.v_cache, case.block_sums, case.cache_seqlens, BLOCK, TOPK)
        q, k, v = static
        result = decode.moba_decode_triton(q, *arguments, k, v, None, head_dim**-0.5, config)
        case.cache_seqlens += 1
        return result

    saved = state.clone()
    pdl_step = lambda: step(state, True)  # noqa: E731
    if graphed:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(state, True)  # compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step(state, True)
        for name in ("k_cache", "v_cache", "block_sums", "cache_seqlens"):  # undo the warm-up step
            getattr(state, name).copy_(getattr(saved, name))

        def pdl_step():
            graph.replay()
            return captured

    for _ in range(4):  # sequence 5 (128 keys) crosses a block boundary
        for tensor in static:
            tensor.copy_(state.randn(*tensor.shape))
        with_pdl = [tensor.clone() for tensor in pdl_step()]
        stream_ordered = step(twin, False)
        for launched, ordered in zip(with_pdl, stream_ordered, strict=True):
            assert torch.equal(launched.isnan(), ordered.isnan())
            assert torch.equal(launched.nan_to_num(), ordered.nan_to_num())
    for name in ("k_cache", "v_cache", "block_sums", "cache_seqlens"):
        launched, ordered = getattr(state, name), getattr(twin, name)
        assert torch.equal(launched.isnan(), ordered.isnan()), name
        assert torch.equal(launched.nan_to_num(), ordered.nan_to_num()), name


def test_cuda_graph_capture_of_a_decode_step_replays_eager_steps():
    state = DecodeState([30000, 12345, 127, 128], paged=False, seed=2)
    saved = state.clone()
    static_q = state.randn(state.batch, 1, HEADS_Q, HEAD_DIM)
    static_k = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)
    static_v = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)

    def step():
        out, lse = state.step(static_q, static_k, static_v, "triton")
        state.cache_seqlens += 1  # as MoBAKVCache.append_and_attend does: on the device
        return out, lse

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # compile the kernels and settle the allocator outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured_out, captured_lse = step()
    for name in ("k_cache", "v_cache", "block_sums", "cache_seqlens"):  # undo the warm-up steps
        getattr(state, name).copy_(getattr(saved, name))
    twin = saved.clone()
    for _ in range(4):  # steps cross the block boundary of sequences 2 and 3
        q, k, v = next_step_inputs(state, static_q, static_k, static_v)
        graph.replay()
        with torch.no_grad():
            expected_out, expected_lse = twin.step(q, k, v, "triton")
        twin.cache_seqlens += 1
        torch.testing.assert_close(captured_out.float(), expected_out.float(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(captured_lse, expected_lse, atol=1e-4, rtol=1e-5)
    assert torch.equal(state.cache_seqlens, twin.cache_seqlens)
    assert state.cache_seqlens.tolist() == [30004, 12349, 131, 132]
    torch.testing.assert_close(state.block_sums, twin.block_sums, atol=0, rtol=0)
    assert torch.equal(state.k_cache.nan_to_num(), twin.k_cache.nan_to_num())
    # And an eager Triton step (which the replays equal) is the reference's.
    reference_state = saved.clone()
    check_state = saved.clone()
    q = state.randn(state.batch, 1, HEADS_Q, HEAD_DIM)
    k = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)
    v = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)
    with torch.no_grad():
        out, _ = check_state.step(q, k, v, "triton")
        expected, _ = reference_state.step(q, k, v, "reference")
    assert_mostly_close(out, expected)


def test_inductor_compiled_decode_step_in_a_cuda_graph_equals_eager_steps():
    """flashmoba::moba_decode under torch.compile(fullgraph=True) with Inductor: the caches are written
    in place (no copy of them in the generated code), and the compiled step captured in a CUDA graph
    replays what eager Triton steps compute, bit for bit (the same kernels on the same inputs)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    state = DecodeState([30000, 12345, 127, 128], paged=True, seed=5)
    twin = state.clone()
    static_q = state.randn(state.batch, 1, HEADS_Q, HEAD_DIM)
    static_k = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)
    static_v = state.randn(state.batch, 1, HEADS_KV, HEAD_DIM)

    def step(q, k, v, k_cache, v_cache, block_sums, cache_seqlens, block_table):
        out, lse = flashmoba.moba_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            block_sums,
            cache_seqlens,
            BLOCK,
            TOPK,
            k=k,
            v=v,
            block_table=block_table,
            backend="triton",
            return_lse=True,
        )
        cache_seqlens += 1
        return out.float() * 2.0, lse

    compiled = torch.compile(step, fullgraph=True, mode="max-autotune-no-cudagraphs")

    def compiled_step():
        return compiled(
            static_q,
            static_k,
            static_v,
            state.k_cache,
            state.v_cache,
            state.block_sums,
            state.cache_seqlens,
            state.block_table,
        )

    def eager_step(q, k, v):
        return step(
            q, k, v, twin.k_cache, twin.v_cache, twin.block_sums, twin.cache_seqlens, twin.block_table
        )

    with torch.no_grad():
        (out, lse), codes = run_and_get_code(compiled_step)
        expected_out, expected_lse = eager_step(static_q, static_k, static_v)
    assert not any("clone" in line for code in codes for line in code.splitlines()), "a cache was copied"
    torch.testing.assert_close(out, expected_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=0, rtol=0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        compiled_step()  # settle the allocator outside the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        eager_step(static_q, static_k, static_v)  # the twin takes the same warm-up step
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured_out, captured_lse = compiled_step()
    for _ in range(4):
        q, k, v = next_step_inputs(state, static_q, static_k, static_v)
        graph.replay()
        with torch.no_grad():
            expected_out, expected_lse = eager_step(q, k, v)
        torch.testing.assert_close(captured_out, expected_out, atol=0, rtol=0)
        torch.testing.assert_close(captured_lse, expected_lse, atol=0, rtol=0)
    assert state.cache_seqlens.tolist() == twin.cache_seqlens.tolist() == [30006, 12351, 133, 134]
    torch.testing.assert_close(state.block_sums, twin.block_sums, atol=0, rtol=0)
    assert torch.equal(state.k_cache.nan_to_num(), twin.k_cache.nan_to_num())


def test_cache_object_uses_the_triton_backend_by_default_on_cuda():
    cache = flashmoba.MoBAKVCache(
        2, 4096, HEADS_KV, HEAD_DIM, block_size=BLOCK, topk=TOPK, dtype=torch.bfloat16, device=DEVICE
    )
    twin = flashmoba.MoBAKVCache(
        2,
        4096,
        HEADS_KV,
        HEAD_DIM,
        block_size=BLOCK,
        topk=TOPK,
        dtype=torch.bfloat16,
        device=DEVICE,
        backend="reference",
    )
    generator = torch.Generator(device=DEVICE).manual_seed(3)
    for length in (1000, 1, 1, 300, 1):
        q, k, v = (
            torch.randn(2, length, heads, HEAD_DIM, generator=generator, device=DEVICE).to(torch.bfloat16)
            for heads in (HEADS_Q, HEADS_KV, HEADS_KV)
        )
        with torch.no_grad():
            out = cache.append_and_attend(q, k, v)
            expected = twin.append_and_attend(q, k, v)
        assert_mostly_close(out, expected)
    cache.reorder(torch.tensor([1, 1, 0], device=DEVICE))
    twin.reorder(torch.tensor([1, 1, 0], device=DEVICE))
    q, k, v = (
        torch.randn(3, 1, heads, HEAD_DIM, generator=generator, device=DEVICE).to(torch.bfloat16)
        for heads in (HEADS_Q, HEADS_KV, HEADS_KV)
    )
    with torch.no_grad():
        assert_mostly_close(cache.append_and_attend(q, k, v), twin.append_and_attend(q, k, v))
