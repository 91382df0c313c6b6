"""flashmoba.nn.functional's rotary embedding: a rotation whose scores depend on relative positions only."""

import torch

from flashmoba.nn.functional import rotary_embedding


def test_rotary_scores_depend_only_on_relative_position():
    # The property the RoPE baselines rest on (issue 19's dense-rope): shifting every position by the same
    # offset leaves q . k unchanged, and each vector keeps its norm.
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, 3, 16, dtype=torch.float64, generator=generator)
    k = torch.randn(2, 37, 3, 16, dtype=torch.float64, generator=generator)
    positions = torch.arange(37).expand(2, -1)

    def scores(offset: int) -> torch.Tensor:
        rotated_q = rotary_embedding(q, positions + offset, 10000.0)
        rotated_k = rotary_embedding(k, positions + offset, 10000.0)
        return torch.einsum("bqhd,bkhd->bhqk", rotated_q, rotated_k)

    # float32 angles: the shifted scores agree to float32 rounding of positions up to ~2K.
    torch.testing.assert_close(scores(2000), scores(0), rtol=0, atol=1e-3)
    rotated = rotary_embedding(q, positions, 10000.0)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1), rtol=1e-6, atol=1e-6)
    # And it is not the identity: position 0 is (to float32 rounding), position 1 is not.
    torch.testing.assert_close(rotated[:, 0], q[:, 0], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(rotated[:, 1], q[:, 1])
