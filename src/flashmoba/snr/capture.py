"""Getting q and k to measure: synthetic unit vectors with a planted needle, and a hook on a model's MoBA
layers that catches what their routers see."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from flashmoba._checks import check_int, check_positive_int, check_real
from flashmoba.snr.measurement import _positions_per_sequence


def planted_needle_qk(
    batch: int,
    seqlen: int,
    heads: int,
    head_dim: int,
    *,
    needle_positions,
    query_positions,
    cosine: float,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic q, k ``[batch, seqlen, heads, head_dim]`` (float32) with a planted needle.

    Every key and query is a uniform random unit vector, except: per (sequence, head) a random unit
    direction u; the queries at ``query_positions`` are u; the keys at ``needle_positions`` are unit
    vectors at cosine ``cosine`` to u (u turned by a random orthogonal direction). So the needle keys have
    ``mu_signal = mu_cluster = cosine``, noise keys ``mu_noise = 0`` and ``sigma2 = 1/head_dim``.
    Positions: one list for every sequence, or one list per sequence (as ``measure_router_snr``).
    """
    batch = check_positive_int("batch", batch)
    seqlen = check_positive_int("seqlen", seqlen)
    heads = check_positive_int("heads", heads)
    head_dim = check_int("head_dim", head_dim, minimum=2)
    cosine = check_real("cosine", cosine, minimum=-1.0, maximum=1.0)
    generator = torch.Generator().manual_seed(int(seed))

    def unit(*shape):
        vectors = torch.randn(*shape, head_dim, generator=generator, dtype=torch.float64)
        return vectors / vectors.norm(dim=-1, keepdim=True)

    q, k = unit(batch, seqlen, heads), unit(batch, seqlen, heads)
    directions = unit(batch, heads)  # u per sequence and head
    needles = _positions_per_sequence("needle_positions", needle_positions, batch, seqlen)
    answers = _positions_per_sequence("query_positions", query_positions, batch, seqlen)
    for b in range(batch):
        u = directions[b]  # [heads, D]
        q[b, answers[b]] = u
        other = unit(len(needles[b]), heads)
        other -= (other * u).sum(-1, keepdim=True) * u  # orthogonal to u
        other /= other.norm(dim=-1, keepdim=True)
        k[b, needles[b]] = cosine * u + math.sqrt(1 - cosine**2) * other
    return q.float(), k.float()


def capture_qk(
    model: torch.nn.Module, *inputs, layers: Mapping[str, torch.nn.Module] | None = None, **kwargs
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run ``model(*inputs, **kwargs)`` once without gradients and return each MoBA layer's q and k.

    ``layers``: name -> attention module; default ``{"layer{i}": module for i, module in
    model.moba_layers()}`` (``flashmoba.models.HybridLM``). Each module must expose
    ``project(x) -> (q, k, v)`` (as ``flashmoba.nn.MoBAAttention`` does); its input x is caught by a forward
    pre-hook and projected again, so q and k are exactly what its router sees (after key convolution).
    Batched inputs ``[batch, seqlen]`` only: q ``[batch, T, Hq, D]``, k ``[batch, T, Hkv, D]``. To use a
    training checkpoint, load the model with the model-side code (``flashmoba train`` / ``flashmoba eval``)
    and pass it here.
    """
    if layers is None:
        if not hasattr(model, "moba_layers"):
            raise TypeError("model has no moba_layers(); pass layers={name: attention module}")
        layers = {f"layer{index}": module for index, module in model.moba_layers()}
    if not layers:
        raise ValueError("no MoBA layer to capture (layers is empty)")
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def make_hook(name: str, module: torch.nn.Module):
        if not hasattr(module, "project"):
            raise TypeError(f"layer {name!r} has no project(x) method returning (q, k, v)")

        def hook(_module, args, hook_kwargs):
            if (
                hook_kwargs.get("packed") is not None
                or hook_kwargs.get("cu_seqlens") is not None
                or len(args) > 1
            ):
                raise NotImplementedError(
                    "capture_qk supports batched [batch, seqlen] inputs, not packed ones"
                )
            q, k, _ = module.project(args[0])
            captured[name] = (q.detach(), k.detach())

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(make_hook(name, module), with_kwargs=True))
        with torch.no_grad():
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return captured
