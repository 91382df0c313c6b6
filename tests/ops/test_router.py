"""The Triton router (block centroids + fused top-k) against ``flashmoba.reference``, on CPU in Triton's
interpreter (on a CUDA machine the same tests run the compiled kernels).

Random float32 inputs may hold near-ties that the kernel's dot and the reference's sum round differently:
a differing selection is accepted only where the float64 scores of the swapped blocks agree to 1e-5.
Inputs made of small integers give exact scores, so there every selection (and every tie) must match.
"""

from __future__ import annotations

import pytest
import torch

import flashmoba
from flashmoba import reference
from flashmoba.ops import router
from flashmoba.ops.config import KernelConfig
from flashmoba.ops.utils import interpreting
from tests.helpers import cu_seqlens

DEVICE = "cpu" if interpreting() else "cuda"
pytestmark = pytest.mark.triton


def _tiles(**settings) -> KernelConfig:
    """A top-k kernel configuration by its launch names (BLOCK_M=16, FILTER=False, ...)."""
    return KernelConfig.for_kernel("router", settings)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _random(*shape, dtype=torch.float32, integers=False, generator=None):
    """float64 normals rounded to dtype, or small integers (exact scores in any dtype)."""
    if integers:
        values = torch.randint(-2, 3, shape, generator=generator).double()
    else:
        values = torch.randn(*shape, dtype=torch.float64, generator=generator)
    return values.to(dtype).to(DEVICE)


def _poisoned(shape):
    return torch.full(shape, -1234, dtype=torch.int32, device=DEVICE)


def _assert_sequence_selection(got, expected, q, k, block_size, tolerance=1e-5):
    """got/expected int32 [T, Hq, topk] of one sequence, q [T, Hq, D], k [S, Hkv, D].

    Rows may differ only by swapping blocks whose float64 scores agree within the tolerance.
    """
    assert got.shape == expected.shape and got.dtype == torch.int32
    mismatched = (got != expected).any(dim=-1)
    if not mismatched.any():
        return
    centroids = reference.block_centroids(k.cpu(), block_size).double()
    group = q.shape[1] // k.shape[1]
    for token, head in mismatched.nonzero().tolist():
        row, want = got[token, head].cpu(), expected[token, head].cpu()
        chosen = row[row >= 0]
        assert (chosen.diff() > 0).all() and (row[len(chosen) :] == -1).all(), f"malformed row {row.tolist()}"
        message = f"({token}, {head}): got {row.tolist()}, want {want.tolist()}"
        assert len(chosen) == (want >= 0).sum(), message
        scores = centroids[:, head // group] @ q[token, head].cpu().double()
        only_got = sorted(set(chosen.tolist()) - set(want.tolist()))
        only_want = sorted(set(want[want >= 0].tolist()) - set(chosen.tolist()))
        got_scores, want_scores = scores[only_got].sort().values, scores[only_want].sort().values
        scale = tolerance * (1 + scores.abs().max())
        assert torch.allclose(got_scores, want_scores, rtol=0, atol=float(scale)), (
            f"({token}, {head}): got {row.tolist()}, want {want.tolist()}, scores {scores.tolist()}"
        )


def _check_padded(
    batch,
    seqlen_q,
    seqlen_k,
    heads_q,
    heads_kv,
    head_dim,
    block_size,
    topk,
    causal,
    dtype=torch.float32,
    integers=False,
    seed=0,
    config=None,
):
    generator = torch.Generator().manual_seed(seed)
    q = _random(batch, seqlen_q, heads_q, head_dim, dtype=dtype, integers=integers, generator=generator)
    k = _random(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, integers=integers, generator=generator)
    out = _poisoned((batch, seqlen_q, heads_q, topk))
    got = router.route(q, k, block_size, topk, causal, out=out, config=config)
    expected = reference.moba_select_reference(q, k, block_size, topk, causal)
    if integers:
        assert torch.equal(got, expected)
    for b in range(batch):
        _assert_sequence_selection(got[b], expected[b], q[b], k[b], block_size)
    return got


def _check_varlen(
    lengths_q,
    lengths_k,
    heads_q,
    heads_kv,
    head_dim,
    block_size,
    topk,
    causal,
    dtype=torch.float32,
    integers=False,
    seed=0,
):
    generator = torch.Generator().manual_seed(seed)
    q = _random(sum(lengths_q), heads_q, head_dim, dtype=dtype, integers=integers, generator=generator)
    k = _random(sum(lengths_k), heads_kv, head_dim, dtype=dtype, integers=integers, generator=generator)
    cu_q, cu_k = cu_seqlens(lengths_q, DEVICE), cu_seqlens(lengths_k, DEVICE)
    got = router.route_varlen(
        q,
        k,
        cu_q,
        cu_k,
        max(lengths_q),
        max(lengths_k),
        block_size,
        topk,
        causal,
        out=_poisoned((q.shape[0], heads_q, topk)),
    )
    expected = reference.moba_select_reference(q, k, block_size, topk, causal, cu_q, cu_k)
    if integers:
        assert torch.equal(got, expected)
    for s in range(len(lengths_q)):
        sq, sk = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        _assert_sequence_selection(got[sq], expected[sq], q[sq], k[sk], block_size)
    return got


# ----------------------------------------------------------------------------------------------------
# Centroids
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [16, 7])
def test_centroids_varlen_match_reference(block_size):
    lengths = [1, 0, 33, 16, 50]
    k = _random(sum(lengths), 2, 24, generator=torch.Generator().manual_seed(1))
    cu = cu_seqlens(lengths, DEVICE)
    centroids = router.block_centroids_varlen(k, cu, max(lengths), block_size)
    assert centroids.shape == (sum(lengths) // block_size + len(lengths), 2, 24)
    for s, length in enumerate(lengths):
        start = int(cu[s])
        expected = reference.block_centroids(k[start : start + length], block_size)
        first_row = start // block_size + s
        got = centroids[first_row : first_row + expected.shape[0]]
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Selections: padded layout
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen", [1, 15, 17, 55])  # 1, B-1, B+1, 3B+7 for B = 16
@pytest.mark.parametrize("causal", [True, False])
def test_odd_lengths(seqlen, causal):
    _check_padded(2, seqlen, seqlen, 2, 2, 32, 16, 3, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_shorter_queries(causal):
    # seqlen_q < seqlen_k: bottom-right causal alignment; GQA 4:1.
    _check_padded(1, 23, 90, 8, 2, 32, 16, 3, causal, seed=2)


def test_mqa_longer_queries():
    # seqlen_q > seqlen_k: the first queries sit at p < 0 and select nothing.
    got = _check_padded(2, 40, 21, 3, 1, 16, 16, 2, True, seed=3)
    assert (got[:, :19] == -1).all()


@pytest.mark.parametrize("causal", [True, False])
def test_topk_one(causal):
    got = _check_padded(1, 50, 50, 2, 1, 16, 16, 1, causal, seed=4)
    if causal:  # only the own block
        own_block = (torch.arange(50, device=DEVICE) // 16).int()
        assert torch.equal(got[0, :, :, 0], own_block[:, None].expand(50, 2))


@pytest.mark.parametrize("topk", [5, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_topk_covers_every_block(topk, causal):
    # 3 blocks: every visible block selected, -1 after them.
    got = _check_padded(1, 37, 37, 2, 2, 16, 16, topk, causal, seed=5)
    assert (got[..., 3:] == -1).all()


@pytest.mark.parametrize("block_size", [48, 7, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sizes(block_size, causal):
    _check_padded(1, 30, 103, 2, 1, 16, block_size, 4, causal, seed=6)


@pytest.mark.parametrize("head_dim", [96, 20])
def test_head_dims_not_a_power_of_two(head_dim):
    _check_padded(1, 40, 40, 2, 1, head_dim, 16, 2, True, seed=7)


def test_many_centroid_tiles_and_large_topk():
    # 25 blocks of 4: several centroid tiles per row and a running list of 16 slots.
    _check_padded(1, 100, 100, 1, 1, 16, 4, 12, True, seed=8)
    _check_padded(1, 33, 100, 1, 1, 16, 4, 12, False, seed=8)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(FILTER=False),  # every tile merged by tl.topk
        dict(INSERT_ROUNDS=0),  # tiles skipped by the threshold, the rest merged
        dict(INSERT_ROUNDS=1000),  # tiles skipped or inserted key by key
        dict(),
    ],
    ids=["merge", "filter-merge", "filter-insert", "default"],
)
def test_tile_update_paths(overrides):
    # Small tiles so each row sees many centroid tiles: 60 blocks in tiles of 16; integer data ties often.
    config = _tiles(BLOCK_M=16, BLOCK_N=16, **overrides)
    for causal in (True, False):
        _check_padded(1, 48, 120, 2, 1, 16, 2, 5, causal, integers=True, seed=17, config=config)


def test_non_contiguous_inputs():
    generator = torch.Generator().manual_seed(9)
    q_storage = _random(2, 4, 30, 40, generator=generator)  # [B, Hq, T, D + 8]
    k_storage = _random(2, 50, 40, 2, generator=generator).transpose(2, 3)  # [B, S, Hkv, D + 8], D strided
    q, k = q_storage.transpose(1, 2)[..., :32], k_storage[..., :32]
    assert not q.is_contiguous() and not k.is_contiguous()
    for causal in (True, False):
        got = router.route(q, k, 16, 3, causal)
        expected = reference.moba_select_reference(q.contiguous(), k.contiguous(), 16, 3, causal)
        for b in range(2):
            _assert_sequence_selection(got[b], expected[b], q[b], k[b], 16)
    packed_q = q.reshape(60, 4, 32)[::2]  # [30, Hq, D]: token stride 2 rows
    packed_k = k[0]
    cu_q, cu_k = cu_seqlens([30], DEVICE), cu_seqlens([50], DEVICE)
    got = router.route_varlen(packed_q, packed_k, cu_q, cu_k, 30, 50, 16, 3, True)
    expected = reference.moba_select_reference(
        packed_q.contiguous(), packed_k.contiguous(), 16, 3, True, cu_q, cu_k
    )
    _assert_sequence_selection(got, expected, packed_q, packed_k, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_exact_on_integer_inputs(dtype):
    # Block lengths 16 and 8 keep every centroid exact in bf16: Triton's interpreter casts float32 to
    # bfloat16 by truncation, while the GPU and torch round to nearest even.
    for causal in (True, False):
        _check_padded(1, 45, 72, 4, 2, 32, 16, 3, causal, dtype=dtype, integers=True, seed=10)


# ----------------------------------------------------------------------------------------------------
# Selections: packed (varlen) layout
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_ragged(causal):
    # An empty sequence, a length-1 sequence, one shorter than a block, seqlen_q != seqlen_k.
    lengths_q = [0, 1, 9, 40, 20]
    lengths_k = [0, 1, 60, 40, 13]
    _check_varlen(lengths_q, lengths_k, 4, 2, 32, 16, 3, causal, seed=11)


def test_varlen_empty_keys_and_queries():
    got = _check_varlen([3, 0, 5], [0, 4, 16], 2, 1, 16, 16, 2, True, seed=12)
    assert (got[:3] == -1).all()
    got = _check_varlen([3, 0, 5], [0, 4, 16], 2, 1, 16, 16, 2, False, seed=12)
    assert (got[:3] == -1).all() and (got[3:, :, 0] == 0).all() and (got[3:, :, 1] == -1).all()


def test_varlen_block_48_head_dim_96():
    _check_varlen([50, 7], [130, 49], 4, 1, 96, 48, 2, True, seed=13)


# ----------------------------------------------------------------------------------------------------
# Ties: the later block wins
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_all_blocks_tied(causal):
    # Every key block identical: all scores tie, so the latest allowed blocks win.
    block_size, num_blocks, topk = 16, 6, 3
    block = _random(1, block_size, 1, 16, integers=True, generator=torch.Generator().manual_seed(14))
    k = block.repeat(1, num_blocks, 1, 1)
    q = _random(1, block_size * num_blocks, 2, 16, integers=True, generator=torch.Generator().manual_seed(15))
    got = router.route(q, k, block_size, topk, causal)
    assert torch.equal(got, reference.moba_select_reference(q, k, block_size, topk, causal))
    if causal:  # the own block and the topk - 1 blocks right before it
        for position in range(q.shape[1]):
            own = position // block_size
            blocks = list(range(max(0, own - topk + 1), own + 1))
            expected = torch.tensor(blocks + [-1] * (topk - len(blocks)), dtype=torch.int32, device=DEVICE)
            assert (got[0, position] == expected).all(), (position, got[0, position].tolist())
    else:
        assert (got[0] == torch.tensor([3, 4, 5], dtype=torch.int32, device=DEVICE)).all()


@pytest.mark.parametrize("causal", [True, False])
def test_planted_duplicate_blocks(causal):
    # Integer data with duplicated key blocks: many exact ties, all scores exact; must equal the reference.
    generator = torch.Generator().manual_seed(16)
    block_size = 16
    distinct = _random(2, 4 * block_size, 2, 16, integers=True, generator=generator)
    k = torch.cat([distinct, distinct[:, : 3 * block_size], distinct[:, :8]], dim=1)  # 8 blocks, last partial
    q = _random(2, 90, 4, 16, integers=True, generator=generator)
    for topk in (1, 2, 4):
        got = router.route(q, k, block_size, topk, causal)
        assert torch.equal(got, reference.moba_select_reference(q, k, block_size, topk, causal))
    lengths_q, lengths_k = [30, 60], [k.shape[1] - 20, k.shape[1]]
    packed_q = torch.cat([q[0, :30], q[1, :60]])
    packed_k = torch.cat([k[0, : lengths_k[0]], k[1]])
    cu_q, cu_k = cu_seqlens(lengths_q, DEVICE), cu_seqlens(lengths_k, DEVICE)
    got = router.route_varlen(packed_q, packed_k, cu_q, cu_k, 60, k.shape[1], block_size, 3, causal)
    expected = reference.moba_select_reference(packed_q, packed_k, block_size, 3, causal, cu_q, cu_k)
    assert torch.equal(got, expected)


def test_zero_scores_tie():
    # q orthogonal to every centroid (products of either sign of zero): every score is zero, all tie.
    k = torch.zeros(1, 64, 1, 16, device=DEVICE)
    k[0, :16, 0, 0] = 1.0
    k[0, 16:32, 0, 0] = -1.0
    q = torch.zeros(1, 4, 1, 16, device=DEVICE)
    q[0, :, 0, 1] = 1.0
    q[0, :2, 0, 0] = -0.0
    for causal in (True, False):
        got = router.route(q, k, 16, 2, causal)
        assert torch.equal(got, reference.moba_select_reference(q, k, 16, 2, causal))


# ----------------------------------------------------------------------------------------------------
# Limits and degenerate shapes
# ----------------------------------------------------------------------------------------------------


def test_empty_batch_and_lengths():
    def zeros(*shape):
        return torch.zeros(*shape, device=DEVICE)

    assert router.route(zeros(0, 5, 2, 16), zeros(0, 7, 1, 16), 16, 2).shape == (0, 5, 2, 2)
    assert router.route(zeros(2, 0, 2, 16), zeros(2, 7, 1, 16), 16, 2).shape == (2, 0, 2, 2)
    assert (router.route(zeros(1, 3, 2, 16), zeros(1, 0, 1, 16), 16, 2, causal=False) == -1).all()


def test_unsupported_raise_value_error():
    q, k = torch.zeros(1, 4, 2, 16, device=DEVICE), torch.zeros(1, 4, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        router.route(q.double(), k.double(), 16, 2)
    with pytest.raises(ValueError, match="head_dim"):
        wide = torch.zeros(1, 4, 2, 300, device=DEVICE)
        router.route(wide, wide[:, :, :1], 16, 2)
    with pytest.raises(ValueError, match="at most 128 blocks"):
        router.route(q, torch.zeros(1, 400, 1, 16, device=DEVICE), 1, 200)
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        router.route(torch.zeros(1, 4, 3, 16, device=DEVICE), torch.zeros(1, 4, 2, 16, device=DEVICE), 16, 2)
    with pytest.raises(ValueError, match="block_size"):
        router.route(q, k, 0, 2)
    # topk beyond the on-chip limit is fine when it covers every block.
    assert (router.route(q, k, 16, 500)[..., 1:] == -1).all()


@pytest.mark.parametrize("block_size", [3, 6, 7])
@pytest.mark.parametrize("causal", [True, False])
def test_real_arithmetic_ties_with_non_power_of_two_blocks(block_size, causal):
    """Small-integer keys in blocks of 3, 6 or 7 tokens: block means like 7/6 are not exact in float32,
    yet blocks whose scores tie exactly must still tie (later block wins), as in the reference."""
    _check_padded(1, 40, 40, 2, 1, 16, block_size, 3, causal, integers=True, seed=block_size)
    _check_varlen([17, 23], [17, 30], 2, 2, 16, block_size, 4, causal, integers=True, seed=block_size + 1)


def test_wide_query_tiles_of_long_sequences():
    # The measured defaults over >= 1024 blocks: 128 query rows and 8 warps for lists of 32 slots, 64 rows
    # and 4 warps for lists of 16 ("Router: top-k tiles" in benchmarks/NOTES.md).
    for running_topk, tiles in ((16, (64, 4)), (32, (128, 8))):
        config = router._topk_config(128, running_topk, 2048)
        assert (config["BLOCK_M"], config["num_warps"]) == tiles
    config = _tiles(BLOCK_M=128, BLOCK_N=32, num_warps=8)
    for causal in (True, False):
        _check_padded(1, 150, 160, 2, 1, 16, 4, 17, causal, integers=True, seed=21, config=config)


def test_path_counts_add_up_and_follow_the_configuration():
    generator = torch.Generator().manual_seed(31)
    q = _random(1, 96, 2, 16, generator=generator)
    k = _random(1, 96, 2, 16, generator=generator)
    block_size, topk = 4, 5  # 24 blocks in tiles of 16: most query tiles visit two centroid tiles
    config = _tiles(BLOCK_M=16, BLOCK_N=16)
    # Tiles visited: per (query tile, head), the centroid tiles below the own block of its last row.
    last_rows = torch.arange(15, 96, 16)
    expected_tiles = 2 * int(((last_rows // block_size + 15) // 16).sum())
    counts = router.count_topk_paths(q, k, block_size, topk, causal=True, config=config)
    assert counts["tiles"] == counts["skipped"] + counts["inserted"] + counts["merged"] == expected_tiles
    assert counts["merged"] > 0 and counts["skipped"] + counts["inserted"] > 0
    max_rounds = router._topk_config(16, 8, 24, config)["INSERT_ROUNDS"]
    assert counts["inserted"] <= counts["insertion_rounds"] <= max_rounds * counts["inserted"]
    assert torch.equal(counts["selected"], reference.moba_select_reference(q, k, block_size, topk, True))
    config = _tiles(BLOCK_M=16, BLOCK_N=16, FILTER=False)
    assert (
        router.count_topk_paths(q, k, block_size, topk, causal=True, config=config)["merged"]
        == expected_tiles
    )


@pytest.mark.parametrize("causal", [True, False])
def test_nan_and_infinite_scores_take_every_path_alike(causal):
    # NaN and +-inf scores (inf * 0 and overflow) must be ranked by their keys on every path: the insert
    # path compares int32 images of the scores, the merge int64 keys; -inf scores may still fill empty slots.
    generator = torch.Generator().manual_seed(43)
    q = _random(1, 256, 2, 16, generator=generator)
    k = _random(1, 256, 1, 16, generator=generator)
    q[0, 200, 0, 3] = float("nan")
    q[0, 150:180, 1, :] = 0.0
    q[0, 150:180, 1, 5] = float("inf")  # inf * (+-c): +-inf scores; inf * 0 would be NaN
    q[0, 100:110, 0, 7] = 3e38  # overflow to +-inf in the dot
    k[0, 40:44, 0, 2] = float("inf")  # one block's centroid is infinite: inf or NaN scores for every query
    results = []
    for overrides in (dict(FILTER=False), dict(INSERT_ROUNDS=1000), dict()):
        results.append(router.route(q, k, 4, 5, causal, config=_tiles(BLOCK_M=16, BLOCK_N=16, **overrides)))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert ((results[0][0, 200, 0] >= 0).sum()) == 5  # a row of NaN scores still selects topk blocks


def test_nan_scores_from_inf_keys_rank_as_the_reference():
    """inf * 0 and inf - inf make NaN scores whose sign depends on the machine (negative on x86): the router
    ranks every NaN first, as the reference's sort does (56 of these 128 rows differed before)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 2, 16, generator=generator)
    k = torch.randn(1, 64, 2, 16, generator=generator)
    q[0, :, :, 3] = 0.0
    k[0, 10, 0, 3] = float("inf")  # block 1 of head 0: its scores are inf * 0
    k[0, 40, 1, 5], k[0, 41, 1, 5] = float("inf"), float("-inf")  # block 5 of head 1: an inf - inf centroid
    got = flashmoba.moba_select(q, k, 8, 3, backend="triton")
    want = flashmoba.moba_select(q.double(), k.double(), 8, 3, backend="reference")
    assert torch.equal(got, want)
