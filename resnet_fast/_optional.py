"""Imports of optional dependencies that say which extra of resnet_fast installs them."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``module`` imported, or an ImportError naming the extra that installs it.

    >>> tqdm = require("tqdm", "bench", "the benchmark's progress bar").tqdm
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs {module} ({exc}): "
                          f"pip install 'resnet_fast[{extra}]'", name=module) from exc
