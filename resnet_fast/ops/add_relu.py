"""add_relu(x, residual) = relu(x + residual) in one pass: the residual join of a block.

Variants: ``torch.ops.resnet_fast.add_relu`` (C++ extension: CPU and CUDA kernels) and
``torch.ops.resnet_fast.add_relu_triton``; both get the fake kernel, autograd and the autocast
rule here. :func:`add_relu` picks the variant from the backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends import resolve
from ..kernels.layout import layout_of
from . import reference
from ._common import (
    check_same_meta,
    check_tensor,
    check_triton_device,
    register_common,
    relu_grad,
    triton_kernels,
)


def _validate(x: Tensor, residual: Tensor) -> None:
    check_tensor(x, "add_relu", "x")
    check_tensor(residual, "add_relu", "residual")
    check_same_meta(x, residual, "add_relu", "residual")


@torch.library.custom_op("resnet_fast::add_relu_triton", mutates_args=(),
                         device_types=("cuda", "cpu"))
def _add_relu_triton(x: Tensor, residual: Tensor) -> Tensor:
    _validate(x, residual)
    check_triton_device(x, "add_relu")
    return triton_kernels().add_relu(x, residual)


def _fake(x: Tensor, residual: Tensor) -> Tensor:
    _validate(x, residual)
    return torch.empty_like(x, memory_format=layout_of(x))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    g = relu_grad(out, grad)
    return g, g


def _autocast(args):
    # Mixed dtypes under autocast (a bf16 conv output joining an fp32 residual) promote as
    # eager `torch.relu(x + r)` would.
    x, residual = args
    dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.to(dtype), residual.to(dtype)


register_common("add_relu", fake=_fake, backward=_backward, setup_context=_setup_context,
                autocast=_autocast)


def add_relu(x: Tensor, residual: Tensor, *, backend: str | None = None) -> Tensor:
    """relu(x + residual) in one memory pass.

    Args:
        x, residual: tensors of the same shape, dtype (float32/64, float16, bfloat16) and
            device; no broadcasting. Neither is modified. Under autocast, mixed dtypes promote.
        backend: "reference", "cpu", "cuda", "triton" or "auto" (default: $RESNET_FAST_BACKEND,
            else "auto").
    Returns:
        A new tensor with x's shape, dtype and memory format (NCHW or channels_last).
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        x, residual = _autocast((x, residual))
    check_tensor(x, "add_relu", "x")
    check_tensor(residual, "add_relu", "residual")
    chosen = resolve("add_relu", x.device, backend)
    if chosen == "reference":  # the kernels validate their own arguments
        _validate(x, residual)
        return reference.add_relu(x, residual)
    if chosen == "triton":
        return torch.ops.resnet_fast.add_relu_triton(x, residual)
    return torch.ops.resnet_fast.add_relu(x, residual)
