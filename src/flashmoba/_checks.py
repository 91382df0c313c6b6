"""One home for argument validation: integers, bools, real numbers, choices, packed-sequence offsets.

Every check raises before any work is done, with a message that names the argument, what was expected
and what came. Integers may be Python or NumPy integers (never bools); each check returns the value as
a plain Python object so that callers pass on ``int`` / ``float`` / ``bool``.

This module sits below every other one (it imports only torch and NumPy), so kernels, the public
functions, the model and the commands all validate the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing

import numpy as np
import torch


def _type_name(value) -> str:
    return type(value).__name__


def is_integer(value) -> bool:
    """A Python or NumPy integer, and not a bool (``True`` is an int to Python, never a size to us)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int, within ``[minimum, maximum]`` where given."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an int, got {_type_name(value)} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_positive_int(name: str, value) -> int:
    return check_int(name, value, minimum=1)


def check_bool(name: str, value) -> bool:
    """A real bool (a string such as ``"False"`` is refused, not read as truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)} {value!r}")
    return bool(value)


def check_real(
    name: str,
    value,
    *,
    minimum: float | None = None,
    exclusive_minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """A finite real number (Python or NumPy; not a bool) as a float, within the given bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if exclusive_minimum is not None and not value > exclusive_minimum:
        raise ValueError(f"{name} must be > {exclusive_minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    """One of ``choices`` (compared by equality; the message lists them)."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_cu_seqlens_tensor(name: str, cu_seqlens, device: torch.device | None = None) -> None:
    """Type, dtype, shape and device of packed-sequence offsets (int32 ``[batch + 1]``); no values read."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {_type_name(cu_seqlens)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D of length batch + 1, got shape {tuple(cu_seqlens.shape)}")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"{name} must be on the tensors' device {device}, got {cu_seqlens.device}")


def check_cu_seqlens_values(name: str, values: list[int], total: int) -> list[int]:
    """Offsets read back to the host: 0 first, non-decreasing, ``total`` last. Returns the lengths."""
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    lengths = [end - start for start, end in zip(values[:-1], values[1:])]
    if any(length < 0 for length in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the packed length {total}, got {values[-1]}")
    return lengths


@functools.cache
def bool_fields(config_class) -> frozenset[str]:
    """The fields of dataclass ``config_class`` typed ``bool`` or ``bool | None`` (launch configs: the
    others are integers), read from its type hints once per class."""
    hints = typing.get_type_hints(config_class)
    return frozenset(
        field.name
        for field in dataclasses.fields(config_class)
        if hints[field.name] is bool or bool in typing.get_args(hints[field.name])
    )
