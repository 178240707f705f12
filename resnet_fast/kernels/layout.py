"""Memory-format rule shared by every kernel backend (mirrors csrc/checks.h)."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format a kernel writes, and makes a strided input dense in: x's own, as
    ``Tensor::suggest_memory_format`` tells it; NCHW (contiguous) unless x is 4-D."""
    if x.dim() != 4:
        return torch.contiguous_format
    return suggest_memory_format(x)


def dense_in(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``t`` itself when already dense in ``fmt``, else a copy that is."""
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)
