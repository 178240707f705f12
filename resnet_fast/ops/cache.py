"""The CPU output-buffer cache of the C++ kernels (csrc/cpu/buffer_pool.h).

Outputs of 1 MiB and more are carved from 2 MiB-aligned, huge-page-advised buffers that are
kept when the output dies and reused for the next output of the same size, so repeated
inference skips the allocation and page faults that dominate a memory-bound op on CPU.
``RESNET_FAST_CPU_CACHE_MB`` caps what is kept (default 1024; 0 disables).
"""

from __future__ import annotations

import torch

from .. import _extension


def cpu_cache_bytes() -> int:
    """Bytes held by the cache now (buffers of live tensors not counted)."""
    return int(torch.ops.resnet_fast.cpu_buffer_cache_bytes()) if _extension.loaded() else 0


def empty_cpu_cache() -> int:
    """Free every cached buffer; returns the bytes released."""
    return int(torch.ops.resnet_fast.cpu_buffer_cache_clear()) if _extension.loaded() else 0
