"""argparse ``type=`` functions shared by the commands: each parses one flag's text and raises
``argparse.ArgumentTypeError`` on a bad value, so that argparse exits with status 2 and a message that
names the flag ("argument --block-sizes: must be >= 1, got 0")."""

from __future__ import annotations

import argparse

from flashmoba._checks import check_int, check_real


def int_at_least(minimum: int):
    """An int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        try:
            return check_int("", value, minimum=minimum)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).strip()) from None

    return parse


def ints_at_least(minimum: int):
    """A comma list of at least one int, each >= ``minimum``."""
    entry = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        values = [entry(item) for item in text.split(",") if item.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")
        return values

    return parse


def real(**bounds):
    """A finite number within ``bounds`` (those of ``check_real``: minimum, exclusive_minimum, maximum)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check_real("", value, **bounds)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).strip()) from None

    return parse


def device(text: str):
    """A torch device name."""
    import torch

    try:
        return torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device, got {text!r}") from None
