"""What every resnet_fast op registers besides its kernels: the fake (meta) kernel, autograd
and an autocast rule, applied to each registered variant of the op (the C++ op
``resnet_fast::<name>`` when the extension is built, and the Triton op
``resnet_fast::<name>_triton``)."""

from __future__ import annotations

from typing import Callable

import torch

from .. import _extension
from ..backends import interpreting_triton

# Python-defined ops (the Triton variants) live in the same namespace as the C++ ones.
_LIB = torch.library.Library("resnet_fast", "FRAGMENT")


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
            _LIB.impl(qualname.split("::")[1], _autocast_kernel(op, device_type, autocast), key)


def relu_grad(out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d relu(s)/ds applied to ``grad``: passes where the output is positive; a NaN output
    gives 0, as torch.relu's backward does."""
    return torch.where(out > 0, grad, torch.zeros_like(grad))


def _autocast_kernel(op, device_type: str, cast: Callable[[tuple], tuple]):
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
