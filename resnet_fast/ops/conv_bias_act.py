"""conv_bias_act(x, weight, bias, stride, padding, dilation, groups, residual=None, relu=True)
= act(conv2d(x, weight) + bias[k] (+ residual)): a convolution whose BatchNorm was folded into
weight and bias (see :func:`fold_bn`), with the block's tail (residual add, ReLU) in the
epilogue.

Variants: ``torch.ops.resnet_fast.conv_bias_act`` (C++: oneDNN on CPU, cuDNN on CUDA) and
``torch.ops.resnet_fast.conv_bias_act_triton`` (implicit-GEMM Triton kernel). Each validates
its arguments once, where it runs: in C++ for the C++ op, in Python for the Triton op, the
fake kernel and the reference path.

On CPU, in float32 and, where oneDNN runs bf16 (:func:`onednn_dtypes`, from the C++
extension's one answer :func:`onednn_dtype_supported`), in bfloat16, a
weight can be prepared once: ``prepack_conv_weight`` reorders it into
oneDNN's blocked layout for one input size and ``conv_bias_act_packed`` takes that packed
weight (inference only; no autograd). For a stride-1 3x3 conv in float32 or bfloat16 on a CPU
with AVX2 or AVX-512, ``winograd_prepack`` transforms the weight once (into float32) for
Winograd's F(2x2,3x3) or F(4x4,3x3) and ``conv_bias_act_winograd`` runs it
(csrc/cpu/winograd_impl.h; float32 arithmetic, a bfloat16 output rounded once): fewer
multiplications. A 1x1 conv has our own GEMM (same micro-kernel, bias, residual and the
NaN-keeping ReLU in its stores): ``conv1x1_prepack`` lays the weight out once,
``conv_bias_act_1x1`` runs it. The models' plans choose among oneDNN and these per layer by
measurement. ``conv3x3_weight_grad`` is a stride-1 3x3 conv's weight gradient by F(2x2,3x3)
in float32 (the plans' backward, where measured faster than oneDNN's backward-weights).
``conv_bias_act_winograd_`` and ``conv_bias_act_1x1_`` write over the residual
(no output buffer, no read for ownership of one): for a caller that owns the residual and
reads it no more, as the models' programs own a block's input. The caller holds the packed weight (the models keep it in
their per-layer plans): no op caches anything keyed by a tensor's identity, so every op is a
pure function of its inputs under torch.compile, export and concurrent threads. A packed
weight is an mkldnn-layout tensor, which fake tensors can carry (``conv_bias_act_packed`` has
a fake kernel) but not create: ``prepack_conv_weight`` runs eagerly, outside compiled graphs.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _extension
from ..backends import interpreting_triton, resolve
from ..kernels.layout import layout_of
from . import reference
from ._common import check_tensor, check_triton_device, register_common, relu_grad


def int_pair(v, name: str, op: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) for i in v):
        raise ValueError(f"{op}: expected {name} to be an int or 2 ints, got {v}")
    return v


def check_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
               groups: int, residual: Tensor | None, op: str = "conv_bias_act",
               packed: bool = False):
    """Validates conv_bias_act's arguments (csrc/checks.h checks the same; ``packed``: the
    weight is a prepacked, mkldnn-layout one); returns (stride, padding, dilation) as pairs and
    the output shape."""
    check_tensor(x, op, "x")
    if x.dim() != 4:
        raise ValueError(f"{op}: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    check_tensor(weight, op, "weight", strided=not packed)
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
                         f"{weight.shape[1] * groups} ({weight.shape[1]} per group x "
                         f"groups={groups})")
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


@torch.library.custom_op("resnet_fast::conv_bias_act_triton", mutates_args=(),
                         device_types=("cuda", "cpu"))
def _conv_bias_act_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                          padding: list[int], dilation: list[int], groups: int,
                          residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    check_conv(x, weight, bias, stride, padding, dilation, groups, residual)
    check_triton_device(x, "conv_bias_act")
    if x.dtype == torch.bfloat16 and interpreting_triton():
        # Triton 3.8's interpreter computes bfloat16 tl.dot wrong (errors of ~3e10 measured):
        # a result from it would be silently wrong.
        raise RuntimeError("conv_bias_act (triton): the Triton interpreter (TRITON_INTERPRET=1) "
                           "computes bfloat16 tl.dot wrong; expected float32 or float16 there, "
                           "got bfloat16 (bfloat16 runs on a GPU)")
    from ..kernels.triton import conv
    return conv.conv_bias_act(x, weight, bias, stride, padding, dilation, groups, residual, relu)


def _full_args(args):
    """All nine arguments, with the schema defaults the dispatcher may have dropped."""
    x, weight, bias, stride, padding, dilation, groups, *rest = args
    residual = rest[0] if len(rest) > 0 else None
    relu = rest[1] if len(rest) > 1 else True
    return x, weight, bias, stride, padding, dilation, groups, residual, relu


def _fake(x, weight, bias, stride, padding, dilation, groups, residual=None, relu=True,
          packed=False):
    *_, out_shape = check_conv(x, weight, bias, stride, padding, dilation, groups, residual,
                               packed=packed)
    return x.new_empty(out_shape).contiguous(memory_format=layout_of(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, residual, relu = _full_args(inputs)
    ctx.n_inputs = len(inputs)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, weight, output if relu else None)


def _backward(ctx, grad):
    x, weight, out = ctx.saved_tensors
    g = relu_grad(out, grad) if ctx.relu else grad
    need = (list(ctx.needs_input_grad) + [False] * 9)[:9]
    stride, padding, dilation, groups = ctx.conv
    gx = gw = gb = None
    if need[0] or need[1] or (need[2] and ctx.has_bias):
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, [need[0], need[1], need[2] and ctx.has_bias])
    gres = g if (need[7] and ctx.has_residual) else None
    return (gx, gw, gb, None, None, None, None, gres, None)[:ctx.n_inputs]


def _autocast(args):
    # Like a convolution under autocast: everything runs in the autocast dtype.
    x, weight, bias, stride, padding, dilation, groups, residual, relu = _full_args(args)
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        # As autocast's own cast: float64 tensors are never cast.
        return (t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                else t)

    return (cast(x), cast(weight), cast(bias), stride, padding, dilation, groups, cast(residual),
            relu)


register_common("conv_bias_act", fake=_fake, backward=_backward, setup_context=_setup_context,
                autocast=_autocast)

if _extension.has_kernel("conv_bias_act_packed", "CPU"):
    @torch.library.register_fake("resnet_fast::conv_bias_act_packed")
    def _packed_fake(x, packed_weight, bias, stride, padding, dilation, groups, residual=None,
                     relu=True):
        return _fake(x, packed_weight, bias, stride, padding, dilation, groups, residual, relu,
                     packed=True)


@functools.cache
def winograd_k_block() -> int:
    """Output channels per block of this CPU's Winograd weight layout (16: AVX2, 32: AVX-512),
    or 0 where the Winograd kernels do not run here (no AVX2+FMA, or an extension without
    them). Asked of the real op once, outside any fake mode the first caller runs under."""
    if not _extension.has_kernel("conv_bias_act_winograd", "CPU"):
        return 0
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    try:
        with unset_fake_temporarily():
            return torch.ops.resnet_fast.winograd_prepack(torch.zeros(1, 1, 3, 3), 2).shape[3]
    except RuntimeError:  # the op says this CPU has neither AVX2 nor AVX-512
        return 0


@functools.cache
def gemm_bf16_supported() -> bool:
    """Whether our 1x1 GEMM runs in bfloat16 here (a CPU with AVX-512 and AVX512-BF16, and an
    extension built with it). Asked of the real op once, as :func:`winograd_k_block`."""
    if not winograd_k_block():
        return False
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    try:
        with unset_fake_temporarily():
            torch.ops.resnet_fast.conv1x1_prepack(torch.zeros(1, 2, 1, 1, dtype=torch.bfloat16))
        return True
    except (RuntimeError, TypeError):  # this CPU has no AVX512-BF16 (or an older build: no bf16)
        return False


if _extension.has_kernel("conv_bias_act_winograd", "CPU"):
    @torch.library.register_fake("resnet_fast::winograd_prepack")
    def _winograd_prepack_fake(weight, tile):
        if tile not in (2, 4) or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
            raise ValueError(f"winograd_prepack: expected a (K, C, 3, 3) weight and tile 2 or 4, "
                             f"got {tuple(weight.shape)} and {tile}")
        kb = winograd_k_block()
        torch._check(kb > 0, lambda: "winograd_prepack: the Winograd kernels need a CPU with "
                                     "AVX2 and FMA (or AVX-512); this one has neither")
        if weight.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"winograd_prepack: expected a float32 or bfloat16 weight, got "
                            f"{weight.dtype}")
        k, c = weight.shape[:2]
        return weight.new_empty(((tile + 2) ** 2, -(-k // kb), -(-c // (kb // 2)) * (kb // 2), kb),
                                dtype=torch.float32)

    @torch.library.register_fake("resnet_fast::conv_bias_act_winograd")
    def _winograd_fake(x, weight, packed_weight, bias, padding, residual=None, relu=True):
        *_, out_shape = check_conv(x, weight, bias, 1, padding, 1, 1, residual,
                                   op="conv_bias_act_winograd")
        _own_kernel_args(x, weight, 3, "conv_bias_act_winograd")
        return x.new_empty(out_shape).contiguous(memory_format=layout_of(x))

    def _own_kernel_args(x, weight, kernel, op):
        """What the C++ ops of our own kernels check beyond check_conv: float32 or bfloat16
        (the 1x1 GEMM: bfloat16 where it runs), the kernel size."""
        _own_dtype(x.dtype, "x", kernel, op)
        if weight.dim() == 4 and tuple(weight.shape[2:]) != (kernel, kernel):
            raise ValueError(f"{op}: expected a {kernel}x{kernel} weight, got "
                             f"{tuple(weight.shape)}")

    def _own_dtype(dtype, what, kernel, op):
        if kernel == 1 and dtype in (torch.float32, torch.bfloat16):
            torch._check(dtype == torch.float32 or gemm_bf16_supported(),
                         lambda: f"{op}: bfloat16 needs a CPU with AVX-512 and AVX512-BF16")
        elif dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"{op}: expected float32 or bfloat16 {what}, got {dtype}")

    def _into(residual, op):
        """The in-place variants' residual, which they write over: dense channels_last."""
        if not residual.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"{op}: expected the residual (written in place) dense in "
                             f"channels_last, got sizes {tuple(residual.shape)} and strides "
                             f"{residual.stride()}")

    @torch.library.register_fake("resnet_fast::conv_bias_act_winograd_")
    def _winograd_inplace_fake(x, weight, packed_weight, bias, padding, residual, relu=True):
        op = "conv_bias_act_winograd_"
        check_conv(x, weight, bias, 1, padding, 1, 1, residual, op=op)
        _own_kernel_args(x, weight, 3, op)
        _into(residual, op)

    @torch.library.register_fake("resnet_fast::conv3x3_weight_grad")
    def _conv3x3_weight_grad_fake(x, grad, padding):
        op = "conv3x3_weight_grad"
        if x.dtype != torch.float32 or grad.dtype != torch.float32:
            raise TypeError(f"{op}: expected float32 x and grad, got {x.dtype} and {grad.dtype}")
        if x.dim() != 4 or grad.dim() != 4:
            raise ValueError(f"{op}: expected 4-D x (N, C, H, W) and grad (N, K, P, Q), got "
                             f"{tuple(x.shape)} and {tuple(grad.shape)}")
        if len(padding) != 2 or min(padding) < 0:
            raise ValueError(f"{op}: expected 2 paddings >= 0, got {list(padding)}")
        n, c, h, w = x.shape
        want = (n, grad.shape[1], h + 2 * padding[0] - 2, w + 2 * padding[1] - 2)
        torch._check(tuple(grad.shape) == want and want[2] >= 1 and want[3] >= 1,
                     lambda: f"{op}: expected grad of shape {want}, got {tuple(grad.shape)}")
        return x.new_empty((grad.shape[1], c, 3, 3))

    @torch.library.register_fake("resnet_fast::conv1x1_prepack")
    def _conv1x1_prepack_fake(weight):
        if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1):
            raise ValueError(f"conv1x1_prepack: expected a (K, C, 1, 1) weight, got "
                             f"{tuple(weight.shape)}")
        kb = winograd_k_block()
        torch._check(kb > 0, lambda: "conv1x1_prepack: our CPU kernels need a CPU with AVX2 "
                                     "and FMA (or AVX-512); this one has neither")
        if weight.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"conv1x1_prepack: expected a float32 or bfloat16 weight, got "
                            f"{weight.dtype}")
        _own_dtype(weight.dtype, "weight", 1, "conv1x1_prepack")
        k, c = weight.shape[:2]
        if weight.dtype == torch.bfloat16:  # pairs of input channels side by side
            return weight.new_empty((-(-k // 32), -(-c // 2), 64))
        return weight.new_empty((-(-k // kb), c, kb))

    @torch.library.register_fake("resnet_fast::conv_bias_act_1x1")
    def _conv1x1_fake(x, weight, packed_weight, bias, stride, residual=None, relu=True):
        *_, out_shape = check_conv(x, weight, bias, stride, 0, 1, 1, residual,
                                   op="conv_bias_act_1x1")
        _own_kernel_args(x, weight, 1, "conv_bias_act_1x1")
        return x.new_empty(out_shape).contiguous(memory_format=layout_of(x))

    @torch.library.register_fake("resnet_fast::conv_bias_act_1x1_")
    def _conv1x1_inplace_fake(x, weight, packed_weight, bias, stride, residual, relu=True):
        op = "conv_bias_act_1x1_"
        check_conv(x, weight, bias, stride, 0, 1, 1, residual, op=op)
        _own_kernel_args(x, weight, 1, op)
        _into(residual, op)


@functools.cache
def onednn_dtype_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs convolutions in ``dtype`` on this CPU: float32 wherever torch has
    oneDNN, bfloat16 and float16 where torch's own CPUID tests say so (bf16: AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT, native arithmetic with AVX512-BF16/AMX; fp16: AVX512-FP16, AMX-FP16 or
    AVX-NE-CONVERT). The one answer, shared with the C++ kernels: the op
    ``resnet_fast::onednn_dtype_supported`` (csrc/cpu/conv_bias_act.cpp). Only without the
    extension (or one built before the op) does Python ask torch's tests itself."""
    if _extension.has_kernel("onednn_dtype_supported", "CompositeExplicitAutograd"):
        return bool(torch.ops.resnet_fast.onednn_dtype_supported(dtype))
    if not torch.backends.mkldnn.is_available():
        return False
    return {torch.float32: lambda: True,
            torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
            torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(dtype, lambda: False)()


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes of the CPU oneDNN path (``prepack_conv_weight``, ``conv_bias_act_packed``)
    on this machine: float32, and bfloat16 where oneDNN runs it
    (:func:`onednn_dtype_supported`; elsewhere oneDNN refuses bf16 and the op runs ATen's
    emulated bf16 convolution); none without oneDNN or the C++ extension's CPU kernels.
    float16 is never on it: ATen's convolution runs it (through oneDNN where supported)."""
    if not _extension.has_kernel("conv_bias_act_packed", "CPU"):
        return ()
    return tuple(d for d in (torch.float32, torch.bfloat16) if onednn_dtype_supported(d))


def conv_bias_act(x: Tensor, weight: Tensor, bias: Tensor | None, stride=1, padding=0,
                  dilation=1, groups: int = 1, residual: Tensor | None = None, relu: bool = True,
                  *, backend: str | None = None) -> Tensor:
    """act(conv2d(x, weight, stride, padding, dilation, groups) + bias (+ residual)), fused.

    Args:
        x: (N, C, H, W), NCHW or channels_last; float32/64, float16, bfloat16.
        weight: (K, C/groups, R, S) in x's dtype; bias: (K,) or None.
        stride, padding, dilation: an int or 2 ints.
        residual: optional tensor of the output's shape and dtype, added before the ReLU.
        relu: apply ReLU (NaN-propagating).
        backend: "reference", "cpu", "cuda", "triton" or "auto".
    Returns:
        (N, K, P, Q) in x's dtype and memory format.
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        x, weight, bias, stride, padding, dilation, groups, residual, relu = _autocast(
            (x, weight, bias, stride, padding, dilation, groups, residual, relu))
    check_tensor(x, "conv_bias_act", "x")
    chosen = resolve("conv_bias_act", x.device, backend)
    if chosen == "reference":
        stride, padding, dilation, _ = check_conv(x, weight, bias, stride, padding, dilation,
                                                  groups, residual)
        return reference.conv_bias_act(x, weight, bias, stride, padding, dilation, groups,
                                       residual, relu)
    # A sparse or mkldnn weight: the C++ op's dispatcher would refuse it with less to go on.
    check_tensor(weight, "conv_bias_act", "weight")
    op = (torch.ops.resnet_fast.conv_bias_act_triton if chosen == "triton"
          else torch.ops.resnet_fast.conv_bias_act)
    return op(x, weight, bias, list(int_pair(stride, "stride", "conv_bias_act")),
              list(int_pair(padding, "padding", "conv_bias_act")),
              list(int_pair(dilation, "dilation", "conv_bias_act")), groups, residual, relu)


def fold_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the convolution before it.

    Returns ``(weight, bias)`` with ``conv2d(x, weight, bias) == bn(conv(x))`` using the BN's
    running statistics and its own eps, computed in float32 (float64 for a float64 conv) and
    cast to the conv weight's dtype. Handles a conv with or without bias and a BN with
    ``affine=False``. The result is differentiable in the conv and BN parameters (fine-tuning
    with frozen BN statistics).
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"fold_bn: expected an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fold_bn: expected a BatchNorm module, got {type(bn).__name__}")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"fold_bn: the BatchNorm has {bn.num_features} features but the conv "
                         f"has {conv.out_channels} output channels")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn: the BatchNorm has no running statistics "
                         "(track_running_stats=False), so it normalizes with batch statistics "
                         "and cannot be folded into the conv")
    return fold_bn_tensors(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                           bn.running_var, bn.eps)


def fold_bn_tensors(weight: Tensor, bias: Tensor | None, bn_weight: Tensor | None,
                    bn_bias: Tensor | None, mean: Tensor, var: Tensor,
                    eps: float) -> tuple[Tensor, Tensor]:
    """:func:`fold_bn` on the tensors themselves (the models' prepared plans refold the
    tensors a forward saved, for the fold's backward)."""
    dtype = weight.dtype
    # float32 for every dtype but float64, whose model would otherwise be float32-accurate.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inv_std = torch.rsqrt(var.to(acc) + eps)
    scale = inv_std * bn_weight.to(acc) if bn_weight is not None else inv_std
    shift = bn_bias.to(acc) if bn_bias is not None else torch.zeros_like(scale)
    conv_bias = bias.to(acc) if bias is not None else torch.zeros_like(scale)
    folded = weight.to(acc) * scale.view(-1, 1, 1, 1)
    return folded.to(dtype), (shift + (conv_bias - mean.to(acc)) * scale).to(dtype)
