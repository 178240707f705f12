"""``optimize`` (a torchvision or resnet_fast ResNet -> the fastest inference module this
machine allows) and what it returns, :class:`OptimizedModel`: the model called under
``torch.inference_mode``, on CUDA replayed from one captured CUDA graph per input shape. The
model surgery it starts from (``convert``) is :mod:`.convert`'s."""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
import torchvision.models.resnet as tv_resnet
from torch import nn

from .convert import convert
from .models import resnet as rf_resnet
from .models.cifar import CifarResNet
from .ops.conv_bias_act import onednn_dtype_supported


class OptimizedModel(nn.Module):
    """What :func:`optimize` returns: a resnet_fast model prepared for inference, called under
    ``torch.inference_mode``; on CUDA optionally replayed from one CUDA graph per input shape."""

    def __init__(self, model: nn.Module, dtype: Optional[torch.dtype], channels_last: bool,
                 cuda_graphs: bool) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs
        self._graphs: dict = {}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """x in the model's dtype and (4-D) channels_last: one copy at most."""
        fmt = (torch.channels_last if self.channels_last and x.dim() == 4
               else torch.preserve_format)
        return x.to(dtype=self.dtype or x.dtype, memory_format=fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._prepare(x)
        if not (self.cuda_graphs and x.is_cuda):
            with torch.inference_mode():
                return self.model(x)
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x)
            self._graphs[key] = entry
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()  # the graph overwrites static_out on the next replay

    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # warm up: cuDNN/Triton autotuning, folds, allocations
                self.model(static_in)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            static_out = self.model(static_in)
        return graph, static_in, static_out


def optimize(model: nn.Module, *, backend: Optional[str] = "auto", dtype: Optional[torch.dtype] = None,
             channels_last: bool = True, cuda_graphs: Optional[bool] = None,
             example_input: Optional[torch.Tensor] = None,
             winograd: Optional[bool] = None) -> OptimizedModel:
    """The fastest inference module this machine allows, in one call.

    Converts a torchvision ResNet (a copy; the argument is never modified), switches to eval
    with every conv -> BN (-> add) -> ReLU fused on ``backend``, casts to ``dtype``, feeds
    channels_last activations, and with ``example_input`` runs it once so the first real call
    pays no folding or weight reordering. On CUDA, ``cuda_graphs`` (default: on) replays one
    captured graph per input shape (re-captured for a new shape). On CPU, outputs come from
    the reused buffers of the conv kernels (see ``resnet_fast.ops.cpu_cache_bytes``). A
    half-precision ``dtype`` on a CPU where oneDNN has no convolution for it is a
    RuntimeWarning: it runs emulated, slower than float32. ``winograd``: the stride-1 3x3
    convs' Winograd setting on CPU (``ResNet.set_winograd``): None measures F(2x2,3x3)
    against oneDNN per layer (in bfloat16 also F(4x4,3x3), which errs there as oneDNN
    does), True also F(4x4,3x3) in float32 (5-11x the error per layer), False never.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(model, (rf_resnet.ResNet, CifarResNet, tv_resnet.ResNet)):
        raise TypeError(f"optimize: expected a resnet_fast or torchvision ResNet, got "
                        f"{type(model).__name__} (a detection backbone: build it with "
                        f"resnet_fast.models.detection, which fuses its FPN too)")
    ours = convert(model) if isinstance(model, tv_resnet.ResNet) else copy.deepcopy(model)
    ours.set_backend(None if backend == "auto" else backend)
    ours.set_winograd(winograd)
    if dtype is not None:
        ours.to(dtype)
    ours.eval()
    device = next(ours.parameters()).device
    if (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and not onednn_dtype_supported(dtype)):
        warnings.warn(f"optimize: oneDNN has no {dtype} convolution for this CPU (bfloat16 "
                      f"needs AVX-512 or AVX-NE-CONVERT, float16 AVX512-FP16, AMX-FP16 or "
                      f"AVX-NE-CONVERT), so {dtype} runs emulated and slower than float32 "
                      f"(ResNet-50 bf16 on an AVX2 host: 8-9x slower); pass dtype=None for "
                      f"float32", RuntimeWarning, stacklevel=2)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"
    elif cuda_graphs and device.type != "cuda":
        raise ValueError(f"optimize: cuda_graphs=True needs the model on a CUDA device, got {device}")
    optimized = OptimizedModel(ours, dtype, channels_last, cuda_graphs)
    if example_input is not None:
        optimized(example_input.to(device))
    return optimized
