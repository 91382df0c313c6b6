"""Triton kernels of flashmoba (imported on first use of ``backend="triton"``, never by ``import flashmoba``).

- ``router``: block centroids and the fused top-k (the selection of each query row and head);
- ``index``: the key-block-major list of routed (query row, slot) pairs built from the selection;
- ``forward`` / ``backward``: the sparse attention kernels and their launchers;
- ``autograd``: the ``torch.library`` custom ops (fake kernels, autograd) and the functions below, which
  ``flashmoba.api`` calls.
"""

from __future__ import annotations

import os


def _interpreter_numpy2_shim() -> None:
    """Let TRITON_INTERPRET=1 use a loaded scalar as a loop bound with NumPy >= 2.3.

    The interpreter holds a loaded scalar as a 1-element array and converts it with ``int(array)``, which
    NumPy 2.3+ rejects for arrays of one dimension; convert through ``reshape(-1)[0]`` instead.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_flashmoba_shim", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._flashmoba_shim = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy2_shim()

from flashmoba.ops.autograd import (  # noqa: E402
    moba_attn_triton,
    moba_attn_varlen_triton,
    moba_select_triton,
    moba_select_varlen_triton,
)

__all__ = ["moba_attn_triton", "moba_attn_varlen_triton", "moba_select_triton", "moba_select_varlen_triton"]
