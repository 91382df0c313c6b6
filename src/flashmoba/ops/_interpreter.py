"""A fix to Triton's interpreter (TRITON_INTERPRET=1), applied on import of ``flashmoba.ops``.

The interpreter holds a loaded scalar as a 1-element array and converts it with ``int(array)`` where a
kernel uses it as a loop bound; NumPy 2.3+ rejects that for arrays of one dimension. The shim converts
through ``reshape(-1)[0]`` instead. Compiled kernels never pass through here.
"""

from __future__ import annotations

import os


def install_numpy2_shim() -> None:
    """Let the interpreter use a loaded scalar as a loop bound with NumPy >= 2.3 (idempotent)."""
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
    install_numpy2_shim()
