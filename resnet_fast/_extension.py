"""Guarded load of the native extension ``resnet_fast._C``.

Importing resnet_fast never fails because the extension is missing or was built for another
torch: the import warns once (:class:`ExtensionWarning`, with the reason and the fix), the
reason stays in :data:`LOAD_ERROR` and ``resnet_fast.available_backends()`` reports it; the
``reference`` backend always works. An extension built without CUDA is a build choice, not a
failure: only the backend report says so.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch


class ExtensionWarning(UserWarning):
    """The C++ extension could not be loaded; resnet_fast runs without its cpu and cuda
    backends. Issued while resnet_fast is first imported, so filter it by module before the
    import: ``warnings.filterwarnings("ignore", module="resnet_fast")``."""


_C = None
LOAD_ERROR: str | None = None
# The loaded build, "size-mtime_ns" of its file as it was at import (the CPU tuner's keys name
# it): read once, so a file rebuilt on disk while this process runs never labels measurements
# of the code that was loaded before it.
BUILD: str | None = None

try:
    from . import _C  # noqa: F811  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # not built, or built against a different torch
    LOAD_ERROR = (f"the C++ extension resnet_fast._C could not be imported ({exc}); rebuild it "
                  f"against the installed torch {torch.__version__} from the source tree with "
                  "`pip install --no-build-isolation .` (a development checkout: "
                  "`pip install --no-build-isolation -e .` or `make build`)")
    warnings.warn(f"resnet_fast: {LOAD_ERROR}. Until then the cpu and cuda backends are "
                  "unavailable and ops run on the reference (plain PyTorch) or Triton backend. "
                  "Run `resnet-fast backends` (or `python -m resnet_fast.doctor`) for the full "
                  "picture.", ExtensionWarning, stacklevel=2)


if _C is not None:
    try:
        _stat = os.stat(_C.__file__)
        BUILD = f"{_stat.st_size}-{_stat.st_mtime_ns}"
    except (OSError, AttributeError):  # no file behind the module (a frozen or zip import)
        pass


def loaded() -> bool:
    return _C is not None


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for ``resnet_fast::<op>`` on a key. Cached:
    the registrations are static once ``_C`` is imported, and a query costs about 12 us. An op
    call does not ask it: ``backends`` caches the choices it feeds per op and device type
    (``_resolve``, ``tuned_backends``; only a refused request asks again), and
    ``ops.conv_bias_act`` asks at import and in the cached ``onednn_dtypes``."""
    if _C is None or not hasattr(torch.ops.resnet_fast, op):
        return False  # hasattr: an extension built from older sources lacks newer ops
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{op}", dispatch_key)


def _tensor_states_py(tensors: list[torch.Tensor]) -> list[tuple]:
    if any(t.is_inference() for t in tensors):
        raise RuntimeError("tensor_states: inference tensors do not track version counters")
    return [(t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride()) for t in tensors]


# (version counter, data pointer, dtype, device, sizes, strides) of each tensor, as one
# comparable value: what the models' plans are keyed on (sizes and strides too, since
# ``t.data = t.data[:32]`` keeps the pointer and the version). From the extension when it has
# it (~20 ns a tensor instead of ~1 us); both raise RuntimeError for inference tensors, which
# have no version counter.
tensor_states: Callable[[list[torch.Tensor]], object] = getattr(_C, "tensor_states",
                                                                _tensor_states_py)
