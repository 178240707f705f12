"""scale_shift_act(x, scale, shift, residual=None, relu=True)
= act(x * scale[c] + shift[c] (+ residual)) in one pass: eval BatchNorm (scale = gamma /
sqrt(var + eps), shift = beta - mean * scale) fused with the residual join and ReLU, or the
apply half of training BN.

Variants: ``torch.ops.resnet_fast.scale_shift_act`` (C++: CPU and CUDA) and
``torch.ops.resnet_fast.scale_shift_act_triton``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import resolve
from ..kernels.layout import layout_of
from . import reference
from ._common import (
    check_channel_param,
    check_same_meta,
    check_tensor,
    check_triton_device,
    register_common,
    relu_grad,
    triton_kernels,
)


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


@torch.library.custom_op("resnet_fast::scale_shift_act_triton", mutates_args=(),
                         device_types=("cuda", "cpu"))
def _scale_shift_act_triton(x: Tensor, scale: Tensor, shift: Tensor,
                            residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    check_scale_shift(x, scale, shift, residual, "scale_shift_act")
    check_triton_device(x, "scale_shift_act")
    return triton_kernels().scale_shift_act(x, scale, shift, residual, relu)


def _fake(x, scale, shift, residual=None, relu=True):
    check_scale_shift(x, scale, shift, residual, "scale_shift_act")
    return torch.empty_like(x, memory_format=layout_of(x))


def _full_args(args):
    """(x, scale, shift, residual, relu) with the schema defaults filled in: the dispatcher may
    drop trailing arguments that equal their defaults."""
    x, scale, shift, *rest = args
    residual = rest[0] if len(rest) > 0 else None
    relu = rest[1] if len(rest) > 1 else True
    return x, scale, shift, residual, relu


def _setup_context(ctx, inputs, output):
    x, scale, shift, residual, relu = _full_args(inputs)
    ctx.n_inputs = len(inputs)
    ctx.relu = relu
    ctx.has_residual = residual is not None
    ctx.param_dtype = scale.dtype
    ctx.save_for_backward(x, scale, output if relu else None)


def _backward(ctx, grad):
    x, scale, out = ctx.saved_tensors
    g = relu_grad(out, grad) if ctx.relu else grad
    shape = (1, -1) + (1,) * (x.dim() - 2)
    reduce_dims = [0] + list(range(2, x.dim()))
    need_x, need_scale, need_shift, need_res = (list(ctx.needs_input_grad) + [False] * 4)[:4]
    # Per-channel sums in float (opmath) even for half inputs, cast back to the param dtype.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g_acc = g.to(acc)
    dx = (g_acc * scale.to(acc).view(shape)).to(x.dtype) if need_x else None
    dscale = (g_acc * x.to(acc)).sum(reduce_dims).to(ctx.param_dtype) if need_scale else None
    dshift = g_acc.sum(reduce_dims).to(ctx.param_dtype) if need_shift else None
    dres = g if (need_res and ctx.has_residual) else None
    return (dx, dscale, dshift, dres, None)[:ctx.n_inputs]


def _autocast(args):
    # x and residual promote as eager would; scale/shift stay float32 when they are (the
    # kernels accept float32 parameters with any activation dtype).
    x, scale, shift, residual, relu = _full_args(args)
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    x = x.to(dtype)
    residual = None if residual is None else residual.to(dtype)
    if scale.dtype not in (dtype, torch.float32):
        scale = scale.float()
    if shift.dtype != scale.dtype:
        shift = shift.to(scale.dtype)
    return x, scale, shift, residual, relu


register_common("scale_shift_act", fake=_fake, backward=_backward, setup_context=_setup_context,
                autocast=_autocast)


def scale_shift_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None,
                    relu: bool = True, *, backend: str | None = None) -> Tensor:
    """act(x * scale[c] + shift[c] (+ residual)) in one memory pass, channels on dim 1.

    Args:
        x: (N, C, ...) float32/64, float16 or bfloat16, NCHW or channels_last.
        scale, shift: (C,) in x's dtype or float32.
        residual: optional, same shape/dtype/device as x (no broadcasting).
        relu: apply ReLU (NaN-propagating, like torch.relu) after the add.
        backend: "reference", "cpu", "cuda", "triton" or "auto".
    Returns:
        A new tensor with x's shape, dtype and memory format; inputs are not modified.
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        x, scale, shift, residual, relu = _autocast((x, scale, shift, residual, relu))
    check_tensor(x, "scale_shift_act", "x")
    chosen = resolve("scale_shift_act", x.device, backend)
    if chosen == "reference":  # the kernels validate their own arguments
        check_scale_shift(x, scale, shift, residual, "scale_shift_act")
        return reference.scale_shift_act(x, scale, shift, residual, relu)
    if chosen == "triton":
        return torch.ops.resnet_fast.scale_shift_act_triton(x, scale, shift, residual, relu)
    return torch.ops.resnet_fast.scale_shift_act(x, scale, shift, residual, relu)
