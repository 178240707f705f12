"""Guarded load of the native extension ``resnet_fast._C``.

Importing resnet_fast never fails because the extension is missing, was built for another
torch, or was built without CUDA: the failure is recorded here and reported by
``resnet_fast.available_backends()``; the ``reference`` backend always works.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

_C = None
LOAD_ERROR: str | None = None

try:
    from . import _C  # noqa: F811  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # not built, or built against a different torch
    LOAD_ERROR = (f"the C++ extension resnet_fast._C could not be imported ({exc}); "
                  "build it with `pip install --no-build-isolation -e .` (or `make test`)")


def loaded() -> bool:
    return _C is not None


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for ``resnet_fast::<op>`` on a key. Cached:
    the registrations are static once ``_C`` is imported, and ``auto`` asks on every op call
    (12 us a query, ~0.6 ms per ResNet-50 forward)."""
    if _C is None or not hasattr(torch.ops.resnet_fast, op):
        return False  # hasattr: an extension built from older sources lacks newer ops
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{op}", dispatch_key)


def _tensor_states_py(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(t._version, t.data_ptr()) for t in tensors]


# (version counter, data pointer) of each tensor, as one comparable value: what the models'
# plans are keyed on. From the extension when it has it (~20 ns a tensor instead of ~0.3 us);
# both raise RuntimeError for inference tensors, which have no version counter.
tensor_states: Callable[[list[torch.Tensor]], object] = getattr(_C, "tensor_states",
                                                                _tensor_states_py)
