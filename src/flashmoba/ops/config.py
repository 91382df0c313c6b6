"""``KernelConfig``: every setting of the Triton path that a caller may choose, passed to the launchers.

The defaults are the measured choices (benchmarks/NOTES.md). A tile field left at None lets the
launcher's heuristic decide for the shapes at hand, in one place per kernel: ``router._topk_config``,
``forward.forward_tiles``, ``backward.backward_tiles``. A field that is set replaces the heuristic's
choice for every shape, so a benchmark sweeps a setting by passing configs, not by mutating modules.

Fields named ``<kernel>_<setting>`` set one launch setting of one kernel ("router": the top-k kernel,
"forward": the partial-attention kernel, "backward": the dK/dV kernel), by the name the launch uses
(``KernelConfig.launch_settings``).

The ``torch.library`` ops take the fields as trailing optional arguments, in field order
(``flashmoba.ops.autograd``).
"""

from __future__ import annotations

import dataclasses

from flashmoba._checks import check_bool, check_int, check_positive_int

# Triton's launch options keep their lower-case names; the other settings are the kernels' constexprs.
LAUNCH_OPTIONS = ("num_warps", "num_stages")
KERNELS = ("router", "forward", "backward")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch settings of the Triton kernels (None: the launcher's heuristic decides for the shapes)."""

    # Router, the top-k kernel: query rows per program, centroids per tile, warps, pipeline stages.
    router_block_m: int | None = None
    router_block_n: int | None = None
    router_num_warps: int | None = None
    router_num_stages: int | None = None
    # Skip a centroid tile that no row of the program can use.
    router_filter: bool = True
    # A tile that at most this many keys per row can enter takes single-key insertions instead of a
    # full tl.topk merge (see "Router: insert rounds" in benchmarks/NOTES.md).
    router_insert_rounds: int = 8

    # Forward, the partial-attention kernel: gathered query rows and keys per tile, warps, stages.
    forward_block_m: int | None = None
    forward_block_n: int | None = None
    forward_num_warps: int | None = None
    forward_num_stages: int | None = None
    # Scratch bytes of the partial outputs per chunk; None: max(64 MiB, 2 x the output and its lse).
    partial_buffer_bytes: int | None = None
    # Partial outputs of float16/bfloat16 inputs in that dtype (half the bytes, one more rounding per
    # partial; see "Forward: partials in the input dtype" in benchmarks/NOTES.md); False: float32.
    partials_in_input_dtype: bool = True

    # Backward, the dK/dV kernel: key rows and gathered query rows per tile, warps, stages.
    backward_block_m: int | None = None
    backward_block_n: int | None = None
    backward_num_warps: int | None = None
    backward_num_stages: int | None = None
    # dQ by stored per-pair partials and a sum where that applies; False: float32 atomics (or the
    # second pass with deterministic=True).
    dq_by_stored_partials: bool = True

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool":
                check_bool(field.name, value)
            elif field.name == "router_insert_rounds":
                check_int(field.name, value, minimum=0)  # 0: every tile that may change a list merges
            elif value is not None:
                check_positive_int(field.name, value)

    def launch_settings(self, kernel: str) -> dict:
        """The settings this config sets (not None) for ``kernel``, by the names its launch uses:
        ``router_block_m`` -> ``BLOCK_M``, ``router_num_warps`` -> ``num_warps``."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        settings = {}
        for field in dataclasses.fields(self):
            setting = field.name.removeprefix(kernel + "_")
            value = getattr(self, field.name)
            if setting != field.name and value is not None:
                settings[setting if setting in LAUNCH_OPTIONS else setting.upper()] = value
        return settings

    @classmethod
    def for_kernel(cls, kernel: str, settings: dict) -> KernelConfig:
        """The config that sets ``settings`` (named as the launch names them) for ``kernel``; the inverse
        of ``launch_settings``. ``KernelConfig.for_kernel("router", dict(BLOCK_M=128, num_warps=8))``."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        return cls(**{f"{kernel}_{name.lower()}": value for name, value in settings.items()})


DEFAULT_CONFIG = KernelConfig()
