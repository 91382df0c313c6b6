"""``flashmoba demo``: MoBA on generated inputs, checked against dense attention where they must agree.

Runs offline in seconds on a CPU (reference backend) and on a GPU (Triton backend). It shows the three
facts a new user wants to see: MoBA with topk >= number of blocks is exactly dense causal attention,
MoBA with topk = 1 is block-diagonal attention, and at real sparsity each query attends to only a
fraction of the keys while the output stays close to dense attention on data with block structure.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

from flashmoba.api import BACKENDS, moba_attn, moba_select
from flashmoba.cli._flags import device as device_flag
from flashmoba.cli._flags import int_at_least
from flashmoba.ops.utils import MAX_HEAD_DIM


def _dense(q, k, v, mask=None, causal=False):
    """SDPA in the flash-attn layout; mask is a boolean [T, S] of allowed keys."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
    )
    return out.transpose(1, 2)


def _relative_error(out, expected):
    return ((out.double() - expected.double()).norm() / expected.double().norm()).item()


def _clustered_keys(batch, seqlen, heads, head_dim, block_size, generator, device, dtype):
    """Keys that share a direction inside each block (so that routing by block mean is meaningful)."""
    num_blocks = math.ceil(seqlen / block_size)
    centres = torch.randn(batch, num_blocks, heads, head_dim, generator=generator)
    keys = centres.repeat_interleave(block_size, dim=1)[:, :seqlen]
    keys = keys + 0.5 * torch.randn(batch, seqlen, heads, head_dim, generator=generator)
    return keys.to(device=device, dtype=dtype)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashmoba demo", description=__doc__.splitlines()[0])
    positive = int_at_least(1)
    parser.add_argument("--seqlen", type=positive, default=2048)
    parser.add_argument("--heads", type=positive, default=4)
    parser.add_argument("--head-dim", type=positive, default=64)
    parser.add_argument("--block-size", type=positive, default=128)
    parser.add_argument("--topk", type=positive, default=4)
    parser.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    return parser


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """What one flag alone cannot say: the device exists here, and the backend can run on it."""
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"argument --device: CUDA is not available here, got {str(args.device)!r}")
    if args.device.type == "cuda" and (args.device.index or 0) >= torch.cuda.device_count():
        parser.error(
            f"argument --device: only {torch.cuda.device_count()} CUDA devices, got {str(args.device)!r}"
        )
    triton = args.backend == "triton" or (args.backend == "auto" and args.device.type == "cuda")
    if triton and args.head_dim > MAX_HEAD_DIM:
        parser.error(
            f"argument --head-dim: must be <= {MAX_HEAD_DIM} for the Triton kernels, got {args.head_dim}"
        )
    if args.backend == "triton" and args.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("argument --backend: 'triton' off CUDA needs TRITON_INTERPRET=1 (Triton's interpreter)")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    device = args.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    shape = (1, args.seqlen, args.heads, args.head_dim)
    q = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    k = _clustered_keys(1, args.seqlen, args.heads, args.head_dim, args.block_size, generator, device, dtype)
    v = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    num_blocks = math.ceil(args.seqlen / args.block_size)
    print(
        f"flashmoba demo: q/k/v {list(shape)} {str(dtype).removeprefix('torch.')} on {device}, "
        f"block_size {args.block_size} ({num_blocks} blocks), backend {args.backend}"
    )
    dense = _dense(q, k, v, causal=True)
    checks = _exactness_checks(args, q, k, v, dense, tolerance=2e-2 if dtype != torch.float32 else 1e-5)
    _show_sparse_run(args, q, k, v, dense)
    print("\nchecks (relative error):")
    for name, value, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {value:.2e}")
    return 0 if all(ok for _, _, ok in checks) else 1


def _exactness_checks(args, q, k, v, dense, tolerance: float) -> list[tuple[str, float, bool]]:
    """(name, relative error, passed) of the two cases where MoBA must equal a dense attention: every
    block selected (dense causal), and only the own block (block-diagonal causal)."""
    num_blocks = math.ceil(args.seqlen / args.block_size)
    checks = []
    error = _relative_error(moba_attn(q, k, v, args.block_size, num_blocks, backend=args.backend), dense)
    checks.append((f"topk={num_blocks} (all blocks) vs dense causal attention", error, error < tolerance))
    positions = torch.arange(args.seqlen, device=q.device)
    same_block = (positions[:, None] // args.block_size) == (positions[None, :] // args.block_size)
    block_diagonal = _dense(q, k, v, mask=same_block & (positions[None, :] <= positions[:, None]))
    error = _relative_error(moba_attn(q, k, v, args.block_size, 1, backend=args.backend), block_diagonal)
    checks.append(("topk=1 vs block-diagonal causal attention", error, error < tolerance))
    return checks


def _show_sparse_run(args, q, k, v, dense) -> None:
    """MoBA at the requested topk: the fraction of causal keys each query reads, and the distance to
    dense attention (small on keys with block structure)."""
    start = time.perf_counter()
    sparse = moba_attn(q, k, v, args.block_size, args.topk, backend=args.backend)
    if q.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    selected = moba_select(q, k, args.block_size, args.topk, backend=args.backend)
    positions = torch.arange(args.seqlen, device=q.device)
    causal_keys = args.seqlen * (args.seqlen + 1) / 2
    block_ids = selected.clamp_min(0).long()
    visible = torch.where(
        selected >= 0,
        torch.clamp(positions[None, :, None, None] + 1 - block_ids * args.block_size, 0, args.block_size),
        torch.zeros_like(block_ids),
    )
    fraction = visible.sum().item() / (causal_keys * args.heads)
    error = _relative_error(sparse, dense)
    print(
        f"\nMoBA topk={args.topk}: each query attends to {fraction:.1%} of the keys dense causal attention "
        f"reads; relative difference to dense attention {error:.3f} (clustered keys); {elapsed * 1e3:.0f} ms"
    )
