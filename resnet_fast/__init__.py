"""resnet_fast: fused-kernel ResNets for PyTorch.

``from resnet_fast import resnet50, ResNet50_Weights`` is a drop-in for torchvision's (same
modules, same state_dict keys, same outputs); ``resnet_fast.available_backends()`` says which
kernel backends work on this machine and why the others do not.
"""

from . import ops
from ._extension import ExtensionWarning
from ._version import __version__
from .backends import BackendUnavailableError, available_backends
from .convert import convert, fuse_bn
from .models import *  # noqa: F401,F403
from .models import __all__ as _models_all
from .models.weights import load_checkpoint
from .optimized import optimize

__all__ = ["ops", "available_backends", "BackendUnavailableError", "ExtensionWarning", "convert",
           "fuse_bn", "optimize", "load_checkpoint", "__version__", *_models_all]
