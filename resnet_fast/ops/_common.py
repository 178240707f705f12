"""What the resnet_fast ops share: the input checks every backend refuses bad inputs with
(one message per mistake, wherever it is caught), and what every op registers besides its
kernels (fake kernel, autograd, autocast rule) for each registered variant: the C++ op
``resnet_fast::<name>`` when the extension is built and the Triton op
``resnet_fast::<name>_triton``. An op's own checks live in its file."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import _extension
from ..backends import interpreting_triton

# Python-defined ops (the Triton variants) live in the same namespace as the C++ ones.
LIB = torch.library.Library("resnet_fast", "FRAGMENT")


def qualnames(name: str) -> list[str]:
    """The registered variants of an op: the C++ one (if built) and the Triton one."""
    names = [f"resnet_fast::{name}_triton"]
    # hasattr: an extension built from older sources may lack a newer op; the op then runs on
    # the other backends and available_backends() tells the user to rebuild.
    if _extension.loaded() and hasattr(torch.ops.resnet_fast, name):
        names.insert(0, f"resnet_fast::{name}")
    return names


def register_common(name: str, *, fake: Callable, backward: Callable, setup_context: Callable,
                    autocast: Callable[[tuple], tuple]) -> None:
    """Fake kernel, autograd and an autocast rule for every variant of op ``name``.

    ``autocast(args)`` returns the arguments cast as eager PyTorch's type promotion would
    (the ops themselves require one dtype); it runs with autocast disabled for the redispatch.
    """
    for qualname in qualnames(name):
        torch.library.register_fake(qualname, fake)
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        op = getattr(torch.ops.resnet_fast, qualname.split("::")[1]).default
        for key, device_type in (("AutocastCPU", "cpu"), ("AutocastCUDA", "cuda")):
            LIB.impl(qualname.split("::")[1], autocast_kernel(op, device_type, autocast), key)


def relu_grad(out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d relu(s)/ds applied to ``grad``: torch.relu's own backward (threshold_backward, itself
    differentiable for a create_graph backward): 0 where the output is <= 0, else ``grad``, so
    a NaN output passes its gradient."""
    return torch.ops.aten.threshold_backward(grad, out, 0)


def autocast_kernel(op, device_type: str, cast: Callable[[tuple], tuple]):
    def kernel(*args):
        with torch.autocast(device_type=device_type, enabled=False):
            return op(*cast(args))
    return kernel


def triton_kernels():
    """The Triton launchers, imported on first use; CPU tensors only under the interpreter."""
    from ..kernels.triton import elementwise
    return elementwise


def check_triton_device(x: torch.Tensor, op: str) -> None:
    if x.device.type == "cpu" and not interpreting_triton():
        raise RuntimeError(f"{op} (triton): CPU tensors run only under the Triton interpreter "
                           "(TRITON_INTERPRET=1 set before triton is imported); use "
                           "backend='cpu' for CPU tensors")


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_tensor(t: object, op: str, name: str, strided: bool = True) -> None:
    """A float tensor; ``strided`` (all but a prepacked, mkldnn-layout weight): an mkldnn or
    sparse tensor would otherwise fail deep in a kernel, with a message about memory formats
    or a missing dispatch key."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    if strided and t.layout != torch.strided:
        raise ValueError(f"{op}: expected a strided (dense) tensor for {name}, got layout "
                         f"{t.layout} (convert it with .to_dense())")
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
