"""Input validation shared by the public ops, the reference path and the fake kernels, so
that every backend refuses the same inputs with the same message."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(t: object, op: str, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: expected a float32, float64, float16 or bfloat16 tensor for "
                        f"{name}, got {t.dtype}")


def check_same_meta(x: Tensor, other: Tensor, op: str, other_name: str) -> None:
    if x.shape != other.shape:
        raise ValueError(f"{op}: expected {other_name} to have the same shape as x "
                         f"{tuple(x.shape)}, got {tuple(other.shape)} (no broadcasting)")
    if x.dtype != other.dtype:
        raise TypeError(f"{op}: expected {other_name} to have the same dtype as x ({x.dtype}), "
                        f"got {other.dtype}")
    if x.device != other.device:
        raise ValueError(f"{op}: expected {other_name} on the same device as x ({x.device}), "
                         f"got {other.device}")
