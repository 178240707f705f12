"""The ResNet family: torchvision's architectures (same modules, same state_dict keys) and the
CIFAR ResNets of He et al. Every builder is keyword-only:
``builder(*, weights=None, progress=True, **kwargs)``; see :mod:`resnet_fast.models.weights`
for what ``weights`` accepts and :class:`ResNet` for the kwargs. ``get_model``,
``get_model_weights``, ``get_weight`` and ``list_models`` behave as torchvision's do, over
this family."""

import difflib
import fnmatch
import os
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn
from torchvision.models import (
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    ResNet152_Weights,
    ResNeXt50_32X4D_Weights,
    ResNeXt101_32X8D_Weights,
    ResNeXt101_64X4D_Weights,
    WeightsEnum,
    Wide_ResNet50_2_Weights,
    Wide_ResNet101_2_Weights,
)

from . import weights as _weights
from .cifar import CifarResNet, PadShortcut
from .program import refresh
from .regularizers import DropBlock2d, DropPath, drop_path
from .resnet import BasicBlock, Bottleneck, ResNet, conv1x1, conv3x3

# What a builder's ``weights=`` takes besides its weights enum (and None).
WeightsSource = Union[str, os.PathLike, Mapping[str, Tensor]]

# arch -> (constructor, fixed constructor arguments, torchvision weights enum)
_ARCHS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any],
                        Optional[type[WeightsEnum]]]] = {
    "resnet18": (ResNet, dict(block=BasicBlock, layers=[2, 2, 2, 2]), ResNet18_Weights),
    "resnet34": (ResNet, dict(block=BasicBlock, layers=[3, 4, 6, 3]), ResNet34_Weights),
    "resnet50": (ResNet, dict(block=Bottleneck, layers=[3, 4, 6, 3]), ResNet50_Weights),
    "resnet101": (ResNet, dict(block=Bottleneck, layers=[3, 4, 23, 3]), ResNet101_Weights),
    "resnet152": (ResNet, dict(block=Bottleneck, layers=[3, 8, 36, 3]), ResNet152_Weights),
    "resnext50_32x4d": (ResNet, dict(block=Bottleneck, layers=[3, 4, 6, 3], groups=32,
                                     width_per_group=4), ResNeXt50_32X4D_Weights),
    "resnext101_32x8d": (ResNet, dict(block=Bottleneck, layers=[3, 4, 23, 3], groups=32,
                                      width_per_group=8), ResNeXt101_32X8D_Weights),
    "resnext101_64x4d": (ResNet, dict(block=Bottleneck, layers=[3, 4, 23, 3], groups=64,
                                      width_per_group=4), ResNeXt101_64X4D_Weights),
    "wide_resnet50_2": (ResNet, dict(block=Bottleneck, layers=[3, 4, 6, 3],
                                     width_per_group=128), Wide_ResNet50_2_Weights),
    "wide_resnet101_2": (ResNet, dict(block=Bottleneck, layers=[3, 4, 23, 3],
                                      width_per_group=128), Wide_ResNet101_2_Weights),
    "resnet20": (CifarResNet, dict(depth=20), None),
    "resnet32": (CifarResNet, dict(depth=32), None),
    "resnet44": (CifarResNet, dict(depth=44), None),
    "resnet56": (CifarResNet, dict(depth=56), None),
    "resnet110": (CifarResNet, dict(depth=110), None),
}
# The ImageNet architectures torchvision also builds (the benchmark's and deploy CLI's --arch).
TORCHVISION_ARCHS = tuple(arch for arch, (_, _, enum) in _ARCHS.items() if enum is not None)


def _build(arch: str, weights: Any, progress: bool, kwargs: dict[str, Any]) -> nn.Module:
    ctor, fixed, enum = _ARCHS[arch]
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{arch}: {key} is fixed to {value!r} for this architecture, got "
                             f"{key}={kwargs[key]!r}")
    resolved = _weights.resolve(arch, enum.__name__ if enum is not None else None, weights)
    n_classes = _weights.num_classes_of(arch, resolved)
    if n_classes is not None:
        if kwargs.get("num_classes", n_classes) != n_classes:
            raise ValueError(f"{arch}: num_classes={kwargs['num_classes']} conflicts with weights "
                             f"{resolved}, which have {n_classes} classes; drop num_classes (and "
                             f"replace model.fc after loading to fine-tune)")
        if kwargs.get("in_channels", 3) != 3:
            raise ValueError(f"{arch}: in_channels={kwargs['in_channels']} conflicts with weights "
                             f"{resolved}, which expect 3 input channels")
        kwargs["num_classes"] = n_classes
    model = ctor(**fixed, **kwargs)
    if resolved is not None:
        state_dict = _weights.load_state_dict(arch, resolved, progress)
        _load_checked(arch, model, state_dict)
    return model


def _load_checked(arch: str, model: nn.Module, state_dict) -> None:
    fc = state_dict.get("fc.weight")
    if fc is not None and fc.shape != model.fc.weight.shape:
        raise ValueError(f"{arch}: the checkpoint's fc.weight has shape {tuple(fc.shape)} "
                         f"({fc.shape[0]} classes) but the model was built with num_classes="
                         f"{model.fc.out_features}; pass num_classes={fc.shape[0]}")
    _weights.load_into(model, state_dict, f"{arch}: the weights")


def resnet18(*, weights: Optional[Union[ResNet18_Weights, WeightsSource]] = None,
             progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 (He et al. 2015), torchvision-compatible."""
    return _build("resnet18", weights, progress, kwargs)


def resnet34(*, weights: Optional[Union[ResNet34_Weights, WeightsSource]] = None,
             progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 (He et al. 2015), torchvision-compatible."""
    return _build("resnet34", weights, progress, kwargs)


def resnet50(*, weights: Optional[Union[ResNet50_Weights, WeightsSource]] = None,
             progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 (V1.5: stride on the 3x3 conv), torchvision-compatible."""
    return _build("resnet50", weights, progress, kwargs)


def resnet101(*, weights: Optional[Union[ResNet101_Weights, WeightsSource]] = None,
              progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101, torchvision-compatible."""
    return _build("resnet101", weights, progress, kwargs)


def resnet152(*, weights: Optional[Union[ResNet152_Weights, WeightsSource]] = None,
              progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152, torchvision-compatible."""
    return _build("resnet152", weights, progress, kwargs)


def resnext50_32x4d(*, weights: Optional[Union[ResNeXt50_32X4D_Weights, WeightsSource]] = None,
                    progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al. 2016), torchvision-compatible."""
    return _build("resnext50_32x4d", weights, progress, kwargs)


def resnext101_32x8d(*, weights: Optional[Union[ResNeXt101_32X8D_Weights, WeightsSource]] = None,
                     progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d, torchvision-compatible."""
    return _build("resnext101_32x8d", weights, progress, kwargs)


def resnext101_64x4d(*, weights: Optional[Union[ResNeXt101_64X4D_Weights, WeightsSource]] = None,
                     progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d, torchvision-compatible."""
    return _build("resnext101_64x4d", weights, progress, kwargs)


def wide_resnet50_2(*, weights: Optional[Union[Wide_ResNet50_2_Weights, WeightsSource]] = None,
                    progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko & Komodakis 2016), torchvision-compatible."""
    return _build("wide_resnet50_2", weights, progress, kwargs)


def wide_resnet101_2(*, weights: Optional[Union[Wide_ResNet101_2_Weights, WeightsSource]] = None,
                     progress: bool = True, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2, torchvision-compatible."""
    return _build("wide_resnet101_2", weights, progress, kwargs)


def resnet20(*, weights: Optional[WeightsSource] = None, progress: bool = True,
             **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2015, section 4.2), 0.27M parameters."""
    return _build("resnet20", weights, progress, kwargs)


def resnet32(*, weights: Optional[WeightsSource] = None, progress: bool = True,
             **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32, 0.46M parameters."""
    return _build("resnet32", weights, progress, kwargs)


def resnet44(*, weights: Optional[WeightsSource] = None, progress: bool = True,
             **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44, 0.66M parameters."""
    return _build("resnet44", weights, progress, kwargs)


def resnet56(*, weights: Optional[WeightsSource] = None, progress: bool = True,
             **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56, 0.85M parameters."""
    return _build("resnet56", weights, progress, kwargs)


def resnet110(*, weights: Optional[WeightsSource] = None, progress: bool = True,
              **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110, 1.7M parameters."""
    return _build("resnet110", weights, progress, kwargs)


def list_models(module: Any = None, include: Union[str, Iterable[str], None] = None,
                exclude: Union[str, Iterable[str], None] = None) -> list[str]:
    """The model names, sorted, as torchvision's ``list_models``: ``include``/``exclude`` are
    fnmatch patterns ("resnet*", "*50*"); ``module`` is accepted for torchvision's signature
    and must be None or ``resnet_fast.models`` (this family is one module)."""
    if module is not None and getattr(module, "__name__", None) not in (__name__, "resnet_fast"):
        raise ValueError(f"list_models: resnet_fast has one model family; expected module=None, "
                         f"got {module!r}")
    def matching(patterns: Union[str, Iterable[str]]) -> set[str]:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        return {n for n in _ARCHS if any(fnmatch.fnmatch(n, p) for p in patterns)}

    names = set(_ARCHS) if include is None else matching(include)
    if exclude is not None:
        names -= matching(exclude)
    return sorted(names)


def _arch(name: str) -> str:
    key = name.lower()
    if key not in _ARCHS:
        close = difflib.get_close_matches(key, _ARCHS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; available: {', '.join(list_models())}")
    return key


def get_model(name: str, **config: Any) -> nn.Module:
    """Build a model by name, as torchvision's ``get_model``:
    ``get_model("resnet50", weights="DEFAULT")``. ``create_model`` is the same function."""
    return globals()[_arch(name)](**config)


create_model = get_model  # timm's name


def get_model_weights(name: Union[Callable[..., nn.Module], str]) -> type[WeightsEnum]:
    """The weights enum of a model, by name or builder, as torchvision's
    ``get_model_weights``: ``get_model_weights("resnet50") is ResNet50_Weights``."""
    arch = _arch(name if isinstance(name, str) else getattr(name, "__name__", repr(name)))
    enum = _ARCHS[arch][2]
    if enum is None:
        raise ValueError(f"{arch} has no pretrained weights to name (torchvision has none for "
                         f"the CIFAR ResNets); pass a checkpoint path or a state_dict as weights=")
    return enum


def get_weight(name: str) -> WeightsEnum:
    """A weights enum member by its full name, as torchvision's ``get_weight``:
    ``get_weight("ResNet50_Weights.IMAGENET1K_V2")``."""
    enums = {e.__name__: e for _, _, e in _ARCHS.values() if e is not None}
    enum_name, _, member = name.partition(".")
    if enum_name not in enums or not member:
        raise ValueError(f"expected '<Enum>.<WEIGHTS>' with <Enum> one of "
                         f"{', '.join(sorted(enums))}, got {name!r}")
    return enums[enum_name].verify(member)


__all__ = ["ResNet", "CifarResNet", "BasicBlock", "Bottleneck", "PadShortcut", "DropPath",
           "DropBlock2d", "drop_path", "conv1x1", "conv3x3", "get_model", "create_model",
           "get_model_weights", "get_weight", "list_models", "refresh", "WeightsSource",
           *(e.__name__ for _, _, e in _ARCHS.values() if e is not None), *_ARCHS]
