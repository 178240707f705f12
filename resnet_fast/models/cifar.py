"""CIFAR-style ResNets of He et al. 2016 (arXiv:1512.03385, section 4.2): a 3x3 16-channel
stem, three stages of BasicBlocks with 16/32/64 channels at 32x32/16x16/8x8, n blocks per
stage for depth 6n+2, and the paper's parameter-free "option A" shortcut (stride-2
subsampling plus zero channel padding), which gives the paper's parameter counts
(resnet20 0.27M, resnet56 0.85M, resnet110 1.7M)."""

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import BasicBlock, _Backbone, _linear_schedule, conv3x3, zero_init_last_bn


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th pixel, zero-pad the new channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"PadShortcut: expected out_planes >= in_planes, got "
                             f"{out_planes} < {in_planes}")
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels={self.extra}"


class CifarResNet(_Backbone):
    """ResNet-(6n+2) for 32x32 inputs.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110, ...).
        num_classes, in_channels, zero_init_residual, norm_layer, drop_path_rate,
        return_features, backend: as in :class:`resnet_fast.models.ResNet`.
    """

    def __init__(self, depth: int, num_classes: int = 10, zero_init_residual: bool = False,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, in_channels: int = 3,
                 drop_path_rate: float = 0.0, return_features: bool = False,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet: expected depth = 6n+2 with n >= 1 (20, 32, 44, 56, "
                             f"110, ...), got {depth}")
        self._init_common(num_classes, in_channels, drop_path_rate, return_features, backend)
        norm_layer = norm_layer or nn.BatchNorm2d
        n = (depth - 2) // 6
        rates = _linear_schedule(drop_path_rate, 3 * n)
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                shortcut = (PadShortcut(self.inplanes, planes, s)
                            if s != 1 or self.inplanes != planes else None)
                blocks.append(BasicBlock(self.inplanes, planes, s, shortcut, norm_layer=norm_layer,
                                         drop_path_rate=rates.pop(0), backend=backend))
                self.inplanes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            zero_init_last_bn(self)

    def _stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]

    def _forward_plain_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return x
