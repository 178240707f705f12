"""The fused eval path shared by every block and stem: conv -> BN (-> add) -> ReLU as one
fused conv on BN-folded weights, run from per-layer plans the model owns.

A plan (:class:`ConvPlan`) is made once per conv -> BN pair: the folded weight and bias (the
layout the kernel wants; on CPU float32, and bfloat16 where oneDNN runs it, also
oneDNN-packed per input size), the backend and the exact op resolved, the geometry as the op
takes it. Plans run as a program (``program.py``: one per ResNet, or per block called on its
own), checked once per forward, after which each conv is one op call.

When plans are rebuilt. Plans are kept (``program.Kept``) together with a key: each BN's
eps, each conv's geometry (stride, padding, dilation, groups), the backend, and (version
counter, data pointer, dtype, device, sizes and strides) of every tensor the fold reads (conv
weight and bias, BN weight, bias, running stats, num_batches_tracked: BatchNorm's kernel
updates the running stats without bumping their versions, but every such update increments
num_batches_tracked in place), and the autocast dtype. The key is
recomputed on every forward (the version/pointer part in one C++ call,
``resnet_fast._C.tensor_states``), so an optimizer step, ``load_state_dict``, any in-place
write through the tensor itself, a new tensor or a view assigned to ``.data``, an eps or
geometry edit, entering or leaving autocast all rebuild. The plans also hold an alias of each
source tensor, which keeps its storage alive: no other tensor can be allocated at a recorded
address while the plans live, so a matching key can never describe another tensor's data.
``_apply`` (``.to()``, ``.half()``, ...), ``train()``/``eval()`` and ``set_backend`` drop the
plans; ``resnet_fast.refresh(model)`` drops them explicitly after writes that bypass version
counters (``p.data.copy_``, ``.numpy()``, DLPack, raw-pointer kernels), the same blind spot
autograd has.

With autograd on (an eval model called without ``torch.no_grad()``, saliency maps,
adversarial examples, fine-tuning with frozen BN statistics) the same prepared plans run the
forward, each conv through :class:`_PlannedConv`: its backward is the convolution's backward
on the folded weight, then the fold's own backward (``fold_bn_tensors`` redone on the tensors
the forward saved), so the input and every conv/BN parameter get torchvision's gradients.
No plans (the fold recomputed inside the call, differentiable) under torch.compile (the fold
is then part of the graph; inductor's freezing constant-folds it), under autocast while
gradients flow into the parameters, under a FakeTensorMode (fake plans would poison later
real forwards); plans not kept for inference tensors (no version counter to watch).

Fused only where the fold reproduces the modules exactly: an ``nn.Conv2d`` and a BatchNorm of
the exact classes, without hooks (so no pruning masks or old-style weight_norm, which are
hooks) and with plain tensor weights; parametrizations, QAT modules, subclasses and the fake
tensors torch.export traces with are other classes. Anything else runs as torchvision runs
it, as does a forward that ``torch.jit.trace`` or ``torch.fx.symbolic_trace`` records
(:func:`recorded`); ``torch.jit.script`` compiles torchvision's code only.
"""

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as _forward_ad
from torch.fx import _symbolic_trace
from torch.nn.modules import module as _module
from torchvision.ops.misc import FrozenBatchNorm2d

from .. import autotune
from ..backends import requested_backend, resolve, tuned_backends
from ..kernels.layout import dense_in, layout_of
from ..ops import reference
from ..ops._common import relu_grad
from ..ops.conv_bias_act import (
    fold_bn_tensors,
    gemm_bf16_supported,
    onednn_dtypes,
    winograd_k_block,
)
from ..ops.max_pool_act import Args

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)
_PLAIN_TENSORS = (nn.Parameter, Tensor)
# Whether torch.fx.symbolic_trace is recording. Where torch has only is_fx_tracing, that is
# also true under torch.export, which recorded() rules out first (torch.compiler.is_compiling).
_fx_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)
_MAX_PACKED_SIZES = 4  # keys of ConvPlan._entry a CPU plan keeps prepared weights for (oldest dropped)
# Fewest output pixels per call at which a bfloat16 plan measures Winograd. Its transformed
# weight is float32 (F(2x2) 3.6x, F(4x4) 8x the bf16 weight's bytes), read once per call from
# memory in a model, where the tuner's repeated calls find it in cache: ResNet-50 at batch 1,
# 256x14x14 F(4x4) measured 0.42 ms to oneDNN's 0.52 and ran 0.63 to 0.55 in the model.
_BF16_WINOGRAD_MIN_PIXELS = 512
# Most bytes of patches gemm_backward may gather for one conv (gemm_backward_scratch); a
# larger one keeps torch's convolution_backward, untimed (ResNet-50's stem at batch 16, 224
# px: 118 MB; layer2's stride-2 3x3 at batch 64, 512 px, would take 1.2 GB).
_GEMM_BACKWARD_MAX_BYTES = 256 << 20


def no_hooks(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def no_global_hooks() -> bool:
    """No module hooks registered for every module (nn.modules.module.register_module_*)."""
    return not (_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def in_functorch() -> bool:
    """Inside a torch.func transform (vmap, grad, ...) or a ``torch.autograd.forward_ad``
    dual level, where the models run torchvision's plain math: our ops have no batching or
    forward-derivative rules, and the plans no meaning for wrapped tensors."""
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or _forward_ad._current_level >= 0)


def faking() -> bool:
    """Whether a FakeTensorMode is active (shape or memory estimation): plans built from fake
    tensors must never be kept for a later real forward."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def exact_relu(m: Optional[nn.Module]) -> bool:
    """``m`` is exactly ``nn.ReLU`` without hooks: what the fused kernels compute in its place
    (a swapped ``nn.SiLU``/``nn.Identity`` or a subclass runs as itself)."""
    return type(m) is nn.ReLU and no_hooks(m)


def recorded() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.fx.symbolic_trace`` (and so torchvision's
    feature extraction) is recording the forward: the models then run torchvision's code, so
    the recorded graph is torchvision's. torch.compile records the fused path (the fold
    inside the graph)."""
    return not torch.compiler.is_compiling() and (torch.jit.is_tracing() or _fx_tracing())


def add_pair(conv: nn.Module, bn: Optional[nn.Module], key: list, sources: list[Tensor]) -> bool:
    """Whether conv -> bn can run as one fused conv, computing exactly what the two modules
    compute: an ``nn.Conv2d`` with zero padding and a plain tensor weight, then a BatchNorm
    (exact classes) in eval mode with running stats or torchvision's ``FrozenBatchNorm2d``
    (detection backbones; a fixed affine), or ``bn=None`` (a conv with nothing folded into it:
    an FPN's), neither with hooks. If so, appends to ``key`` what the fold depends on besides
    tensors (eps, None without a BN; the geometry) and to ``sources`` every tensor it reads.
    Dicts read directly: this runs on every forward."""
    if not (type(conv) is nn.Conv2d and no_hooks(conv) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)):  # not "same"
        return False
    p = conv._parameters
    weight = p["weight"]
    if type(weight) not in _PLAIN_TENSORS:
        return False
    if bn is None:
        key += (None, conv.stride, conv.padding, conv.dilation, conv.groups)
        sources += [t for t in (weight, p.get("bias")) if t is not None]
        return True
    kind = type(bn)
    if not (no_hooks(bn) and (kind is FrozenBatchNorm2d or (
            kind in _BN_TYPES and not bn.training and bn.track_running_stats))):
        return False
    q, b = bn._parameters, bn._buffers
    mean = b.get("running_mean")
    if mean is None:
        return False
    key += (bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups)
    sources += [t for t in (weight, p.get("bias"), q.get("weight"), q.get("bias"), mean,
                            b["running_var"], b.get("num_batches_tracked")) if t is not None]
    return True


# Input channels a 3-channel conv (the stem) is zero-padded to on cuda/triton in float16 and
# bfloat16. cuDNN's NHWC tensor-core kernels want C a multiple of 8 in half precision (16-byte
# vector loads); with C=3 it falls back to slow non-tensor-core kernels (H100: 1.9 ms for the
# stem at batch 256 against a 0.16 ms roofline). NVIDIA's MLPerf ResNet pads to 4, but for its
# own first-layer kernel; 8 is what stock cuDNN and our Triton GEMM (K = R*S*C) are built for.
# The cost: 8/3 of the stem's FLOPs and input bytes.
PADDED_STEM_CHANNELS = 8


def padded_in_channels(backend: str, dtype: torch.dtype, in_channels: int, groups: int) -> int:
    """The input channels a plan's weight has: ``PADDED_STEM_CHANNELS`` for a 3-channel
    ungrouped conv in float16/bfloat16 on ``cuda``/``triton``, else ``in_channels``."""
    if (backend in ("cuda", "triton") and dtype in (torch.float16, torch.bfloat16)
            and groups == 1 and in_channels == 3):
        return PADDED_STEM_CHANNELS
    return in_channels


def pad_weight(weight: Tensor, channels: int) -> Tensor:
    """(K, C, R, S) -> (K, channels, R, S) channels_last, the extra input channels zero."""
    padded = F.pad(weight, (0, 0, 0, 0, 0, channels - weight.shape[1]))
    return padded.contiguous(memory_format=torch.channels_last)


def stage_padded(x: Tensor, channels: int) -> Tensor:
    """(N, C, H, W) in any layout -> (N, channels, H, W) channels_last holding x in the first C
    channels and zeros after: one copy of x, and only the extra channels zero-filled."""
    n, c, h, w = x.shape
    staged = torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)
    staged[:, :c].copy_(x)
    staged[:, c:].zero_()
    return staged


def _conv_op(backend: str) -> Callable[..., Tensor]:
    if backend == "reference":
        return reference.conv_bias_act
    if backend == "triton":
        return torch.ops.resnet_fast.conv_bias_act_triton.default
    return torch.ops.resnet_fast.conv_bias_act.default


# How a plan's folded weight and bias come from module tensors: per conv -> BN pair it reads,
# (eps, whether the plan's weight is this pair's, whether its bias includes this pair's), and
# the pair's tensors (conv weight, conv bias, BN weight, BN bias, running mean, running var),
# six per pair, flat.
Folds = tuple[tuple[tuple[float, bool, bool], ...], tuple[Optional[Tensor], ...]]


class ConvPlan:
    """One conv (-> BN folded into ``weight``, ``bias``) (-> add) -> ReLU, prepared:
    ``plan(x, residual)`` runs it.

    ``casts=True`` (plans made under autocast, their weights in the autocast dtype) casts x
    and the residual to the weights' dtype first, as autocast casts a convolution's inputs.

    ``differentiable=True`` means ``weight``/``bias`` carry autograd and the plan runs the
    autograd-capable op (gradients into the parameters, torch.compile). ``dense_op`` is the
    (autograd-capable) op it runs; on CPU in float32 (and bfloat16 where oneDNN runs it:
    ``onednn_dtypes``), inference calls run ``packed_op``
    (``conv_bias_act_packed``) on weights packed once per input size. Under ``auto`` on a
    device with two kernel backends (CUDA: cuda, triton) the op is chosen per input shape and
    layout at its first call, by measurement (``resnet_fast.autotune``), and kept. A 3-channel
    conv in half precision on cuda/triton keeps its weight zero-padded (``padded_in_channels``)
    and stages its input to match (``pads``).
    """

    __slots__ = ("weight", "bias", "geometry", "relu", "run", "dense_op", "packed_op", "pads",
                 "casts", "folds", "sources", "_packed", "_inner", "_tuned", "_candidates",
                 "_default", "_own", "_grads")

    def __init__(self, conv: nn.Conv2d, weight: Tensor, bias: Optional[Tensor], relu: bool,
                 backend: Optional[str], differentiable: bool, casts: bool = False,
                 folds: Optional[Folds] = None, winograd: Optional[bool] = None) -> None:
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.relu = relu
        chosen = resolve("conv_bias_act", weight.device, backend)
        tuned = () if differentiable or requested_backend(backend) != "auto" else tuned_backends(
            "conv_bias_act", weight.device.type)
        if len(tuned) < 2:
            tuned = ()  # one candidate: nothing to measure
        # run and _inner hold plain functions, called with the plan: a bound method stored on
        # its own object is a reference cycle, which kept every dropped plan (its folded and
        # packed weights) alive until the cyclic GC ran (+2 GB over 20 rebuilds of ResNet-50).
        self.run: Callable[[ConvPlan, Tensor, Optional[Tensor]], Tensor]
        self.dense_op: Callable[..., Tensor] = _conv_op(chosen)
        channels = padded_in_channels(chosen, weight.dtype, weight.shape[1], conv.groups)
        self.pads = channels != weight.shape[1] and not differentiable
        if self.pads:
            weight = pad_weight(weight, channels)
        elif (chosen in ("cuda", "triton") or tuned) and not differentiable:
            # The layout both kernels read; laid out once here instead of on every call.
            weight = weight.contiguous(memory_format=torch.channels_last)
        self.weight, self.bias = weight, bias
        self.run, self.packed_op = ConvPlan._dense, None
        if tuned:
            self._tuned: dict[tuple, Callable[..., Tensor]] = {}
            self._candidates, self._default = tuned, chosen
            self.run = ConvPlan._measured
        elif (chosen == "cpu" and not differentiable and weight.dtype in onednn_dtypes()
                and torch.backends.mkldnn.enabled):
            self._packed: dict[tuple[torch.Size, int, bool], tuple[str, Tensor]] = {}
            self.run = ConvPlan._onednn
            self.packed_op = torch.ops.resnet_fast.conv_bias_act_packed.default
            self._own = own_kernels(conv, weight, winograd)
            if bias is None and "winograd2" in self._own:  # (a training conv's: no BN folded)
                self.bias = weight.new_zeros(weight.shape[0])  # the Winograd kernel's epilogue
            self._grads: dict[tuple[torch.Size, int], Optional[_Prepared]] = {}
        self.casts = casts
        if self.pads or casts:
            self._inner, self.run = self.run, ConvPlan._adapted
        # What the fold read, for its backward (_PlannedConv): a prepared plan in the
        # weights' own dtype; None where the plan's weights carry autograd themselves (or are
        # cast or padded, which runs the differentiable op instead).
        self.folds, self.sources = (None, None) if (
            folds is None or differentiable or casts or self.pads) else folds

    def __call__(self, x: Tensor, residual: Optional[Tensor] = None, overwrite: bool = False,
                 pool: Optional[Args] = None) -> Tensor:
        """The plan on x (+ residual). ``overwrite``: the caller owns ``residual`` and reads it
        no more, so where the chosen kernel is ours (Winograd, the 1x1 GEMM) the result is
        written over it (no output buffer, no read for ownership of one) and it is returned;
        elsewhere (oneDNN, autograd, a residual not dense channels_last in the weights' dtype)
        as without. ``pool``: (kernel_size, stride, padding) of a maxpool run on the result
        as ``max_pool_act`` (CPU; the program's stem, gradients off); where the plan runs the
        CPU oneDNN path with gradients off, whose ReLU is a pass of its own over the conv's
        output, the ReLU moves behind the pool instead (max and ReLU commute, NaN included)."""
        if pool is None:
            return self._call(x, residual, overwrite)
        if self.run is ConvPlan._onednn and self.relu and not torch.is_grad_enabled():
            y = self._packed_call(x, None, *self._entry(x, None, False), relu=False)
            return torch.ops.resnet_fast.max_pool_act.default(y, *pool, True)
        return torch.ops.resnet_fast.max_pool_act.default(self._call(x, None, False), *pool,
                                                          False)

    def _call(self, x: Tensor, residual: Optional[Tensor], overwrite: bool) -> Tensor:
        if torch.is_grad_enabled() and self.sources is not None and (
                x.requires_grad or (residual is not None and residual.requires_grad)
                or any(t is not None and t.requires_grad for t in self.sources)):
            return _PlannedConv.apply(self, x, residual, *self.sources)
        if (overwrite and residual is not None and self.run is ConvPlan._onednn and self._own
                and not torch.is_grad_enabled() and residual.dtype == self.weight.dtype
                and residual.is_contiguous(memory_format=torch.channels_last)):
            kernel, packed = self._entry(x, residual, True)
            if kernel != "onednn":
                self._packed_call(x, residual, kernel, packed, True)
                return residual
            return self._packed_call(x, residual, kernel, packed)
        return self.run(self, x, residual)

    def _dense(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        return self.dense_op(x, self.weight, self.bias, *self.geometry, residual, self.relu)

    def _adapted(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        """x (and the residual) cast to the weights' dtype under autocast; x staged into the
        padded channels of a padded stem."""
        if self.casts:
            x = x.to(self.weight.dtype)
            residual = None if residual is None else residual.to(self.weight.dtype)
        if self.pads:
            x = stage_padded(x, self.weight.shape[1])
        return self._inner(self, x, residual)

    def _measured(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        shape = (x.shape, x.stride())
        op = self._tuned.get(shape)
        if op is None:
            op = self._choose(x, residual)
            tuned = dict(self._tuned)  # copy, change, assign: as _onednn's dict
            tuned[shape] = op
            self._tuned = tuned
        return op(x, self.weight, self.bias, *self.geometry, residual, self.relu)

    def _choose(self, x: Tensor, residual: Optional[Tensor]) -> Callable[..., Tensor]:
        """The op for x's shape and layout: the candidates timed once per layer key (or the
        choice a table already holds for it)."""
        layer = self._layer_key("conv_bias_act", x, residual)
        args = (x, self.weight, self.bias, *self.geometry, residual, self.relu)
        runs = {name: functools.partial(_conv_op(name), *args) for name in self._candidates}
        with torch.no_grad():
            name = autotune.default_tuner().choose(x.device, layer, runs, self._default)
        return _conv_op(name)

    def _layer_key(self, op: str, x: Tensor, residual: Optional[Tensor]) -> dict:
        """The layer part of a tuning key (``autotune``): the op, x's shape, dtype and layout,
        the weight's shape, the geometry and the epilogue."""
        return {"op": op, "x": list(x.shape), "dtype": str(x.dtype).split(".")[-1],
                "layout": "channels_last" if layout_of(x) == torch.channels_last else "nchw",
                "weight": list(self.weight.shape), "geometry": list(self.geometry),
                "residual": residual is not None, "relu": self.relu}

    def _onednn(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (residual is not None
                                                              and residual.requires_grad)):
            return self._dense(x, residual)  # the packed op has no autograd
        return self._packed_call(x, residual, *self._entry(x, residual, False))

    def _entry(self, x: Tensor, residual: Optional[Tensor], in_place: bool) -> tuple[str, Tensor]:
        """(kernel, its prepared weight) for x's shape, the thread count and ``in_place``
        (whether the kernel writes over the residual). The thread count: oneDNN lays a packed
        weight out for the threads it was packed under, and under another count it runs 6-12x
        slower (ResNet-50's 256x14x14 -> 1024 1x1 at batch 1, Zen 4: 12.0 vs 0.93 ms on one
        thread with a weight packed on two)."""
        key = (x.shape, torch.get_num_threads(), in_place)
        entry = self._packed.get(key)
        if entry is None:
            entry = self._prepare(x, residual, in_place)
            # Copy, change, assign: threads reading the old dict never see it change size.
            sizes = dict(self._packed)
            if len(sizes) >= _MAX_PACKED_SIZES:
                del sizes[next(iter(sizes))]  # the oldest
            sizes[key] = entry
            self._packed = sizes
        return entry

    def _packed_call(self, x: Tensor, residual: Optional[Tensor], kernel: str, packed: Tensor,
                     in_place: bool = False, relu: Optional[bool] = None):
        """The prepared kernel on x (``in_place``: written over the residual, returns None);
        ``relu=False``: without the plan's ReLU (a ``pool`` call)."""
        ops = torch.ops.resnet_fast
        relu = self.relu if relu is None else relu
        if kernel == "winograd":
            op = ops.conv_bias_act_winograd_ if in_place else ops.conv_bias_act_winograd
            return op.default(x, self.weight, packed, self.bias, self.geometry[1], residual,
                              relu)
        if kernel == "gemm":
            op = ops.conv_bias_act_1x1_ if in_place else ops.conv_bias_act_1x1
            return op.default(x, self.weight, packed, self.bias, self.geometry[0], residual,
                              relu)
        return self.packed_op(x, packed, self.bias, *self.geometry, residual, relu)

    def _prepare(self, x: Tensor, residual: Optional[Tensor], in_place: bool) -> tuple[str, Tensor]:
        """(kernel, its prepared weight) for x's shape: oneDNN's packed weight, or where our
        own kernels may run (``_own``) the fastest of oneDNN and each of them, measured once
        per layer key (``autotune.cpu_tuner``; the table on disk). Each candidate's weight is
        prepared only when it is timed or chosen (``_Prepared``): a plan rebuilt after every
        optimizer step prepares the chosen kernel's alone. ``in_place``: ours are timed
        writing over a copy of the residual, as ``overwrite`` calls run them."""
        ops = torch.ops.resnet_fast
        prepared = _Prepared(onednn=lambda: ops.prepack_conv_weight.default(
            self.weight, *self.geometry, list(x.shape)))
        own = self._own
        if self.weight.dtype == torch.bfloat16 and any(n.startswith("winograd") for n in own):
            (ph, pw), (n, _, h, w) = self.geometry[1], x.shape  # 3x3, stride 1
            if n * (h + 2 * ph - 2) * (w + 2 * pw - 2) < _BF16_WINOGRAD_MIN_PIXELS:
                own = tuple(k for k in own if not k.startswith("winograd"))
        if not own:
            return "onednn", prepared["onednn"]
        for name in own:  # "gemm", "winograd2", "winograd4"
            prepared.makers[name] = (
                functools.partial(ops.conv1x1_prepack.default, self.weight) if name == "gemm"
                else functools.partial(ops.winograd_prepack.default, self.weight, int(name[-1])))
        if in_place:  # each timed call of ours writes over it
            prepared.makers["scratch"] = residual.clone
        candidates = ("onednn", *own)
        layer = {**self._layer_key("conv_bias_act_cpu", x, residual),
                 "candidates": sorted(candidates), "in_place": in_place, "weight_read": True}
        runs = {name: functools.partial(self._timed_call, x, residual, _kernel_of(name), name,
                                        prepared, in_place) for name in candidates}
        # The weight each candidate reads per call, which the tuner adds at memory speed
        # (autotune.Tuner.choose): Winograd F(m x m)'s transformed weight is float32 and
        # (m+2)^2/9 times the direct one's elements, which at batch 1 decides ResNet-50's 512 x
        # 7 x 7 3x3s (AMX Xeon: oneDNN 1.54 ms, F(2x2) 2.07 with 256 MiB written before each
        # call; 0.85 and 0.87 timed hot).
        k, c = self.weight.shape[:2]
        weight_bytes = {name: k * c * (int(name[-1]) + 2) ** 2 * 4 if name.startswith("winograd")
                        else self.weight.nbytes for name in candidates}
        with torch.no_grad():
            name = autotune.cpu_tuner().choose(x.device, layer, runs, "onednn", weight_bytes)
        return _kernel_of(name), prepared[name]

    def _timed_call(self, x: Tensor, residual: Optional[Tensor], kernel: str, name: str,
                    prepared: "_Prepared", in_place: bool) -> Optional[Tensor]:
        """Candidate ``name`` (running ``kernel``) on x, as ``_prepare`` times it."""
        if in_place and kernel != "onednn":
            return self._packed_call(x, prepared["scratch"], kernel, prepared[name], True)
        return self._packed_call(x, residual, kernel, prepared[name])

    def input_grad(self, grad: Tensor, x: Tensor, frozen: bool) -> Optional[Tensor]:
        """The gradient into x, for a float32 plan with a kernel of ours (``_own``, CPU), as
        that kernel run on ``grad`` (:meth:`_grad_kind`; ``frozen``: no tensor the plan was
        folded from wants a gradient) where it measured faster than oneDNN's backward-data
        for this shape (once per layer key, ``autotune.cpu_tuner``; its weight prepared once
        per shape and thread count, as the forward's). None: torch's ``convolution_backward``
        computes it."""
        kind = self._grad_kind(frozen)
        if kind is None or grad.dtype != torch.float32 or grad.numel() == 0:
            return None
        grad = dense_in(grad, torch.channels_last)
        key = (grad.shape, torch.get_num_threads())
        if key not in self._grads:
            grads = dict(self._grads)  # copy, change, assign: as _entry's dict
            if len(grads) >= _MAX_PACKED_SIZES:
                del grads[next(iter(grads))]
            grads[key] = self._prepare_grad(grad, x, kind)
            self._grads = grads
        entry = self._grads[key]
        return None if entry is None else self._grad_call(grad, x, kind, entry)

    def _grad_kind(self, frozen: bool) -> Optional[str]:
        """Our kernel for the input gradient, if any: a stride-1 3x3's is itself a stride-1 3x3
        conv (of the output gradient, the weight transposed and flipped, padded 2 - padding),
        run as Winograd F(2x2,3x3) (``winograd2``); a stride-1 1x1's is a 1x1 conv with the
        weight transposed, run as our GEMM (``gemm``), only for ``frozen`` weights: a weight
        that trains is prepared again each step, and for the GEMM that cost more than it
        saved (FPN train step at batch 1: 0.983x; saliency maps, weights frozen: 1.05x)."""
        own = getattr(self, "_own", ())
        if "winograd2" in own:
            return "winograd2"
        return "gemm" if frozen and "gemm" in own and self.geometry[0] == [1, 1] else None

    def weight_grad(self, grad: Tensor, x: Tensor) -> Optional[Tensor]:
        """The gradient of the (folded) weight, for a float32 plan whose conv may run as our
        Winograd (a stride-1 3x3 on CPU), as ``conv3x3_weight_grad`` (F(2x2,3x3): 2.25x fewer
        products) where that measured faster than oneDNN's backward-weights for this shape
        (once per layer key, ``autotune.cpu_tuner``). None: torch's ``convolution_backward``
        computes it."""
        if ("winograd2" not in getattr(self, "_own", ()) or grad.dtype != torch.float32
                or x.dtype != torch.float32 or grad.numel() == 0):
            return None
        layer = {"op": "conv_weight_grad_cpu", "x": list(x.shape), "dtype": "float32",
                 "weight": list(self.weight.shape), "padding": list(self.geometry[1]),
                 "candidates": ["onednn", "winograd2"]}
        runs = {name: functools.partial(self._weight_grad_call, grad, x, name)
                for name in ("onednn", "winograd2")}
        with torch.no_grad():
            chosen = autotune.cpu_tuner().choose(x.device, layer, runs, "onednn")
        return self._weight_grad_call(grad, x, chosen) if chosen == "winograd2" else None

    def _weight_grad_call(self, grad: Tensor, x: Tensor, kernel: str) -> Tensor:
        """The weight gradient by ``kernel``: oneDNN's backward-weights or our Winograd."""
        if kernel == "onednn":
            return self.torch_backward(grad, x, [False, True, False])[1]
        return torch.ops.resnet_fast.conv3x3_weight_grad.default(x, grad, self.geometry[1])

    def torch_backward(self, grad: Tensor, x: Tensor, mask: list[bool]) -> tuple:
        """torch's ``convolution_backward`` (oneDNN's on CPU) on the plan's weight: the
        (input, weight, bias) gradients ``mask`` asks for."""
        return torch_conv_backward(grad, x, self.weight, self.geometry, mask)

    def backward(self, grad: Tensor, x: Tensor, mask: list[bool]) -> tuple:
        """The (input, weight) gradients ``mask`` asks for, those :meth:`input_grad` and
        :meth:`weight_grad` left: for a float32 CPU conv of one group and dilation 1 on dense
        channels_last tensors, :func:`gemm_backward` where it measured faster than torch's
        ``convolution_backward`` for this layer and mask (once per layer key,
        ``autotune.cpu_tuner``; FPN train step at batch 1, AVX2: the stride-2 3x3s
        1.3-1.9x, the 1x1s 1.1x summed) and its patches fit ``_GEMM_BACKWARD_MAX_BYTES``;
        elsewhere torch's."""
        stride, padding, dilation, groups = self.geometry
        cl = torch.channels_last
        if not (x.device.type == "cpu" and groups == 1 and dilation == [1, 1]
                and x.dtype == grad.dtype == self.weight.dtype == torch.float32
                and x.is_contiguous(memory_format=cl) and grad.is_contiguous(memory_format=cl)
                and grad.numel() > 0 and x.numel() > 0
                and gemm_backward_scratch(grad, x, self.weight, stride, padding)
                <= _GEMM_BACKWARD_MAX_BYTES):
            return self.torch_backward(grad, x, [*mask, False])[:2]
        layer = {"op": "conv_backward_cpu", "x": list(x.shape), "dtype": "float32",
                 "weight": list(self.weight.shape), "stride": list(stride),
                 "padding": list(padding), "mask": list(mask), "candidates": ["gemm", "onednn"]}
        runs = {name: functools.partial(self._backward_call, grad, x, name, mask)
                for name in ("onednn", "gemm")}
        with torch.no_grad():
            chosen = autotune.cpu_tuner().choose(x.device, layer, runs, "onednn")
        return self._backward_call(grad, x, chosen, mask)

    def _backward_call(self, grad: Tensor, x: Tensor, kernel: str, mask: list[bool]) -> tuple:
        """The (input, weight) gradients by ``kernel``: oneDNN's or :func:`gemm_backward`."""
        if kernel == "onednn":
            return self.torch_backward(grad, x, [*mask, False])[:2]
        return gemm_backward(grad, x, self.weight, self.geometry[0], self.geometry[1], mask)

    def _prepare_grad(self, grad: Tensor, x: Tensor, kind: str) -> Optional["_Prepared"]:
        """Where ``kind`` (:meth:`_grad_kind`) is measured faster for ``grad``'s shape, what
        it runs on, made at its first use (timed, or the first gradient it computes): for
        "winograd2" (transposed flipped weight, its Winograd transform, zero bias, padding),
        for "gemm" (transposed weight, its GEMM layout); else None."""
        def entry() -> tuple:
            if kind == "gemm":
                k, c = self.weight.shape[:2]
                moved = self.weight.reshape(k, c).t().contiguous().view(c, k, 1, 1)
                return moved, torch.ops.resnet_fast.conv1x1_prepack.default(moved)
            flipped = self.weight.transpose(0, 1).flip(2, 3).contiguous()
            return (flipped, torch.ops.resnet_fast.winograd_prepack.default(flipped, 2),
                    flipped.new_zeros(flipped.shape[0]), [2 - p for p in self.geometry[1]])

        prepared = _Prepared(**{kind: entry})
        layer = {"op": "conv_input_grad_cpu", "grad": list(grad.shape), "dtype": "float32",
                 "weight": list(self.weight.shape), "padding": list(self.geometry[1]),
                 "candidates": sorted(["onednn", kind])}
        runs = {"onednn": functools.partial(self._grad_call, grad, x, "onednn", None),
                kind: functools.partial(self._grad_call, grad, x, kind, prepared)}
        with torch.no_grad():
            chosen = autotune.cpu_tuner().choose(x.device, layer, runs, "onednn")
        return prepared if chosen == kind else None

    def _grad_call(self, grad: Tensor, x: Tensor, kernel: str,
                   prepared: Optional["_Prepared"]) -> Tensor:
        """The input gradient by ``kernel``: oneDNN's backward-data, or ours on
        ``_prepare_grad``'s entry."""
        ops = torch.ops.resnet_fast
        if kernel == "onednn":
            return self.torch_backward(grad, x, [True, False, False])[0]
        if kernel == "gemm":
            moved, packed = prepared["gemm"]
            return ops.conv_bias_act_1x1.default(grad, moved, packed, None, [1, 1], None, False)
        flipped, packed, zeros, padding = prepared["winograd2"]
        return ops.conv_bias_act_winograd.default(grad, flipped, packed, zeros, padding, None,
                                                  False)


class _Prepared(dict):
    """name -> a candidate's prepared weight (or scratch), made by ``makers[name]`` at its
    first lookup: while the tuner times it, or once it is chosen. A candidate the tuning
    table already rules out is never prepared."""

    def __init__(self, **makers: Callable[[], object]) -> None:
        super().__init__()
        self.makers = makers

    def __missing__(self, name: str):
        value = self[name] = self.makers[name]()
        return value


def _kernel_of(name: str) -> str:
    """The kernel a candidate runs: "winograd" for both tiles, else its name."""
    return "winograd" if name.startswith("winograd") else name


def own_kernels(conv: nn.Conv2d, weight: Tensor, winograd: Optional[bool]) -> tuple[str, ...]:
    """Our own CPU kernels a plan measures against oneDNN, for a conv with one group and
    dilation 1 where this CPU runs them (AVX2 or AVX-512): the 1x1 GEMM (``gemm``) for an
    unpadded 1x1 conv of any stride, with or without a bias (a downsample's), in float32, and
    in bfloat16 where the CPU has AVX512-BF16; for a stride-1 3x3 conv Winograd (float32
    arithmetic; a plan without a bias adds zeros) unless ``winograd=False``: in float32 F(2x2,3x3)
    (``winograd2``) by default, also F(4x4,3x3) (``winograd4``: faster, and errs 5-11x more:
    an opt-in) with ``winograd=True``; in bfloat16 both by default, as both err as oneDNN's
    bf16 conv does (by the output's one rounding, ~100x Winograd's float32 error;
    docs/design.md)."""
    if tuple(conv.dilation) != (1, 1) or conv.groups != 1 or not winograd_k_block():
        return ()
    if tuple(weight.shape[2:]) == (1, 1) and tuple(conv.padding) == (0, 0) and (
            weight.dtype == torch.float32
            or (weight.dtype == torch.bfloat16 and gemm_bf16_supported())):
        return ("gemm",)
    if (winograd is False or weight.dtype not in (torch.float32, torch.bfloat16)
            or tuple(weight.shape[2:]) != (3, 3) or tuple(conv.stride) != (1, 1)):
        return ()
    both = winograd or weight.dtype == torch.bfloat16
    return ("winograd2", "winograd4") if both else ("winograd2",)


def winograd_trainable(conv: nn.Module, x: Tensor) -> bool:
    """Whether a training forward may run ``conv`` on ``x`` as a prepared plan that weighs our
    Winograd against oneDNN (forward, input and weight gradients): exactly a hook-free
    ``nn.Conv2d``, 3x3, stride 1, dilation 1, one group, zero padding, a float32 weight, x a
    non-empty float32 4-D CPU tensor, Winograd kernels on this CPU and oneDNN on, and none of
    autocast, torch.compile, a fake mode or a recording tool (they keep torch's conv)."""
    return (type(conv) is nn.Conv2d and no_hooks(conv) and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.weight.dtype == torch.float32
            and "winograd2" in own_kernels(conv, conv.weight, None)
            and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.layout == torch.strided and x.dim() == 4 and x.shape[0] > 0
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not faking() and not recorded())


def refold(terms: tuple[tuple[float, bool, bool], ...],
           tensors: Sequence[Optional[Tensor]]) -> tuple[Tensor, Optional[Tensor]]:
    """A plan's folded (weight, bias) from its pairs' tensors, as :func:`group_plans` makes
    them (a downsample's bias added to its block's last conv's in float32)."""
    weight, bias = None, None
    for k, (eps, takes_weight, takes_bias) in enumerate(terms):
        w, b = _fold(tensors[6 * k:6 * k + 6], eps)
        if takes_weight:
            weight = w
        if takes_bias:
            bias = b if bias is None else _add_biases(bias, b)
    return weight, bias


def _fold(tensors: Sequence[Optional[Tensor]],
          eps: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
    """(weight, bias) of one pair from its six tensors (conv weight and bias, BN weight, bias,
    running mean and variance); ``eps=None``: a conv without a BN, its own weight and bias."""
    return tuple(tensors[:2]) if eps is None else fold_bn_tensors(*tensors, eps)


def _add_biases(b: Tensor, other: Tensor) -> Tensor:
    acc = torch.promote_types(b.dtype, torch.float32)
    return (b.to(acc) + other.to(acc)).to(b.dtype)


class _PlannedConv(torch.autograd.Function):
    """A prepared plan's forward (its packed weights, no fold, no reorder) with the gradients
    of the modules it stands for: threshold_backward for the ReLU, the convolution's backward
    on the folded weight (input and folded-weight gradients; each as our Winograd where the
    plan measured it faster, :meth:`ConvPlan.input_grad`, :meth:`ConvPlan.weight_grad`), the
    folded bias's gradient (the output gradient summed), then the fold's backward on the
    tensors the forward saved (an in-place change to them before backward raises, as torch's
    own saved tensors do): by :func:`_conv_grad` where only convs' weights and biases want
    gradients, else by autograd through :func:`refold`. Asked for a graph of the gradients
    (``create_graph``, e.g. a gradient penalty), it recomputes the forward differentiably with
    torch's ops and differentiates that."""

    @staticmethod
    def forward(ctx, plan: ConvPlan, x: Tensor, residual: Optional[Tensor],
                *sources: Optional[Tensor]) -> Tensor:
        out = plan.run(plan, x, residual)
        ctx.plan = plan
        ctx.save_for_backward(x, residual, out, *sources)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        plan: ConvPlan = ctx.plan
        x, residual, out, *sources = ctx.saved_tensors
        need_x, need_residual, *need = ctx.needs_input_grad[1:]
        wanted = [i for i, n in enumerate(need) if n]
        grads: list[Optional[Tensor]] = [None] * (2 + len(sources))
        if torch.is_grad_enabled():  # create_graph: a differentiable recompute
            # Fresh views: this op's own partial derivatives, not those through the other
            # inputs (x may be the residual, or computed from it), which autograd adds itself.
            x, residual, *sources = (None if t is None else t.view_as(t)
                                     for t in (x, residual, *sources))
            flags = (need_x, need_residual, *need)
            weight, bias = refold(plan.folds, sources)
            y = reference.conv_bias_act(x, weight, bias, *plan.geometry, residual, plan.relu)
            got = iter(torch.autograd.grad(
                y, [t for t, n in zip((x, residual, *sources), flags) if n], grad,
                create_graph=True, allow_unused=True))
            return (None, *(next(got) if n else None for n in flags))
        if plan.relu:
            grad = relu_grad(out, grad)
        if x.is_contiguous(memory_format=torch.channels_last):
            # Once, for every kernel below: a loss's gradient often arrives NCHW (an FPN
            # output's from `.square().mean()`), and each would convert it (torch's copy:
            # 12.5-15 ms at 256x128x128; ours 2.4).
            grad = dense_in(grad, torch.channels_last)
        grad_x = plan.input_grad(grad, x, not wanted) if need_x else None
        grad_w = plan.weight_grad(grad, x) if wanted else None
        torch_x, torch_w = need_x and grad_x is None, bool(wanted) and grad_w is None
        if torch_x or torch_w:
            gx, gw = plan.backward(grad, x, [torch_x, torch_w])
            grad_x, grad_w = (gx if torch_x else grad_x), (gw if torch_w else grad_w)
        grads[0] = grad_x
        grads[1] = grad if need_residual else None
        if wanted and all(i % 6 < 2 for i in wanted):  # only convs' weights and biases
            acc = torch.promote_types(grad.dtype, torch.float32)
            # as the seed below; only where a bias wants it (a pass over grad: FPN train
            # step at batch 1, AVX2, 11.7 -> 3.6 ms of sums, the FrozenBN convs having none)
            grad_b = grad.sum((0, 2, 3), dtype=acc).to(grad.dtype) if any(
                i % 6 == 1 for i in wanted) else None
            for i in wanted:
                grads[2 + i] = _conv_grad(plan.folds[i // 6], sources[i - i % 6:i - i % 6 + 6],
                                          i % 6, grad_w, grad_b)
        elif wanted:
            leaves = [t.detach().requires_grad_() if n else t for t, n in zip(sources, need)]
            with torch.enable_grad():
                weight, bias = refold(plan.folds, leaves)
            outs, seeds = [weight], [grad_w]
            if bias is not None and bias.requires_grad:  # (not where only buffers made it)
                acc = torch.promote_types(bias.dtype, torch.float32)
                outs.append(bias)
                seeds.append(grad.sum((0, 2, 3), dtype=acc).to(bias.dtype))
            if not weight.requires_grad:  # only the bias's tensors want gradients
                outs, seeds = outs[1:], seeds[1:]
            got = torch.autograd.grad(outs, [leaves[i] for i in wanted], seeds,
                                      allow_unused=True) if outs else ()
            for i, g in zip(wanted, got):
                grads[2 + i] = g
        return (None, *grads)


def torch_conv_backward(grad: Tensor, x: Tensor, weight: Tensor, geometry: Sequence,
                        mask: Sequence[bool]) -> tuple:
    """torch's ``convolution_backward`` (oneDNN's on CPU) of a conv without bias: the
    (input, weight, bias) gradients ``mask`` asks for; ``geometry`` is (stride, padding,
    dilation, groups)."""
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution_backward(grad, x, weight, None, list(stride),
                                               list(padding), list(dilation), False, [0, 0],
                                               groups, list(mask))


def gemm_backward(grad: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int],
                  padding: Sequence[int], mask: Sequence[bool]) -> tuple:
    """``convolution_backward``'s input and weight gradients (as ``mask`` asks; None for the
    other) of a conv of one group and dilation 1, x and grad dense channels_last, as two
    GEMMs over the output's pixels (``torch.mm``: MKL's on CPU). The weight's: grad^T
    (K x pixels) times x's patches (pixels x kh*kw*C, zero where a tap falls in the padding;
    the taps outermost, so each tap's copy writes whole pixels; for an unpadded stride-1 1x1,
    x itself), made contiguous (as a Parameter is unless the model was made channels_last,
    whose gradients autograd then copies to its layout). The input's: grad (pixels x K) times
    the weight (K x kh*kw*C), each tap's columns then added into the pixels that tap read,
    channels_last. NaN and infinities land where torch's land (a padded conv's non-finite
    weight gradient is torch's own); the sums run in another order than oneDNN's (both
    within float32's rounding)."""
    n, k, oh, ow = grad.shape
    c, h, w = x.shape[1:]
    kh, kw = weight.shape[2:]
    rows = grad.permute(0, 2, 3, 1).reshape(-1, k)  # a view: grad is channels_last
    pixels = x.permute(0, 2, 3, 1)
    if _pointwise((kh, kw), stride, padding):
        gw = torch.mm(rows.t(), pixels.reshape(-1, c)).view(k, c, 1, 1) if mask[1] else None
        gx = torch.mm(rows, weight.reshape(k, c)).view(n, h, w, c).permute(0, 3, 1, 2) \
            if mask[0] else None
        return gx, gw
    taps = _taps((kh, kw), stride, padding, (h, w), (oh, ow))
    gx = gw = None
    if mask[1]:
        clipped = any(out != (slice(0, oh), slice(0, ow)) for _, out, _ in taps)
        cols = (x.new_zeros if clipped else x.new_empty)(n, oh, ow, kh * kw, c)
        for t, (oy, ox), (iy, ix) in taps:
            cols[:, oy, ox, t] = pixels[:, iy, ix]
        gw = torch.mm(rows.t(), cols.view(-1, kh * kw * c))
        del cols  # before the input gradient's product of the same size
        gw = gw.view(k, kh, kw, c).permute(0, 3, 1, 2).contiguous()
        if clipped and not bool(torch.isfinite(gw).all()):
            # A NaN or infinity of grad times a padding zero is NaN here, where torch's direct
            # gradient skips the padding: torch's then, so non-finite values land as there.
            gw = torch_conv_backward(grad, x, weight, (stride, padding, [1, 1], 1),
                                     [False, True, False])[1].contiguous()
    if mask[0]:
        weight_by_tap = weight.permute(0, 2, 3, 1).reshape(k, kh * kw * c)
        prod = torch.mm(rows, weight_by_tap).view(n, oh, ow, kh * kw, c)
        gx = x.new_zeros(n, h, w, c)
        for t, (oy, ox), (iy, ix) in taps:
            gx[:, iy, ix] += prod[:, oy, ox, t]
        gx = gx.permute(0, 3, 1, 2)
    return gx, gw


def gemm_backward_scratch(grad: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int],
                          padding: Sequence[int]) -> int:
    """The bytes of :func:`gemm_backward`'s patches, and apart from them (freed first) of its
    product before the taps are added back, beyond the gradients themselves: none for an
    unpadded stride-1 1x1."""
    kh, kw = weight.shape[2:]
    if _pointwise((kh, kw), stride, padding):
        return 0
    n, _, oh, ow = grad.shape
    return n * oh * ow * x.shape[1] * kh * kw * x.element_size()


def _pointwise(kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int]) -> bool:
    """An unpadded stride-1 1x1: its patches are x itself."""
    return tuple(kernel) == (1, 1) and list(stride) == [1, 1] and list(padding) == [0, 0]


def _taps(kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
          size: Sequence[int], out_size: Sequence[int]) -> list:
    """Per tap (i, j) of a kernel, row-major: (i * kw + j, the output pixels whose window puts
    that tap inside the input, the input pixels it reads there), the pixels as (row, column)
    slices: output o reads input o * stride + tap - padding."""
    def span(tap: int, s: int, p: int, size: int, out: int) -> tuple[slice, slice]:
        first = max(0, -(-(p - tap) // s))  # the first o with o * s + tap - p >= 0
        last = min(out, (size - 1 - tap + p) // s + 1)  # past the last with it < size
        last = max(first, last)
        return slice(first, last), slice(first * s + tap - p,
                                         max(first * s + tap - p, (last - 1) * s + tap - p + 1), s)
    taps = []
    for i in range(kernel[0]):
        oy, iy = span(i, stride[0], padding[0], size[0], out_size[0])
        for j in range(kernel[1]):
            ox, ix = span(j, stride[1], padding[1], size[1], out_size[1])
            taps.append((i * kernel[1] + j, (oy, ox), (iy, ix)))
    return taps


def _conv_grad(term: tuple[Optional[float], bool, bool], tensors: Sequence[Optional[Tensor]],
               which: int, grad_w: Tensor, grad_b: Optional[Tensor]) -> Optional[Tensor]:
    """The gradient of one pair's conv weight (``which`` 0) or conv bias (1) through the fold
    (:func:`fold_bn_tensors`: both are scaled by the BN's weight / sqrt(var + eps), per output
    channel, in float32 or float64; without a BN, passed through), from the folded weight's
    and bias's gradients: what autograd through :func:`refold` gives, the same operations in
    the same dtypes, without building and running a graph per conv (frozen-BN fine-tuning,
    an FPN's convs). None where the plan's fold does not read it (``term``: (eps, takes the
    weight, takes the bias))."""
    eps, takes_weight, takes_bias = term
    if not (takes_weight if which == 0 else takes_bias):
        return None
    target = tensors[which]
    g = grad_w if which == 0 else grad_b
    if eps is None:
        return g.to(target.dtype)
    acc = torch.float64 if target.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(tensors[5].to(acc) + eps)
    if tensors[2] is not None:
        scale = scale * tensors[2].to(acc)
    return (g.to(acc) * (scale.view(-1, 1, 1, 1) if which == 0 else scale)).to(target.dtype)


def group_plans(backend: Optional[str], pairs: list, own: int, differentiable: bool,
                cast: Optional[torch.dtype] = None,
                winograd: Optional[bool] = None) -> list[ConvPlan]:
    """The plans of one group of pairs: a block's ``own`` pairs, then (if present) its
    downsample pair, or the stem alone.

    The downsample's folded bias moves into the block's last conv, which takes the
    downsample's output as its residual: relu(conv(y, W3) + (b3 + b_ds) + conv(x, W_ds)).
    The downsample then runs as a plain conv (no bias pass, no epilogue). The two folded
    biases are added in float32 (float64 for float64), and the sum is rounded to the weights'
    dtype. ``cast`` (the autocast dtype): the folded weights and biases are then rounded to
    it and the plans cast their inputs to it. ``winograd``: see :func:`own_kernels`."""
    if differentiable:
        return _group_plans(backend, pairs, own, differentiable, cast, winograd)
    # Normal (not inference) tensors even under inference_mode, so a later call with autograd
    # on (input gradients) may save the prepared weights for backward.
    with torch.inference_mode(False), torch.no_grad():
        return _group_plans(backend, pairs, own, differentiable, cast, winograd)


def _group_plans(backend: Optional[str], pairs: list, own: int, differentiable: bool,
                 cast: Optional[torch.dtype], winograd: Optional[bool]) -> list[ConvPlan]:
    tensors = [(conv.weight, conv.bias, *((None,) * 4 if bn is None else (
        bn.weight, bn.bias, bn.running_mean, bn.running_var))) for conv, bn, _ in pairs]
    eps_of = [None if bn is None else bn.eps for _, bn, _ in pairs]
    folded = [_fold(t, e) for t, e in zip(tensors, eps_of)]
    if not differentiable:  # (a conv without a BN: its Parameters themselves, detached)
        folded = [(w.detach(), None if b is None else b.detach()) for w, b in folded]
    terms = [[(e, True, True)] for e in eps_of]
    if len(pairs) > own:
        (w_last, b_last), (w_ds, b_ds) = folded[own - 1], folded[own]
        folded[own - 1] = (w_last, _add_biases(b_last, b_ds))
        folded[own] = (w_ds, None)
        eps = pairs[own][1].eps
        terms[own - 1].append((eps, False, True))
        terms[own] = [(eps, True, False)]
        tensors[own - 1] += tensors[own]
    if cast is not None:
        folded = [(w.to(cast), None if b is None else b.to(cast)) for w, b in folded]
    return [ConvPlan(conv, w, b, relu, backend, differentiable, casts=cast is not None,
                     folds=(tuple(term), tensor), winograd=winograd)
            for (conv, _, relu), (w, b), term, tensor in zip(pairs, folded, terms, tensors)]


def autocast_dtype(weight: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs a convolution with ``weight`` in, where that is not the
    weight's own (autocast on for its device; float64 is never cast); else None."""
    device = weight.device.type
    # The meta device (shape inference) has no autocast: asking it raises.
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if weight.dtype in (dtype, torch.float64) else dtype
