"""``KernelConfig``: every setting of the Triton path that a caller may choose, passed to the launchers.

The defaults are the measured choices (benchmarks/NOTES.md). A tile field left at None lets the
launcher's heuristic decide for the shapes at hand, in one place per kernel: ``router._topk_config``,
``forward.forward_tiles``, ``backward.backward_tiles``. A field that is set replaces the heuristic's
choice for every shape, so a benchmark sweeps a setting by passing configs, not by mutating modules.

Fields named ``<kernel>_<setting>`` set one launch setting of one kernel ("router": the top-k kernel,
"forward": the partial-attention kernel, "backward": the dK/dV kernel), by the name the launch uses
(``KernelConfig.launch_settings``).

The ``torch.library`` ops take a config as one optional ``int[]`` argument (``KernelConfig.encode``;
``flashmoba.ops.autograd``): one argument, because the dispatcher's cost per call grows with the square of
an op's argument count (``torch._library.utils.fill_defaults``), which a field per argument made
measurable at small shapes.
"""

from __future__ import annotations

import dataclasses
import functools

from flashmoba._checks import bool_fields, check_bool, check_int, check_positive_int

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

    # Work items, forward and dK/dV kernels (and the deterministic dQ pass): the routed rows of one
    # (key block, head) column are cut into items of at most this many, each taken by its own program, so
    # that a hot column (trained routers send ~10x the mean rows to a few early blocks) does not hold up
    # its launch. Rounded up to a multiple of each kernel's BLOCK_M; 0: one item per column, never split.
    # See "Work items: splitting long columns" in benchmarks/NOTES.md.
    rows_per_item: int = 1024

    def __post_init__(self):
        flags = bool_fields(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in flags:
                check_bool(field.name, value)
            elif field.name == "router_insert_rounds":
                check_int(field.name, value, minimum=0)  # 0: every tile that may change a list merges
            elif field.name == "rows_per_item":
                check_int(field.name, value, minimum=0)  # 0: never split a column
            elif value is not None:
                check_positive_int(field.name, value)

    def launch_settings(self, kernel: str) -> dict:
        """The settings this config sets (not None) for ``kernel``, by the names its launch uses:
        ``router_block_m`` -> ``BLOCK_M``, ``router_num_warps`` -> ``num_warps``."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        return dict(_launch_settings(self, kernel))

    def encode(self) -> list[int]:
        """The fields as one list of ints, in field order (None -> -1, bools -> 0/1): how a config crosses
        the ``torch.library`` ops as a single ``int[]`` argument. ``decode`` inverts it."""
        return [-1 if value is None else int(value) for value in dataclasses.astuple(self)]

    @classmethod
    def decode(cls, values: list[int]) -> KernelConfig:
        fields = dataclasses.fields(cls)
        if len(values) != len(fields):
            raise ValueError(f"a KernelConfig encodes as {len(fields)} ints, got {len(values)}")
        return cls(
            **{
                field.name: bool(value) if field.type == "bool" else (None if value == -1 else value)
                for field, value in zip(fields, values)
            }
        )

    @classmethod
    def for_kernel(cls, kernel: str, settings: dict) -> KernelConfig:
        """The config that sets ``settings`` (named as the launch names them) for ``kernel``; the inverse
        of ``launch_settings``. ``KernelConfig.for_kernel("router", dict(BLOCK_M=128, num_warps=8))``."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        return cls(**{f"{kernel}_{name.lower()}": value for name, value in settings.items()})


@functools.cache
def _launch_settings(config: KernelConfig, kernel: str) -> tuple[tuple[str, int], ...]:
    """``KernelConfig.launch_settings``, computed once per (config, kernel): it runs on every launch."""
    settings = []
    for field in dataclasses.fields(config):
        setting = field.name.removeprefix(kernel + "_")
        value = getattr(config, field.name)
        if setting != field.name and value is not None:
            settings.append((setting if setting in LAUNCH_OPTIONS else setting.upper(), value))
    return tuple(settings)


DEFAULT_CONFIG = KernelConfig()
