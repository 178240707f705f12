"""The argument types every ``resnet-fast`` command shares (argparse ``type=`` callables that
refuse a bad value with the reason, exit 2) and the ``--dtype`` names."""

from __future__ import annotations

import argparse
import math
from typing import Callable

import torch

# The --dtype names the commands accept.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def positive_finite(text: str) -> float:
    """An argparse type: a finite number > 0 (a NaN tolerance would pass nothing, silently)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def batch_sizes(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers >= 1."""
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return sizes


def torch_device(text: str) -> torch.device:
    """An argparse type: cpu or cuda[:N] with that CUDA device visible."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda" and torch.cuda.device_count() <= (dev.index or 0):
        raise argparse.ArgumentTypeError(f"expected a visible CUDA device, got {text!r} "
                                         f"({torch.cuda.device_count()} visible)")
    return dev
