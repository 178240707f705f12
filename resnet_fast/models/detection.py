"""Detection backbones: torchvision's ResNet + FPN builders with the FPN's convs fused too.

``from resnet_fast.models.detection import resnet_fpn_backbone, _resnet_fpn_extractor`` stands
in for ``torchvision.models.detection.backbone_utils``'s: the same modules, state_dict keys
and outputs (channels_last, as the fused body's stages hand them), where the body is a
resnet_fast ResNet (fused on its own) and the FPN a :class:`FeaturePyramidNetwork`, whose
convs run as prepared plans: on CPU each 3x3 measures our Winograd and each 1x1 our GEMM
against oneDNN, and each lateral 1x1 adds the upsampled top-down map in its epilogue. The FPN's
3x3s are most of its time (512 px, batch 1: 85 of ~130 ms) and run 2x faster as Winograd
F(2x2,3x3) (docs/design.md).
"""

from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn
from torchvision.models import _utils
from torchvision.models.detection import backbone_utils
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from ..kernels.layout import dense_in
from ._fused import ConvPlan, autocast_dtype, faking, in_functorch, no_hooks, recorded
from .program import FusedEvalMixin, Kept, may_fuse, pairs_of

__all__ = ["FeaturePyramidNetwork", "IntermediateLayerGetter", "fuse_fpn", "resnet_fpn_backbone",
           "_resnet_fpn_extractor"]


class FeaturePyramidNetwork(FusedEvalMixin, torchvision.ops.FeaturePyramidNetwork):
    """torchvision's ``FeaturePyramidNetwork`` (same arguments, modules, keys and outputs),
    its convs fused: each inner and layer block that is exactly torchvision's
    ``Conv2dNormActivation`` holding one ``nn.Conv2d`` (then a BN in eval or a
    ``FrozenBatchNorm2d``, folded), none with hooks, runs as a prepared plan (the rebuild
    rules of the ResNets' plans, ``program.Kept``), in eval and in training (a conv alone
    computes the same in both; gradients through the plans' backward), with the top-down
    map added in the lateral conv's epilogue. Anything else, a recording tool (jit.trace,
    FX, TorchScript), a torch.func transform, or inputs the convs cannot take (another dtype
    than the weights' or autocast's, another device, not 4-D strided, an empty batch) runs
    torchvision's forward."""

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        if not torch.jit.is_scripting():
            plans = self._plans(list(x.values()))
            if plans is not None:
                return self._forward_fused(x, plans)
        return self._forward_plain(x)

    def _forward_plain(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """torchvision's forward."""
        names = list(x.keys())
        feats = list(x.values())
        last_inner = self.get_result_from_inner_blocks(feats[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            inner_lateral = self.get_result_from_inner_blocks(feats[idx], idx)
            inner_top_down = F.interpolate(last_inner, size=inner_lateral.shape[-2:],
                                           mode="nearest")
            last_inner = inner_lateral + inner_top_down
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict([(k, v) for k, v in zip(names, results)])

    @torch.jit.unused
    def _forward_fused(self, x: dict[str, Tensor],
                       plans: tuple[ConvPlan, ...]) -> dict[str, Tensor]:
        """The same with the plans: ``plans`` holds the inner blocks' then the layer blocks'.
        The upsampled top-down map is a fresh tensor no one else sees, so the lateral conv
        may write its sum over it."""
        names = list(x.keys())
        feats = [dense_in(f, torch.channels_last) for f in x.values()]
        n = len(feats)
        inner, layer = plans[:n], plans[n:]
        last_inner = inner[-1](feats[-1])
        results = [layer[-1](last_inner)]
        for idx in range(n - 2, -1, -1):
            top_down = F.interpolate(last_inner, size=feats[idx].shape[-2:], mode="nearest")
            last_inner = inner[idx](feats[idx], dense_in(top_down, torch.channels_last), True)
            results.insert(0, layer[idx](last_inner))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, list(x.values()), names)
        return OrderedDict(zip(names, results))

    @torch.jit.unused
    def _plans(self, feats: list[Tensor]) -> Optional[tuple[ConvPlan, ...]]:
        """The inner and layer blocks' plans for ``feats``, or None where torchvision's
        forward runs (see the class docstring)."""
        blocks = [*self.inner_blocks, *self.layer_blocks]
        if (recorded() or in_functorch() or not may_fuse(self) or not feats
                or len(feats) != len(self.inner_blocks) or faking()
                or not all(no_hooks(m) for m in (self.inner_blocks, self.layer_blocks))):
            return None
        pairs = []
        for block in blocks:
            if type(block) is not Conv2dNormActivation or not no_hooks(block):
                return None
            mods = list(block._modules.values())
            if len(mods) not in (1, 2):
                return None
            pairs.append((mods[0], mods[1] if len(mods) == 2 else None, False))
        weight = pairs[0][0].weight
        dtypes = (weight.dtype, autocast_dtype(weight))  # under autocast, both are cast to it
        for f, (conv, _, _) in zip(feats, pairs):
            if (f.layout != torch.strided or f.dim() != 4 or f.shape[0] == 0
                    or f.shape[1] != conv.in_channels or f.dtype not in dtypes
                    or f.device != weight.device):
                return None
        return Kept.plans_for(self, self.backend, self.winograd, pairs)


_STEM = ["conv1", "bn1", "relu", "maxpool"]


class IntermediateLayerGetter(FusedEvalMixin, _utils.IntermediateLayerGetter):
    """torchvision's ``IntermediateLayerGetter`` over a ResNet (a detection backbone's
    ``body``: the same modules, keys and outputs), its stem fused: where its first children
    are exactly ``conv1``, ``bn1`` (a BN in eval or a ``FrozenBatchNorm2d``), the exact
    ``nn.ReLU`` and ``maxpool``, none of them returned or hooked, they run as the ResNets'
    stem program (one prepared plan, the BN folded, channels_last; the maxpool in the same
    op with gradients off, else the module on channels_last, which torch pools 16x faster
    than NCHW at 512 px). The stages after it are called as modules (a resnet_fast block
    fuses itself). Anything else, a recording tool, a torch.func transform, or an input that
    is not a non-empty 4-D strided tensor runs torchvision's loop."""

    _fold_spec = (("conv1", "bn1", True),)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if torch.jit.is_scripting():
            return self._forward_plain(x)
        return self._forward_fused(x)

    def _forward_plain(self, x: Tensor) -> dict[str, Tensor]:
        """torchvision's forward."""
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out

    @torch.jit.unused
    def _forward_fused(self, x: Tensor) -> dict[str, Tensor]:
        stem = self._stem(x)
        if stem is None:
            return self._forward_plain(x)
        x = stem(x, self.maxpool)
        out = OrderedDict()
        for name, module in list(self.items())[len(_STEM):]:
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out

    @torch.jit.unused
    def _stem(self, x: Tensor):
        """The stem's program for x, or None where torchvision's loop runs it."""
        if (list(self._modules)[:len(_STEM)] != _STEM or recorded() or in_functorch()
                or not may_fuse(self) or faking() or x.layout != torch.strided
                or x.dim() != 4 or x.shape[0] == 0 or not no_hooks(self._modules["maxpool"])
                or any(name in self.return_layers for name in _STEM)):
            return None
        pairs = pairs_of(self)
        if pairs is None:
            return None
        return Kept.program_for(self, (self.backend, self.winograd, pairs, 1, None), [])


def fuse_fpn(fpn: torchvision.ops.FeaturePyramidNetwork) -> FeaturePyramidNetwork:
    """``fpn`` (exactly torchvision's ``FeaturePyramidNetwork``, e.g. a detection model's
    ``model.backbone.fpn``) made a :class:`FeaturePyramidNetwork` in place: the same object,
    modules and weights, with the fused forward (the class changes; it adds no state).
    Returns it."""
    if type(fpn) is FeaturePyramidNetwork:
        return fpn
    if type(fpn) is not torchvision.ops.FeaturePyramidNetwork:
        raise TypeError(f"fuse_fpn: expected torchvision.ops.FeaturePyramidNetwork (exactly: a "
                        f"subclass has a forward of its own), got {type(fpn).__name__}")
    fpn.__class__ = FeaturePyramidNetwork
    return fpn


def _resnet_fpn_extractor(backbone: nn.Module, trainable_layers: int,
                          returned_layers: Optional[list[int]] = None,
                          extra_blocks: Optional[ExtraFPNBlock] = None,
                          norm_layer: Optional[Callable[..., nn.Module]] = None
                          ) -> backbone_utils.BackboneWithFPN:
    """torchvision's ``_resnet_fpn_extractor`` (the same arguments, freezing and modules),
    its FPN fused (:func:`fuse_fpn`) and its body's stem too (the body's class becomes
    :class:`IntermediateLayerGetter`, as ``fuse_fpn`` changes the FPN's)."""
    model = backbone_utils._resnet_fpn_extractor(backbone, trainable_layers, returned_layers,
                                                 extra_blocks, norm_layer)
    fuse_fpn(model.fpn)
    if type(model.body) is _utils.IntermediateLayerGetter:
        model.body.__class__ = IntermediateLayerGetter
    return model


def resnet_fpn_backbone(*, backbone_name: str, weights=None,
                        norm_layer: Callable[..., nn.Module] = FrozenBatchNorm2d,
                        trainable_layers: int = 3, returned_layers: Optional[list[int]] = None,
                        extra_blocks: Optional[ExtraFPNBlock] = None
                        ) -> backbone_utils.BackboneWithFPN:
    """torchvision's ``resnet_fpn_backbone`` on resnet_fast's ResNet ``backbone_name`` (any
    ``resnet_fast.get_model`` name, ``weights`` as its builder takes them), the FPN fused."""
    from . import get_model

    backbone = get_model(backbone_name, weights=weights, norm_layer=norm_layer)
    return _resnet_fpn_extractor(backbone, trainable_layers, returned_layers, extra_blocks)
