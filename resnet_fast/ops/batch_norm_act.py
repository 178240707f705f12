"""batch_norm_act: ``nn.BatchNorm2d`` followed by (+ residual) and ReLU, fused, with the exact
semantics of the module: batch statistics in training (or without running stats), running-stat
update with the unbiased variance, ``momentum=None`` as a cumulative average over
``num_batches_tracked``, ``affine=False``, and eval mode from the running statistics.

Training runs two primitives per call, each one op per backend:
``bn_act_fwd(x, weight, bias, residual, relu, eps) -> (out, mean, var)`` (statistics pass, then
one fused apply + add + ReLU pass) and its backward ``bn_act_bwd`` (one reduction pass, one
element pass for dx and d residual), from the saved statistics and the output (the ReLU mask).
On every backend but one the statistics pass is ours too; CUDA's is ATen's Welford reduction
(csrc/cuda/batch_norm_cuda.cu).
A backward that must itself be differentiable (create_graph=True, e.g. a gradient penalty) runs
the same formula in PyTorch ops instead. An empty batch runs eager BatchNorm's empty path.
Variants: ``torch.ops.resnet_fast.bn_act_fwd`` / ``bn_act_bwd`` (C++: CPU and CUDA) and
``*_triton``. ``torch.ops.resnet_fast.batch_norm_act`` is the whole thing as one registered op
(CompositeImplicitAutograd: autograd and compile see the primitives).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backends import resolve
from ..kernels.layout import layout_of
from . import reference
from ._common import (
    LIB,
    autocast_kernel,
    check_channel_param,
    check_same_meta,
    check_tensor,
    check_triton_device,
    qualnames,
    relu_grad,
)
from .scale_shift_act import scale_shift_act


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           residual: Optional[Tensor], training: bool) -> None:
    check_tensor(x, "batch_norm_act", "x")
    if x.dim() < 2:
        raise ValueError(f"batch_norm_act: expected x of shape (N, C, ...), got {tuple(x.shape)}")
    c = x.shape[1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_channel_param(x, p, "batch_norm_act", name)
    if residual is not None:
        check_same_meta(x, residual, "batch_norm_act", "residual")
    if training and c and x.numel() // c == 1:
        # nn.BatchNorm2d raises the same (and, like it, lets an empty batch through).
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(x.shape)}")


# The Triton variants ------------------------------------------------------------------------

def _triton():
    from ..kernels.triton import batch_norm
    return batch_norm


@torch.library.custom_op("resnet_fast::bn_act_fwd_triton", mutates_args=(),
                         device_types=("cuda", "cpu"))
def _fwd_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                residual: Optional[Tensor], relu: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check(x, weight, bias, residual, True)
    check_triton_device(x, "batch_norm_act")
    return _triton().bn_act_fwd(x, weight, bias, residual, relu, eps)


@torch.library.custom_op("resnet_fast::bn_act_bwd_triton", mutates_args=(),
                         device_types=("cuda", "cpu"))
def _bwd_triton(grad: Tensor, x: Tensor, out: Tensor, weight: Optional[Tensor], mean: Tensor,
                var: Tensor, eps: float, relu: bool,
                residual_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_triton_device(x, "batch_norm_act")
    return _triton().bn_act_bwd(grad, x, out, weight, mean, var, eps, relu, residual_grad)


# Fake kernels, autograd, autocast for every variant ------------------------------------------

def _fwd_fake(x, weight, bias, residual, relu, eps):
    _check(x, weight, bias, residual, True)
    c = x.shape[1]
    stats = dict(device=x.device, dtype=_stat_dtype(x))
    return (torch.empty_like(x, memory_format=layout_of(x)), x.new_empty(c, **stats),
            x.new_empty(c, **stats))


def _bwd_fake(grad, x, out, weight, mean, var, eps, relu, residual_grad):
    c = x.shape[1]
    fmt = layout_of(x)
    stats = dict(device=x.device, dtype=_stat_dtype(x))
    dres = torch.empty_like(x, memory_format=fmt) if residual_grad else x.new_empty(0)
    return (torch.empty_like(x, memory_format=fmt), x.new_empty(c, **stats),
            x.new_empty(c, **stats), dres)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, relu, eps = inputs
    out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.eps, ctx.relu = eps, relu
    ctx.has_weight, ctx.has_bias, ctx.has_residual = (weight is not None, bias is not None,
                                                      residual is not None)
    ctx.param_dtypes = (None if weight is None else weight.dtype,
                        None if bias is None else bias.dtype)
    ctx.save_for_backward(x, weight, mean, var, out)


def _differentiable_bwd(grad, x, out, weight, eps, relu):
    """What bn_act_bwd computes, in differentiable PyTorch ops: the kernels' backward has no
    autograd of its own, so a backward with create_graph=True (a gradient penalty) runs this
    instead. The statistics are recomputed from x, since their dependence on x is part of the
    second derivative; the ReLU mask is piecewise constant and comes from the saved output."""
    stat = _stat_dtype(x)
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xs = x.to(stat)
    var, mean = torch.var_mean(xs, dim=dims, correction=0)
    invstd = torch.rsqrt(var + eps)
    xhat = (xs - mean.view(shape)) * invstd.view(shape)
    g = relu_grad(out, grad) if relu else grad
    gs = g.to(stat)
    n = x.numel() // x.shape[1]
    sg = gs.sum(dims)
    sgx = (gs * xhat).sum(dims)
    a = invstd if weight is None else weight.to(stat) * invstd
    dx = a.view(shape) * (gs - (sg / n).view(shape) - xhat * (sgx / n).view(shape))
    return dx.to(x.dtype), sgx, sg, g


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, mean, var, out = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: the gradients must themselves be differentiable.
            dx, dweight, dbias, dres = _differentiable_bwd(grad_out, x, out, weight, ctx.eps,
                                                           ctx.relu)
        else:
            # The kernels make grad dense in x's layout themselves.
            dx, dweight, dbias, dres = bwd_op(grad_out, x, out, weight, mean, var, ctx.eps,
                                              ctx.relu, bool(ctx.has_residual and need[3]))
        return (dx if need[0] else None,
                dweight.to(ctx.param_dtypes[0]) if ctx.has_weight and need[1] else None,
                dbias.to(ctx.param_dtypes[1]) if ctx.has_bias and need[2] else None,
                dres if ctx.has_residual and need[3] else None, None, None)
    return backward


def _autocast(args):
    # x and residual promote as eager's add would; weight/bias stay float32 when they are.
    x, weight, bias, residual, relu, eps = args
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)

    def cast(p):
        return p if p is None or p.dtype in (dtype, torch.float32) else p.float()

    return (x.to(dtype), cast(weight), cast(bias),
            None if residual is None else residual.to(dtype), relu, eps)


for _qualname in qualnames("bn_act_fwd"):
    _name = _qualname.split("::")[1]
    _bwd_name = _name.replace("fwd", "bwd")
    torch.library.register_fake(_qualname, _fwd_fake)
    torch.library.register_fake(f"resnet_fast::{_bwd_name}", _bwd_fake)
    torch.library.register_autograd(
        _qualname, _make_backward(getattr(torch.ops.resnet_fast, _bwd_name)),
        setup_context=_setup_context)
    for _key, _device in (("AutocastCPU", "cpu"), ("AutocastCUDA", "cuda")):
        LIB.impl(_name, autocast_kernel(getattr(torch.ops.resnet_fast, _name).default, _device,
                                          _autocast), _key)


# The public op ------------------------------------------------------------------------------

def _batch_stats_forward(x, weight, bias, residual, relu, eps, backend):
    chosen = resolve("bn_act_fwd", x.device, backend)
    if chosen == "reference":
        return reference.bn_act_fwd(x, weight, bias, residual, relu, eps)
    op = (torch.ops.resnet_fast.bn_act_fwd_triton if chosen == "triton"
          else torch.ops.resnet_fast.bn_act_fwd)
    return op(x, weight, bias, residual, relu, eps)


def _act(out: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                   momentum: Optional[float], eps: float, residual: Optional[Tensor] = None,
                   relu: bool = True, num_batches_tracked: Optional[Tensor] = None, *,
                   backend: Optional[str] = None) -> Tensor:
    """``act(batch_norm(x) (+ residual))`` as ``nn.BatchNorm2d`` -> add -> ReLU computes it.

    Args:
        x: (N, C, ...) float32/64, float16 or bfloat16, NCHW or channels_last.
        weight, bias: (C,) affine parameters in x's dtype or float32, or None (affine=False).
        running_mean, running_var: (C,) running statistics, updated in place when training
            (both None: track_running_stats=False, batch statistics always).
        training: batch statistics (and the running-stat update) instead of the running ones.
        momentum: the update factor; None = cumulative average over ``num_batches_tracked``.
        eps: added to the variance.
        residual: optional tensor like x added before the ReLU.
        relu: apply ReLU (NaN-propagating, like torch.relu).
        num_batches_tracked: the module's counter: incremented in place when training with
            running stats (required when momentum is None).
        backend: "reference", "cpu", "cuda", "triton" or "auto".
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        # Before the checks, as scale_shift_act does: mixed x/residual dtypes promote as eager's
        # add would instead of being refused.
        x, weight, bias, residual, relu, eps = _autocast((x, weight, bias, residual, relu, eps))
    use_batch_stats = training or (running_mean is None and running_var is None)
    _check(x, weight, bias, residual, use_batch_stats)
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm_act: expected running_mean and running_var both or neither, "
                         f"got running_mean={'a tensor' if running_mean is not None else None}, "
                         f"running_var={'a tensor' if running_var is not None else None}")
    if not use_batch_stats:
        # Eval: a per-channel scale and shift from the running statistics; one fused pass.
        invstd = torch.rsqrt(running_var.to(_stat_dtype(x)) + eps)
        scale = invstd * weight.to(invstd.dtype) if weight is not None else invstd
        shift = -running_mean.to(invstd.dtype) * scale
        if bias is not None:
            shift = shift + bias.to(invstd.dtype)
        return scale_shift_act(x, scale, shift, residual, relu, backend=backend)
    empty = x.numel() == 0
    if empty:
        # No statistics to compute; eager BatchNorm's empty-batch output (x * weight + bias,
        # empty) keeps weight and bias in the graph, so they get zero gradients as in torch.
        out = _act(torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps),
                   residual, relu)
    else:
        out, mean, var = _batch_stats_forward(x, weight, bias, residual, relu, eps, backend)
    if training and running_mean is not None:
        if momentum is None and num_batches_tracked is None:
            raise ValueError("batch_norm_act: momentum=None (cumulative average) needs "
                             "num_batches_tracked")
        with torch.no_grad():
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)  # nn.BatchNorm2d counts an empty batch too
            if empty:
                return out  # ... but leaves its running statistics alone
            factor = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
            n = x.numel() // x.shape[1]
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_((var * (n / (n - 1))).to(running_var.dtype),
                                              alpha=factor)
    return out


# torch.ops.resnet_fast.batch_norm_act: the same function as one registered op.
LIB.define("batch_norm_act(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
            "Tensor(b!)? running_var, bool training, float? momentum, float eps, "
            "Tensor? residual=None, bool relu=True, Tensor(c!)? num_batches_tracked=None) -> Tensor")
LIB.impl("batch_norm_act", lambda *args: batch_norm_act(*args), "CompositeImplicitAutograd")
