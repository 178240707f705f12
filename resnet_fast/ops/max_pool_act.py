"""max_pool_act(x, kernel_size, stride, padding, relu) = act(max_pool2d(x, ...)): the stem's
maxpool on CPU (``torch.ops.resnet_fast.max_pool_act``, C++), values only (torch's CPU
max_pool2d also writes the argmax of every output), with the stem's ReLU moved behind it where
the models' programs would otherwise run it as a pass of its own: max and ReLU commute, NaN
included (a NaN in a window wins the max, and ReLU keeps it).

Dilation 1 and floor rounding, as ``nn.MaxPool2d``'s defaults; the programs use it only for an
``nn.MaxPool2d`` with those (``pool_args``). The fake kernel and autograd (the gradient of
torch's own max_pool2d and relu on the saved input: the same window maxima, so the same
argmax) are registered here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .. import _extension
from ..kernels.layout import layout_of

Args = tuple[list[int], list[int], list[int]]


def pool_args(pool: nn.Module) -> Optional[Args]:
    """(kernel_size, stride, padding) of ``pool`` where max_pool_act computes exactly what it
    does: an ``nn.MaxPool2d`` (the exact class) with dilation 1, floor rounding and no
    indices; else None."""
    if (type(pool) is not nn.MaxPool2d or _pair(pool.dilation) != (1, 1) or pool.ceil_mode
            or pool.return_indices):
        return None
    stride = pool.kernel_size if pool.stride is None else pool.stride
    return list(_pair(pool.kernel_size)), list(_pair(stride)), list(_pair(pool.padding))


def _out_shape(x: Tensor, kernel_size, stride, padding) -> list[int]:
    """What the C++ op checks, in its order and with its words."""
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"max_pool_act: expected a float32, float64, float16 or bfloat16 "
                        f"tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"max_pool_act: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    if not len(kernel_size) == len(stride) == len(padding) == 2:
        raise ValueError(f"max_pool_act: expected 2 values each for kernel_size, stride and "
                         f"padding, got {list(kernel_size)}, {list(stride)}, {list(padding)}")
    shape = [x.shape[0], x.shape[1]]
    for d, (k, s, p) in enumerate(zip(kernel_size, stride, padding)):
        if not (k > 0 and s > 0 and 0 <= 2 * p <= k):
            raise ValueError(f"max_pool_act: expected kernel_size > 0, stride > 0 and 0 <= "
                             f"padding <= kernel_size / 2, got kernel_size {list(kernel_size)}, "
                             f"stride {list(stride)}, padding {list(padding)}")
        if x.shape[2 + d] + 2 * p < k:
            raise ValueError(f"max_pool_act: expected an input at least the window ({k - 2 * p}) "
                             f"in each spatial dim after padding, got {tuple(x.shape)}")
        shape.append((x.shape[2 + d] + 2 * p - k) // s + 1)
    return shape


if _extension.has_kernel("max_pool_act", "CPU"):
    @torch.library.register_fake("resnet_fast::max_pool_act")
    def _fake(x, kernel_size, stride, padding, relu=False):
        shape = _out_shape(x, kernel_size, stride, padding)
        return x.new_empty(shape).contiguous(memory_format=layout_of(x))

    def _setup_context(ctx, inputs, output):
        x, kernel_size, stride, padding, relu = inputs
        ctx.save_for_backward(x)
        ctx.args = (kernel_size, stride, padding, relu)

    def _backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding, relu = ctx.args
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            y = F.max_pool2d(x, kernel_size, stride, padding)
            (dx,) = torch.autograd.grad(y.relu() if relu else y, x, grad)
        return dx, None, None, None, None

    torch.library.register_autograd("resnet_fast::max_pool_act", _backward,
                                    setup_context=_setup_context)
