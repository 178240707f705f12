"""Memory-format rule shared by every kernel backend and the models (mirrors csrc/checks.h):
the layout a kernel writes, and the copy that makes a tensor dense in it."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from .. import _extension

_FAST_COPY = _extension.has_kernel("to_channels_last", "CPU")


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format a kernel writes, and makes a strided input dense in: x's own, as
    ``Tensor::suggest_memory_format`` tells it; NCHW (contiguous) unless x is 4-D."""
    if x.dim() != 4:
        return torch.contiguous_format
    return suggest_memory_format(x)


def dense_in(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` itself when already dense in ``fmt``, else a copy that is: an NCHW CPU tensor made
    channels_last by ``resnet_fast::to_channels_last`` (csrc/cpu/layout.cpp: up to 5x faster
    than torch's copy; the C++ ``dense_in`` in csrc/checks.h does the same), anything else by
    torch."""
    if t.is_contiguous(memory_format=fmt):
        return t
    if (fmt == torch.channels_last and _FAST_COPY and t.device.type == "cpu" and t.dim() == 4
            and t.is_contiguous()):
        return torch.ops.resnet_fast.to_channels_last(t)
    return t.contiguous(memory_format=fmt)


if _FAST_COPY:
    @torch.library.register_fake("resnet_fast::to_channels_last")
    def _to_channels_last_fake(x):
        torch._check(x.dim() == 4, lambda: f"to_channels_last: expected a 4-D tensor, got "
                     f"{x.dim()}-D")
        return torch.empty_like(x, memory_format=torch.channels_last)

    # A copy: its gradient is the output's, whatever the layout.
    torch.library.register_autograd("resnet_fast::to_channels_last", lambda ctx, grad: grad)
