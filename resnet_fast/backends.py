"""Which kernel backends work on this machine, and how one is chosen for a call.

Backends:
  reference  plain PyTorch (resnet_fast/ops/reference.py); always available
  cpu        the C++ extension on CPU tensors
  cuda       the C++/CUDA extension on CUDA tensors
  triton     Triton kernels on CUDA tensors

Choice for a call: the ``backend=`` argument, else the ``RESNET_FAST_BACKEND`` environment
variable, else ``auto``. A named backend that cannot run the call raises
:class:`BackendUnavailableError` saying why; only ``auto`` falls back, and it logs its
choice once per (op, device type).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "RESNET_FAST_BACKEND"

log = logging.getLogger("resnet_fast")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


class BackendStatus(NamedTuple):
    available: bool
    detail: str  # what it runs on when available, why not otherwise


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def backend_status(name: str) -> BackendStatus:
    """Availability of one backend, with the reason when it is not available."""
    if name == "reference":
        return BackendStatus(True, "plain PyTorch, any device")
    if name == "cpu":
        if not _extension.loaded():
            return BackendStatus(False, _extension.LOAD_ERROR or "extension not loaded")
        return BackendStatus(True, f"C++ extension, {torch.get_num_threads()} threads")
    if name == "cuda":
        if not _extension.loaded():
            return BackendStatus(False, _extension.LOAD_ERROR or "extension not loaded")
        if not _extension.has_kernel("add_relu", "CUDA"):
            return BackendStatus(False, "the extension was built without CUDA kernels (no CUDA "
                                        "toolkit at build time, or RESNET_FAST_NO_CUDA=1)")
        if not torch.cuda.is_available():
            return BackendStatus(False, "CUDA kernels are built but no CUDA device is visible")
        return BackendStatus(True, f"C++/CUDA extension on {torch.cuda.get_device_name()}")
    if name == "triton":
        err = _triton_import_error()
        if err:
            return BackendStatus(False, err)
        import triton
        if torch.cuda.is_available():
            return BackendStatus(True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}")
        if interpreting_triton():
            return BackendStatus(True, f"Triton {triton.__version__} interpreter on CPU tensors "
                                       "(TRITON_INTERPRET=1; for tests, slow)")
        return BackendStatus(False, "no CUDA device is visible (Triton runs CPU tensors only "
                                    "under its interpreter, TRITON_INTERPRET=1)")
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it works here and, if not, why.

    >>> {k: v.available for k, v in resnet_fast.available_backends().items()}
    {'reference': True, 'cpu': True, 'cuda': False, 'triton': False}
    """
    return {name: backend_status(name) for name in BACKENDS}


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else $RESNET_FAST_BACKEND, else 'auto'."""
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if choice != "auto" and choice not in BACKENDS:
        source = "backend=" if backend is not None else f"${ENV_VAR}="
        raise ValueError(f"{source}{choice!r} is not a backend; expected 'auto' or one of "
                         f"{', '.join(BACKENDS)}")
    return choice


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Which backends auto picks from on a device type, in order of preference. The models' plans
# measure per layer where more than one kernel backend serves (tuned_backends); this order is
# the choice everywhere else and when measuring is off.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def device_backends(device_type: str) -> tuple[str, ...]:
    """The backends that run tensors of a device type, in auto's order of preference."""
    return _AUTO_ORDER.get(device_type, ("reference",))


def _serves(device_type: str) -> tuple[str, ...]:
    """Backends that can be asked for by name on a device type."""
    names = device_backends(device_type)
    if device_type == "cpu" and interpreting_triton():
        names += ("triton",)
    return names


# Under torch.compile the choice is made once, at trace time, and baked into the graph
# (the availability queries it makes are not traceable and do not change while running).
@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``op`` on ``device`` for this call."""
    return _resolve(op, device.type, requested_backend(backend), interpreting_triton())


def _usable(name: str, op: str, dev: str) -> bool:
    native_ok = name not in ("cpu", "cuda") or _extension.has_kernel(op, dev.upper())
    return native_ok and backend_status(name).available


@functools.lru_cache(maxsize=None)
def tuned_backends(op: str, dev: str) -> tuple[str, ...]:
    """The kernel backends (not ``reference``) that ``auto`` may run ``op`` on for ``dev``
    tensors, in order of preference; the models time them per layer where there are two or
    more (CUDA: ``cuda`` and ``triton``)."""
    return tuple(name for name in device_backends(dev)
                 if name != "reference" and _usable(name, op, dev))


# Availability is fixed once the extension is imported, so a choice is worked out once per
# (op, device type, request); an unavailable request raises every time (exceptions are not
# cached).
@functools.lru_cache(maxsize=None)
def _resolve(op: str, dev: str, choice: str, _interpreting: bool) -> str:
    if choice == "auto":
        for name in device_backends(dev):
            if _usable(name, op, dev):
                log.info("resnet_fast: %s on %s uses the %s backend", op, dev, name)
                return name
        return "reference"
    candidates = _serves(dev)
    if choice not in candidates:
        raise BackendUnavailableError(
            f"backend {choice!r} cannot run {op} on {dev} tensors; on {dev} the choices are "
            f"{', '.join(candidates)}")
    status = backend_status(choice)
    if not status.available:
        raise BackendUnavailableError(f"backend {choice!r} is not available: {status.detail}")
    return choice
