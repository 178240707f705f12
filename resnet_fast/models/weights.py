"""Turning a builder's ``weights=`` argument into a state_dict.

Accepted: None; a torchvision weights enum member (``ResNet50_Weights.IMAGENET1K_V2``) or its
name ("DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"), downloaded through the
torch.hub cache as torchvision does; a local checkpoint path (read by :func:`load_checkpoint`,
the one loader the builders, ``resnet-fast fuse/check`` and the benchmark share); or a
state_dict mapping.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

try:
    from torchvision.models import WeightsEnum
except ImportError:  # torchvision is only needed for its weight enums
    WeightsEnum = None  # type: ignore[assignment,misc]


def _torchvision_enum(enum_name: Optional[str]):
    if enum_name is None or WeightsEnum is None:
        return None
    import torchvision.models as tvm
    return getattr(tvm, enum_name)


def _named_choices(enum_cls) -> str:
    return ", ".join(enum_cls.__members__)


def resolve(arch: str, enum_name: Optional[str], weights: Any):
    """Classify ``weights`` for ``arch``: returns None, an enum member, a Path or a Mapping."""
    if weights is None:
        return None
    enum_cls = _torchvision_enum(enum_name)
    if WeightsEnum is not None and isinstance(weights, WeightsEnum):
        if enum_cls is None or not isinstance(weights, enum_cls):
            expected = enum_name or "a checkpoint path or a state_dict (no torchvision weights exist)"
            raise ValueError(f"{arch}: expected weights of {expected}, got {weights}")
        return weights
    if isinstance(weights, Mapping):
        return weights
    if isinstance(weights, (str, os.PathLike)):
        text = os.fspath(weights)
        if enum_cls is not None and not os.path.exists(text):
            try:
                return enum_cls.verify(text)
            except (ValueError, KeyError):  # not a member name: maybe a path after all
                pass
        if os.path.isfile(text):
            return Path(text)
        names = f"one of {_named_choices(enum_cls)}, " if enum_cls is not None else ""
        raise ValueError(f"{arch}: weights={text!r} is neither {names}nor an existing checkpoint file")
    raise TypeError(f"{arch}: expected weights to be None, a weights enum, a name, a checkpoint "
                    f"path or a state_dict, got {type(weights).__name__}")


def num_classes_of(arch: str, resolved) -> Optional[int]:
    """How many classes the weights were trained for, when it can be told before loading."""
    if WeightsEnum is not None and isinstance(resolved, WeightsEnum):
        return len(resolved.meta["categories"])
    return None


def load_state_dict(arch: str, resolved, progress: bool) -> Mapping[str, Tensor]:
    if WeightsEnum is not None and isinstance(resolved, WeightsEnum):
        return _download(resolved, progress)
    if isinstance(resolved, Path):
        return load_checkpoint(resolved)
    return _unwrap(resolved, f"{arch}: the given state_dict")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state_dict in the checkpoint file ``path``, on CPU: loaded with ``weights_only=True``
    (a checkpoint is data, never code), taken from under a 'state_dict' or 'model' key where
    training scripts nest it, with DistributedDataParallel's 'module.' prefix removed.

    Raises FileNotFoundError for a missing file, pickle.UnpicklingError for a checkpoint that
    holds objects ``weights_only=True`` refuses to build, and ValueError for a file that is no
    PyTorch checkpoint or holds no state_dict."""
    text = os.fspath(path)
    if os.path.isdir(text):
        raise IsADirectoryError(f"expected a checkpoint file, got a directory: {text!r}")
    if not os.path.isfile(text):
        raise FileNotFoundError(f"expected a checkpoint file, got {text!r} (no such file)")
    if os.path.getsize(text) == 0:
        raise ValueError(f"expected a PyTorch checkpoint, got an empty file: {text}")
    try:
        obj = torch.load(text, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        reason = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
        raise pickle.UnpicklingError(
            f"{text}: torch.load(weights_only=True) refused it ({reason.strip()}); load it "
            "with weights_only=False yourself only if you trust its source") from exc
    # Foreign bytes read as pickle opcodes or a zip archive fail in any way (EOFError,
    # KeyError, IndexError, RuntimeError, ...): all of them mean "not a checkpoint".
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or ["no message"])[0]
        raise ValueError(f"{text} is not a PyTorch checkpoint ({type(exc).__name__} from "
                         f"torch.load: {reason})") from exc
    return _unwrap(obj, text)


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], what: str) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, a mismatch raised as a ValueError
    that says ``what`` did not fit (e.g. "resnet50: the weights")."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{what} do not match the architecture: {exc}") from exc


def _download(weights, progress: bool) -> Mapping[str, Tensor]:
    filename = os.path.basename(urlparse(weights.url).path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=progress, check_hash=True,
                                                  weights_only=True)
    except OSError as exc:  # URLError, HTTPError, timeouts, connection errors
        raise RuntimeError(
            f"could not download {weights} from {weights.url} ({exc}). Without network access, "
            f"fetch {filename} elsewhere and put it at {cached} (the torch.hub cache; TORCH_HOME "
            f"moves it), or pass weights='/path/to/{filename}'") from exc


def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    """A state_dict from what training scripts save: the dict itself, or one nested under
    'state_dict' / 'model', with DistributedDataParallel's 'module.' prefix removed."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state_dict (a mapping of parameter names "
                         f"to tensors), got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        return {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)
