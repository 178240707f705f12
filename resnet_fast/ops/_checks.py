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
    for name, p in (("scale", scale), ("shift", shift)):
        check_channel_param(x, p, op, name)
    if scale.dtype != shift.dtype:
        raise TypeError(f"{op}: expected scale and shift of one dtype, got {scale.dtype} and "
                        f"{shift.dtype}")
    if residual is not None:
        check_tensor(residual, op, "residual")
        check_same_meta(x, residual, op, "residual")


def check_channel_param(x: Tensor, p, op: str, name: str) -> None:
    """A per-channel parameter: 1-D, one value per channel of x (dim 1), in x's dtype or
    float32, on x's device."""
    check_tensor(p, op, name)
    c = x.shape[1]
    if p.dim() != 1 or p.shape[0] != c:
        raise ValueError(f"{op}: expected {name} of shape ({c},) (one value per channel of x), "
                         f"got {tuple(p.shape)}")
    if p.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{op}: expected {name} in x's dtype ({x.dtype}) or float32, got "
                        f"{p.dtype}")
    if p.device != x.device:
        raise ValueError(f"{op}: expected {name} on the same device as x ({x.device}), got "
                         f"{p.device}")


def int_pair(v, name: str, op: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{op}: expected {name} to be an int or 2 ints, got {v}")
    return v


def check_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
               groups: int, residual: Tensor | None, op: str = "conv_bias_act"):
    """Validates conv_bias_act's arguments (csrc/checks.h checks the same); returns
    (stride, padding, dilation) as pairs and the output shape."""
    check_tensor(x, op, "x")
    if x.dim() != 4:
        raise ValueError(f"{op}: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    check_tensor(weight, op, "weight")
    if weight.dim() != 4:
        raise ValueError(f"{op}: expected weight of shape (K, C/groups, R, S), got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: expected weight in x's dtype ({x.dtype}), got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: expected weight on x's device ({x.device}), got {weight.device}")
    stride, padding, dilation = (int_pair(stride, "stride", op), int_pair(padding, "padding", op),
                                 int_pair(dilation, "dilation", op))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: expected stride >= 1, dilation >= 1 and padding >= 0, got "
                         f"stride {stride}, padding {padding}, dilation {dilation}")
    k_out = weight.shape[0]
    if not isinstance(groups, int) or groups < 1 or k_out % groups:
        raise ValueError(f"{op}: expected groups >= 1 dividing the {k_out} output channels, got "
                         f"groups={groups}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"{op}: x has {x.shape[1]} channels but weight expects "
                         f"{weight.shape[1] * groups} ({weight.shape[1]} per group x groups={groups})")
    if bias is not None:
        check_tensor(bias, op, "bias")
        if bias.dim() != 1 or bias.shape[0] != k_out:
            raise ValueError(f"{op}: expected bias of shape ({k_out},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"{op}: expected bias in x's dtype ({x.dtype}), got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{op}: expected bias on x's device ({x.device}), got {bias.device}")
    out_hw = []
    for i, dim in enumerate(("height", "width")):
        size, k = x.shape[2 + i], weight.shape[2 + i]
        o = (size + 2 * padding[i] - dilation[i] * (k - 1) - 1) // stride[i] + 1
        if o < 1:
            raise ValueError(f"{op}: the {dim} of the output would be {o} (input {size}, kernel "
                             f"{k}, stride {stride[i]}, padding {padding[i]}, dilation "
                             f"{dilation[i]}); expected >= 1")
        out_hw.append(o)
    out_shape = (x.shape[0], k_out, *out_hw)
    if residual is not None:
        check_tensor(residual, op, "residual")
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"{op}: expected residual of the output's shape {out_shape}, got "
                             f"{tuple(residual.shape)} (no broadcasting)")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: expected residual in x's dtype ({x.dtype}), got "
                            f"{residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"{op}: expected residual on x's device ({x.device}), got "
                             f"{residual.device}")
    return stride, padding, dilation, out_shape
