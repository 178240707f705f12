"""Model surgery: ``fuse_bn`` (fold every conv -> BN pair for deployment) and ``convert`` (a
torchvision ResNet instance -> the equivalent resnet_fast model). ``optimize``, which builds
on ``convert``, is in :mod:`.optimized`."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Optional

import torch
import torchvision.models.resnet as tv_resnet
from torch import fx, nn

from .models import resnet as rf_resnet
from .models._fused import no_hooks
from .models.cifar import CifarResNet
from .ops import fold_bn

_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)
_RESNET_BLOCKS = (tv_resnet.BasicBlock, tv_resnet.Bottleneck, rf_resnet.BasicBlock,
                  rf_resnet.Bottleneck)
_RESNETS = (tv_resnet.ResNet, rf_resnet.ResNet, CifarResNet)


def _check_foldable(name: str, bn: nn.Module) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"fuse_bn: {name} has no running statistics (track_running_stats="
                         "False): it normalizes with batch statistics and cannot be folded")
    if bn.training:
        raise ValueError(f"fuse_bn: {name} is in training mode, where it uses batch statistics "
                         "that a folded conv cannot reproduce; call model.eval() first")


def _fold_into(conv: nn.Conv2d, bn: nn.Module, name: str) -> None:
    _check_foldable(name, bn)
    weight, bias = fold_bn(conv, bn)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(bias)


def _structural_pairs(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv attribute, bn attribute) of every conv -> BN pair of a ResNet, by the
    torchvision names (conv1/bn1, conv2/bn2, conv3/bn3, downsample.0/downsample.1)."""
    pairs = []
    for module in model.modules():
        if isinstance(module, _RESNETS + _RESNET_BLOCKS):
            for i in (1, 2, 3):
                conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, _BN):
                    pairs.append((module, f"conv{i}", f"bn{i}"))
        if isinstance(module, _RESNET_BLOCKS) and isinstance(module.downsample, nn.Sequential):
            ds = module.downsample
            if len(ds) == 2 and isinstance(ds[0], nn.Conv2d) and isinstance(ds[1], _BN):
                pairs.append((ds, "0", "1"))
    return pairs


def _fuse_resnet(model: nn.Module) -> int:
    names = {id(m): n for n, m in model.named_modules()}
    pairs = _structural_pairs(model)
    for parent, _, bn_attr in pairs:
        bn = getattr(parent, bn_attr)
        _check_foldable(f"{names[id(parent)] or 'model'}.{bn_attr}".lstrip("."), bn)
    for parent, conv_attr, bn_attr in pairs:
        _fold_into(getattr(parent, conv_attr), getattr(parent, bn_attr), bn_attr)
        setattr(parent, bn_attr, nn.Identity())
    return len(pairs)


def _fuse_fx(model: nn.Module) -> nn.Module:
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise ValueError(f"fuse_bn: cannot find the conv -> BN pairs of a "
                         f"{type(model).__name__}: torch.fx could not trace it ({exc})") from exc
    modules = dict(traced.named_modules())
    # Folding rewrites the conv *module*, so every call of it changes, not only the one that
    # feeds the BN; and a BN called twice would be removed from both calls.
    calls = Counter(n.target for n in traced.graph.nodes if n.op == "call_module")
    folds = []
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BN):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules[src.target], nn.Conv2d)):
            continue
        if calls[src.target] != 1:
            raise ValueError(f"fuse_bn: conv {src.target} is called {calls[src.target]} times in "
                             f"the forward; folding BN {node.target} into it would change the "
                             "calls not followed by that BN")
        if calls[node.target] != 1:
            raise ValueError(f"fuse_bn: BN {node.target} is called {calls[node.target]} times in "
                             f"the forward; folding it into conv {src.target} would leave the "
                             "other calls without their normalization")
        if len(src.users) != 1:
            others = ", ".join(str(u) for u in src.users if u is not node)
            raise ValueError(f"fuse_bn: the output of conv {src.target} feeds {others} besides "
                             f"BN {node.target}; folding the BN into it would change those")
        _check_foldable(node.target, modules[node.target])
        folds.append((src, node))
    for conv_node, bn_node in folds:
        _fold_into(modules[conv_node.target], modules[bn_node.target], bn_node.target)
        bn_node.replace_all_uses_with(conv_node)
        traced.graph.erase_node(bn_node)
        traced.delete_submodule(bn_node.target)
    traced.graph.lint()
    traced.recompile()
    return traced


def fuse_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every conv -> BatchNorm pair into the conv for deployment.

    The conv gets the folded weight and a bias (folded in float32, float64 for a float64 conv,
    then cast); the BN becomes ``nn.Identity``. ResNets (resnet_fast's and torchvision's) are
    folded by their module structure and keep their class; any other model is traced with
    torch.fx and returned as a ``GraphModule``. Plain torch.nn modules result either way.

    Raises ValueError where folding would be wrong: a BN in training mode or without running
    statistics, a conv whose output feeds something besides its BN, a conv or BN module called
    more than once in the forward, an untraceable model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_bn: expected an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    if isinstance(target, _RESNETS):
        _fuse_resnet(target)
        return target
    return _fuse_fx(target)


# torchvision's classes and ours that stand for them; any other module is copied as it is.
_COUNTERPARTS = {tv_resnet.ResNet: rf_resnet.ResNet, tv_resnet.BasicBlock: rf_resnet.BasicBlock,
                 tv_resnet.Bottleneck: rf_resnet.Bottleneck}


def convert(model: nn.Module, *, backend: Optional[str] = None) -> rf_resnet.ResNet:
    """A torchvision ResNet (any of the family, with its weights) -> the equivalent
    resnet_fast model with a copy of its weights, on the same device/dtype, in the same mode.

    Model surgery is kept: every module that is not what torchvision builds at its place (a
    replaced head, an ``nn.Identity`` maxpool or stage, an ``nn.AdaptiveMaxPool2d``, an
    ``nn.SiLU`` in a block, a conv with another stride, a block subclass, an added module) is
    copied as it is (modules shared between places stay shared); ours run it as torchvision
    does, unfused where the fused kernels would compute something else. So is a module with
    hooks, a pruning mask or a parametrization. Refused: a ResNet subclass with its own
    forward (its forward is not ours to replace), and hooks on the model itself (register
    them on the converted model)."""
    if isinstance(model, rf_resnet.ResNet):
        return model
    if not isinstance(model, tv_resnet.ResNet):
        raise TypeError(f"convert: expected a torchvision ResNet, got {type(model).__name__}")
    kind = type(model)
    if kind.forward is not tv_resnet.ResNet.forward or (
            kind._forward_impl is not tv_resnet.ResNet._forward_impl):
        raise TypeError(f"convert: {kind.__name__} overrides torchvision's ResNet forward; "
                        "expected torchvision's ResNet (convert can keep replaced modules, not "
                        "a forward of your own)")
    if _has_hooks(model):
        raise ValueError(f"convert: the {kind.__name__} has hooks registered on itself; expected "
                         "none (register them on the converted model; hooks on its submodules "
                         "are kept)")
    stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
    blocks = [b for stage in stages if isinstance(stage, nn.Sequential) for b in stage
              if isinstance(b, (tv_resnet.BasicBlock, tv_resnet.Bottleneck))]
    block = (rf_resnet.Bottleneck if blocks and isinstance(blocks[0], tv_resnet.Bottleneck)
             else rf_resnet.BasicBlock)
    # A stage that is not a Sequential (replaced) gets one block; it is replaced again below.
    layers = [len(stage) if isinstance(stage, nn.Sequential) else 1 for stage in stages]
    dilations, previous = [], 1
    for stage in stages[1:]:
        last = stage[-1] if isinstance(stage, nn.Sequential) and len(stage) else None
        conv2 = getattr(last, "conv2", None)
        d = conv2.dilation[0] if isinstance(conv2, nn.Conv2d) else previous
        dilations.append(d > previous)
        previous = d
    norm = type(model.bn1) if isinstance(model.bn1, _BN) else nn.BatchNorm2d
    # The input channels the stem takes; any other stem (a 3x3 small-image conv, a 1-channel
    # one) replaces the 7x7 one ours is built with.
    channels = getattr(model.conv1, "in_channels", 3)
    # num_classes only sizes the Linear that the copy of the model's own head replaces.
    ours = rf_resnet.ResNet(block, layers, num_classes=1, groups=model.groups,
                            width_per_group=model.base_width,
                            replace_stride_with_dilation=dilations,
                            norm_layer=None if norm is nn.BatchNorm2d else norm,
                            in_channels=max(channels, 2), backend=backend)
    ours.in_channels = channels
    _adopt(model, ours, {}, "", root=True)
    ref = next(model.parameters())
    ours.load_state_dict(model.state_dict(), strict=True)
    ours.to(device=ref.device, dtype=ref.dtype)
    _copy_modes(model, ours)
    return ours


def _has_hooks(m: nn.Module) -> bool:
    """Forward/backward hooks (``no_hooks``) or state_dict hooks on ``m`` itself."""
    return not no_hooks(m) or any(getattr(m, name) for name in (
        "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks"))


def _copy(module: Optional[nn.Module], memo: dict, path: str) -> Optional[nn.Module]:
    try:
        return copy.deepcopy(module, memo)
    except RuntimeError as exc:  # torch cannot deepcopy computed (non-leaf) tensor attributes
        raise ValueError(f"convert: cannot copy {path} ({type(module).__name__}): {exc} (a pruned "
                         "module copies after torch.nn.utils.prune.remove)") from exc


def _adopt(theirs: nn.Module, ours: nn.Module, memo: dict, path: str,
           root: bool = False) -> nn.Module:
    """``ours`` (built as torchvision builds ``theirs``) with each submodule that differs from
    what is at the same place in ``theirs`` replaced by a copy of that one (one ``memo`` for
    every copy, so shared modules stay shared): another class (not our counterpart of it; the
    root may be a subclass, already checked), hooks (pruning masks are hooks), other
    parameter or buffer names, or a leaf configured otherwise (``extra_repr``: stride,
    padding, eps, ...). Children follow ``theirs``'s names and order, added and removed ones
    included."""
    if not root and (_COUNTERPARTS.get(type(theirs), type(theirs)) is not type(ours)
                     or _has_hooks(theirs) or theirs._parameters.keys() != ours._parameters.keys()
                     or theirs._buffers.keys() != ours._buffers.keys()):
        return _copy(theirs, memo, path)
    if not theirs._modules and not ours._modules:
        return ours if theirs.extra_repr() == ours.extra_repr() else _copy(theirs, memo, path)
    children = {}
    for name, child in theirs._modules.items():
        mine = ours._modules.get(name)
        where = f"{path}.{name}" if path else name
        children[name] = (_copy(child, memo, where) if child is None or mine is None
                          else _adopt(child, mine, memo, where))
        # A plain attribute of ours (a block's downsample=None) would shadow the child.
        ours.__dict__.pop(name, None)
    ours._modules = children
    return ours


def _copy_modes(source: nn.Module, target: nn.Module) -> None:
    """Each module's train/eval flag and each parameter's requires_grad, by name: a model-wide
    ``.train()`` would unfreeze a BN put in eval on its own (its running stats would then
    move) and ``requires_grad=False`` parameters would train. The trees match by construction."""
    modules = dict(source.named_modules(remove_duplicate=False))
    for name, module in target.named_modules(remove_duplicate=False):
        module.training = modules[name].training
    params = dict(source.named_parameters(remove_duplicate=False))
    for name, param in target.named_parameters(remove_duplicate=False):
        param.requires_grad_(params[name].requires_grad)
