"""The PyTorch reference for every resnet_fast op: plain eager code, the one definition
that kernels in every backend are tested against. No validation here (see ops/_checks.py).
"""

from __future__ import annotations

import torch
from torch import Tensor


def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    """relu(x + residual), computed as eager PyTorch does it."""
    return torch.relu(x + residual)
