"""add_relu(x, residual) = relu(x + residual) in one pass: the residual join of a block.

Registered as ``torch.ops.resnet_fast.add_relu`` by the C++ extension (CPU and CUDA
kernels); this module adds the fake kernel (for torch.compile / export) and autograd, and
the public function that picks a backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from ..backends import resolve
from . import reference
from ._checks import check_same_meta, check_tensor

OP = "resnet_fast::add_relu"


def _validate(x: Tensor, residual: Tensor) -> None:
    check_tensor(x, "add_relu", "x")
    check_tensor(residual, "add_relu", "residual")
    check_same_meta(x, residual, "add_relu", "residual")


def _layout(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


if _extension.loaded():

    @torch.library.register_fake(OP)
    def _add_relu_fake(x: Tensor, residual: Tensor) -> Tensor:
        _validate(x, residual)
        return torch.empty_like(x, memory_format=_layout(x))

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    def _backward(ctx, grad):
        (out,) = ctx.saved_tensors
        # d relu(s)/ds = 1 where the output is positive (NaN output -> 0, as torch.relu).
        g = torch.where(out > 0, grad, torch.zeros_like(grad))
        return g, g

    torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


def add_relu(x: Tensor, residual: Tensor, *, backend: str | None = None) -> Tensor:
    """relu(x + residual) in one memory pass.

    Args:
        x, residual: tensors of the same shape, dtype (float32/64, float16, bfloat16) and
            device; no broadcasting. Neither is modified.
        backend: "reference", "cpu", "cuda", "triton" or "auto" (default: $RESNET_FAST_BACKEND,
            else "auto").
    Returns:
        A new tensor with x's shape, dtype and memory format (NCHW or channels_last).
    """
    _validate(x, residual)
    if resolve("add_relu", x.device, backend) == "reference":
        return reference.add_relu(x, residual)
    return torch.ops.resnet_fast.add_relu(x, residual)
