"""The PyTorch reference for every resnet_fast op: plain eager code, the one definition
that kernels in every backend are tested against. No validation here
(each op validates where it runs: see the op's file and ops/_common.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    """relu(x + residual), computed as eager PyTorch does it."""
    return torch.relu(x + residual)


def scale_shift_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None,
                    relu: bool = True) -> Tensor:
    """act(x * scale[c] + shift[c] (+ residual)) with channels on dim 1, as eager PyTorch
    computes it in x's dtype (scale/shift cast to it)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                  groups: int, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """act(conv2d(x, weight) + bias (+ residual)), as eager PyTorch computes it."""
    out = torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def bn_act_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
               relu: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training BatchNorm (batch statistics, no running stats) -> (+ residual) -> ReLU as eager
    PyTorch computes it, and the batch mean and biased variance (float32; float64 for float64)."""
    dims = [0] + list(range(2, x.dim()))
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        var, mean = torch.var_mean(x.to(stat), dim=dims, correction=0)
    out = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if residual is not None:
        out = out + residual
    return (torch.relu(out) if relu else out), mean, var
