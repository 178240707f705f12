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



def check_scale_shift(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
                      op: str) -> None:
    """scale/shift: 1-D, one value per channel (dim 1), in x's dtype or float32, on x's
    device; residual exactly like x (csrc/checks.h checks the same)."""
    check_tensor(x, op, "x")
    if x.dim() < 2:
        raise ValueError(f"{op}: expected x of shape (N, C, ...) with at least 2 dims, got "
                         f"{tuple(x.shape)}")
    c = x.shape[1]
    for name, p in (("scale", scale), ("shift", shift)):
        check_tensor(p, op, name)
        if p.dim() != 1 or p.shape[0] != c:
            raise ValueError(f"{op}: expected {name} of shape ({c},) (one value per channel of "
                             f"x), got {tuple(p.shape)}")
        if p.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{op}: expected {name} in x's dtype ({x.dtype}) or float32, got "
                            f"{p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{op}: expected {name} on the same device as x ({x.device}), got "
                             f"{p.device}")
    if scale.dtype != shift.dtype:
        raise TypeError(f"{op}: expected scale and shift of one dtype, got {scale.dtype} and "
                        f"{shift.dtype}")
    if residual is not None:
        check_tensor(residual, op, "residual")
        check_same_meta(x, residual, op, "residual")
