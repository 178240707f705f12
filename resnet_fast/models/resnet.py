"""The ResNet family, module for module and key for key torchvision's
(torchvision/models/resnet.py), so torchvision checkpoints load with strict=True.

What differs from torchvision is inside ``forward`` only: in eval mode every conv -> BN
(-> add) -> ReLU runs as one fused conv from per-layer plans (``_fused.py``), run as one
program per ResNet, or per block called on its own (``program.py``);
a conv -> FrozenBatchNorm2d (detection backbones) fuses the same way in training too. In
training every BN -> (add ->) ReLU is one fused ``batch_norm_act``. Both compute what
torchvision computes. Where they could not (hooks, another norm layer, parametrized convs,
torch.func transforms) and where a tool records the model (``torch.jit.script``, ``torch.jit.trace``,
``torch.fx.symbolic_trace`` and so torchvision's feature extraction), the model runs
torchvision's own module-by-module code: the recorded graph is torchvision's, with its node
names, and needs nothing of resnet_fast to run. torch.compile records the fused path;
torch.export records torchvision's too (its parameters are fake tensors, which the fused path
does not take). Extras for course-style use (all off by default, none of them adds a parameter
or buffer): ``in_channels`` (1 = grayscale 3x3 stem, no maxpool), ``drop_path_rate``,
``drop_block_prob``/``drop_block_size``, ``return_features``.
"""

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..backends import requested_backend
from ..kernels.layout import dense_in, layout_of
from ._fused import (
    exact_relu,
    in_functorch,
    no_global_hooks,
    no_hooks,
    recorded,
    winograd_trainable,
)
from .norm import bn_act, fusable_bn
from .program import FusedEvalMixin, Kept, Program, fusable_mode, may_fuse, pairs_of
from .regularizers import DropBlock2d, DropPath


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _Block(FusedEvalMixin, nn.Module):
    """What BasicBlock and Bottleneck share: regularizers on the residual branch, the
    residual join, and the fused eval path. ``drop_block``/``drop_path`` are None (not
    Identity) when off, so the module tree of a default model is exactly torchvision's."""

    backend: Optional[str]

    def _init_extras(self, drop_path_rate: float, drop_block: Optional[DropBlock2d],
                     backend: Optional[str]) -> None:
        self.drop_block = drop_block
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else None
        self.backend = backend

    def _regularize(self, out: Tensor) -> Tensor:
        """DropBlock, then DropPath, on the residual branch (before the join)."""
        if self.drop_block is not None:
            out = self.drop_block(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out

    def _residual(self, out: Tensor, identity: Tensor) -> Tensor:
        """torchvision's join, after the regularizers: relu(out + identity)."""
        out = self._regularize(out)
        out += identity
        return self.relu(out)

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._forward_plain(x)
        return self._forward_eager(x)

    def _forward_plain(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Tensor:
        """Fused where it computes what torchvision computes and no tool records the model;
        torchvision's code otherwise (and for an mkldnn or sparse x, which torchvision's own
        code takes or refuses). A block called on its own runs channels_last inside and
        returns channels_last, as a torch conv with a channels_last weight does: an NCHW x is
        converted once, and the next block (or the FPN) then gets channels_last, which oneDNN
        and our kernels are fast at (docs/design.md measures the FPN extractor).
        Converting back to NCHW would cost more than fusing saves. A whole model converts
        its input once and returns logits."""
        if not recorded() and x.layout == torch.strided:
            # (a layout query raises inside vmap: the torch.func check comes first)
            program = (self._fused_program() if not in_functorch() and x.dim() == 4
                       else None)
            if program is not None:
                return program(dense_in(x, torch.channels_last))
            if self._fused_train():
                return self._forward_train(x)
        return self._forward_plain(x)

    def _forward_train(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _fused_program(self) -> Optional[Program]:
        """This block alone as a program (:mod:`.program`); None where it must run as modules
        (training, hooks on a module the fused forward skips, a pair that does not fold)."""
        if not may_fuse(self):
            return None
        pairs = pairs_of(self)
        if pairs is None:
            return None
        return Kept.program_for(self, None, [_block_group(self, pairs)])

    def _train_convs(self, x: Tensor) -> list[Callable[[Tensor], Tensor]]:
        """What the fused training forward calls for each of ``_fold_spec``'s convs: a
        stride-1 3x3 that our Winograd may run (:func:`winograd_trainable`) as a prepared plan
        without a BN (:meth:`.program.Kept.plans_for`; its forward, input gradient and weight
        gradient each our Winograd or oneDNN's, whichever measured faster for the layer,
        through ``_PlannedConv``; rebuilt after every optimizer step), every other conv as its
        module."""
        convs = [self._modules[c] for c, _, _ in self._fold_spec]
        mine = [c for c in convs if winograd_trainable(c, x)]
        plans = mine and Kept.plans_for(self, self.backend, self.winograd,
                                        [(c, None, False) for c in mine])
        if not plans:
            return convs
        planned = dict(zip(map(id, mine), plans))
        return [planned.get(id(c), c) for c in convs]

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(conv, bn) of the block's own pairs, as ``_fold_spec`` names them."""
        return [(getattr(self, c), getattr(self, b)) for c, b, _ in self._fold_spec]

    def _fused_train(self) -> bool:
        """Training with plain ``nn.BatchNorm2d`` everywhere and the exact ``nn.ReLU``, none
        with hooks: every BN -> (add ->) ReLU is one fused batch_norm_act (another norm layer
        or activation keeps torchvision's unfused math)."""
        return (fused_train_ok(self) and all(fusable_bn(bn) for _, bn in self._pairs()))

    def _tail_train(self, out: Tensor, bn: nn.BatchNorm2d, identity: Tensor) -> Tensor:
        """relu(bn(out) + identity) in training. With DropBlock/DropPath on, they act on the
        residual branch (bn's output) before the join, which is then one fused add_relu."""
        if self.drop_block is None and self.drop_path is None:
            return bn_act(bn, out, residual=identity, backend=self.backend)
        out = self._regularize(bn_act(bn, out, relu=False, backend=self.backend))
        return ops.add_relu(out, identity, backend=self.backend)

    def _identity(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


class BasicBlock(_Block):
    expansion: int = 1
    _fold_spec = (("conv1", "bn1", True), ("conv2", "bn2", True))

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 *, drop_path_rate: float = 0.0, drop_block: Optional[DropBlock2d] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock only supports groups=1 and base_width=64, got "
                             f"groups={groups}, base_width={base_width}")
        if dilation > 1:
            raise NotImplementedError(f"dilation > 1 is not supported in BasicBlock (as in "
                                      f"torchvision), got dilation={dilation}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_extras(drop_path_rate, drop_block, backend)

    def _forward_plain(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        return self._residual(out, self._identity(x))

    def _forward_train(self, x: Tensor) -> Tensor:
        conv1, conv2 = self._train_convs(x)
        out = bn_act(self.bn1, conv1(x), backend=self.backend)
        return self._tail_train(conv2(out), self.bn2, self._identity(x))


class Bottleneck(_Block):
    # The stride for downsampling is on the 3x3 conv (conv2), as in torchvision ("ResNet V1.5").
    expansion: int = 4
    _fold_spec = (("conv1", "bn1", True), ("conv2", "bn2", True), ("conv3", "bn3", True))

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 *, drop_path_rate: float = 0.0, drop_block: Optional[DropBlock2d] = None,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_extras(drop_path_rate, drop_block, backend)

    def _forward_plain(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        return self._residual(out, self._identity(x))

    def _forward_train(self, x: Tensor) -> Tensor:
        conv1, conv2, conv3 = self._train_convs(x)
        out = bn_act(self.bn1, conv1(x), backend=self.backend)
        out = bn_act(self.bn2, conv2(out), backend=self.backend)
        return self._tail_train(conv3(out), self.bn3, self._identity(x))


def fused_train_ok(m: nn.Module) -> bool:
    """Training, outside torch.func transforms and forward-mode AD, without global module
    hooks, with ``m.relu`` exactly ``nn.ReLU``: where bn_act may stand for m's BN and ReLU."""
    return (m.training and not in_functorch() and no_global_hooks()
            and exact_relu(m._modules.get("relu")))


class _Backbone(FusedEvalMixin, nn.Module):
    """What the ImageNet and CIFAR ResNets share: input check, stem, head and forward.
    Subclasses define ``_stages`` and ``_forward_plain_features`` and set ``in_channels``,
    ``return_features``, ``backend``."""

    in_channels: int
    return_features: bool
    backend: Optional[str]

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self._get_name()}: expected a 4-D (N, {self.in_channels}, H, W) "
                             f"input, got shape {list(x.shape)}")

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, (maxpool,) and the stages: (N, in_channels, H, W) -> (N, C, h, w)."""
        if torch.jit.is_scripting():
            return self._forward_plain_features(x)
        return self._features(x)

    def _forward_plain_features(self, x: Tensor) -> Tensor:
        """torchvision's code, module by module."""
        raise NotImplementedError

    def _stages(self) -> list[nn.Module]:
        raise NotImplementedError

    _fold_spec = (("conv1", "bn1", True),)

    def _fused_train(self) -> bool:
        """Training with the stem's BN a plain ``nn.BatchNorm2d`` and its ReLU the exact
        ``nn.ReLU``, none with hooks: the stem's BN -> ReLU is one fused batch_norm_act."""
        return fused_train_ok(self) and fusable_bn(self.bn1)

    def _stem_group(self):
        """The stem's group for :meth:`.program.Kept.program_for`; None where it must run as
        modules (a torch.func transform, global hooks, a ReLU that is not exactly nn.ReLU)."""
        if not may_fuse(self):
            return None
        stem = pairs_of(self)
        return None if stem is None else (self.backend, self.winograd, stem, 1, None)

    def _fused_program(self, stages: list[nn.Module]) -> Optional[Program]:
        """The whole fused eval forward as one program (the stem's plan, then every block),
        checked once per forward instead of once per block; None where any module must run as
        a module (training, hooks, a block of another class, a pair that is not foldable),
        and the forward goes block by block."""
        stem = self._stem_group()
        if stem is None:
            return None
        blocks = []
        for stage in stages:
            if type(stage) is not nn.Sequential or not no_hooks(stage):
                return None
            for block in stage._modules.values():
                if (type(block) not in _BLOCKS or not no_hooks(block)
                        or not fusable_mode(block)):
                    return None
                pairs = pairs_of(block)
                if pairs is None:
                    return None
                blocks.append(_block_group(block, pairs))
        return Kept.program_for(self, stem, blocks)

    def _stem_program(self) -> Optional[Program]:
        """The stem alone as a program, for a forward that calls the blocks as modules."""
        stem = self._stem_group()
        return None if stem is None else Kept.program_for(self, stem, [])

    @torch.jit.unused
    def _features(self, x: Tensor, keep_layout: bool = True) -> Tensor:
        """The eager forward_features. The fused eval path and the fused training forward run
        channels_last inside (what oneDNN, cuDNN and our Triton kernel are fast at; measured on
        CPU: NCHW activations made the fused model slower than eager, and a training step with
        NCHW batches ran at eager's speed) and hand the features back in the input's layout,
        or in channels_last without ``keep_layout`` (forward pools them as they are:
        a layout copy of the last features would be wasted). Recorded by a tracer, or x mkldnn or
        sparse: torchvision's code (which takes an mkldnn x and refuses a sparse one)."""
        if recorded():
            return self._forward_plain_features(x)
        self._check_input(x)
        if x.layout != torch.strided:
            return self._forward_plain_features(x)
        fmt = layout_of(x) if keep_layout else torch.channels_last
        stages = self._stages()
        maxpool = getattr(self, "maxpool", None)
        program = self._fused_program(stages)
        if program is not None:
            return program(x, maxpool).contiguous(memory_format=fmt)
        stem = self._stem_program()
        train = stem is None and self._fused_train()
        if stem is not None:
            x = stem(x)
        elif train:  # relu(bn1(conv1(x))): the conv, then one fused batch_norm_act
            x = bn_act(self.bn1, self.conv1(dense_in(x, torch.channels_last)),
                       backend=self.backend)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        if maxpool is not None:
            x = maxpool(x)
        for stage in stages:
            x = stage(x)
        return x if stem is None and not train else x.contiguous(memory_format=fmt)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool and fc: (N, C, h, w) -> (N, num_classes), or the pooled (N, C)
        features with ``pre_logits=True``."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self._logits(x)

    def _logits(self, x: Tensor) -> Tensor:
        """self.fc(x): the module itself when scripted, else ``_fc``."""
        if torch.jit.is_scripting():
            return self.fc(x)
        return self._fc(x)

    @torch.jit.unused
    def _fc(self, x: Tensor) -> Tensor:
        """self.fc(x); with gradients off on CPU, an exact ``nn.Linear`` runs as a kept plan
        (our 1x1 GEMM or oneDNN's conv over (N, C, 1, 1), whichever measures faster; torch's
        addmm took 0.47 ms for ResNet-50's fc at batch 1, the GEMM 0.21: Kept.head_for)."""
        plan = (None if recorded() or x.layout != torch.strided or x.dim() != 2
                or not x.is_contiguous() else Kept.head_for(self, self.fc, x))
        if plan is None:
            return self.fc(x)
        n, c = x.shape
        return plan(x.view(n, c, 1, 1)).flatten(1)

    def forward(self, x: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        if torch.jit.is_scripting():
            x = self._forward_plain_features(x)
        else:
            x = self._features(x, keep_layout=False)
        features = self.forward_head(x, pre_logits=True)
        logits = self._logits(features)
        if self.return_features:
            return logits, features
        return logits

    def _init_common(self, num_classes: int, in_channels: int, drop_path_rate: float,
                     return_features: bool, backend: Optional[str]) -> None:
        name = self._get_name()
        if num_classes < 1:
            raise ValueError(f"{name}: expected num_classes >= 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"{name}: expected in_channels >= 1, got {in_channels}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"{name}: expected drop_path_rate in [0, 1), got {drop_path_rate}")
        if backend is not None:
            requested_backend(backend)
        self.in_channels = in_channels
        self.return_features = return_features
        self.backend = backend


class ResNet(_Backbone):
    """torchvision's ResNet (same arguments, same modules) plus the extras in the module
    docstring.

    Args (beyond torchvision's ``block, layers, num_classes, zero_init_residual, groups,
    width_per_group, replace_stride_with_dilation, norm_layer``):
        in_channels: input channels. 3 keeps torchvision's 7x7/2 stem and maxpool; 1 means a
            grayscale small-image stem: 3x3 stride-1 conv1 and no maxpool. Other values keep
            the 7x7 stem with that many input channels.
        drop_path_rate: stochastic depth, linearly from 0 at the first block to this at the
            last, on the residual branch only.
        drop_block_prob, drop_block_size: DropBlock on the residual branch of every block in
            stages 3 and 4.
        return_features: forward returns ``(logits, features)``, features being the pooled
            (N, C) embedding that feeds ``fc``.
        backend: kernel backend for the fused eval path (see ``resnet_fast.available_backends``);
            None means $RESNET_FAST_BACKEND, else auto.
    """

    def __init__(
        self,
        block: type[Union[BasicBlock, Bottleneck]],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[list[bool]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        in_channels: int = 3,
        drop_path_rate: float = 0.0,
        drop_block_prob: float = 0.0,
        drop_block_size: int = 7,
        return_features: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        if len(layers) != 4:
            raise ValueError(f"ResNet: expected 4 stage depths in layers, got {layers}")
        self._init_common(num_classes, in_channels, drop_path_rate, return_features, backend)

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None "
                             f"or a 3-element tuple, got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self._drop_path_rates = _linear_schedule(drop_path_rate, sum(layers))
        self._drop_block = (drop_block_prob, drop_block_size)
        if drop_block_prob:
            DropBlock2d(drop_block_prob, drop_block_size)  # validate the arguments once

        if in_channels == 1:
            self.conv1 = nn.Conv2d(1, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3,
                                   bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if in_channels == 1
                        else nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1], drop_block=True)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2], drop_block=True)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-init the last BN of each residual branch so every block starts as an identity
        # (Goyal et al. 2017, https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            zero_init_last_bn(self)

    def _make_layer(self, block: type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int,
                    stride: int = 1, dilate: bool = False, drop_block: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )

        layers = []
        for i in range(blocks):
            extras = dict(drop_path_rate=self._drop_path_rates.pop(0), backend=self.backend,
                          drop_block=self._make_drop_block() if drop_block else None)
            if i == 0:
                layers.append(block(self.inplanes, planes, stride, downsample, self.groups,
                                    self.base_width, previous_dilation, norm_layer, **extras))
                self.inplanes = planes * block.expansion
            else:
                layers.append(block(self.inplanes, planes, groups=self.groups,
                                    base_width=self.base_width, dilation=self.dilation,
                                    norm_layer=norm_layer, **extras))
        return nn.Sequential(*layers)

    def _make_drop_block(self) -> Optional[DropBlock2d]:
        p, size = self._drop_block
        return DropBlock2d(p, size) if p > 0 else None

    def _stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _forward_plain_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x


_BLOCKS = (BasicBlock, Bottleneck)


def _block_group(block: _Block, pairs: list):
    """A block's group for :meth:`.program.Kept.program_for`: its backend and Winograd setting,
    pairs, own pair count and its downsample module where that is not a fused pair (None for
    the identity)."""
    ds = block.downsample
    return (block.backend, block.winograd, pairs, len(block._fold_spec),
            None if type(ds) is nn.Sequential else ds)


def zero_init_last_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, Bottleneck) and m.bn3.weight is not None:
            nn.init.constant_(m.bn3.weight, 0)
        elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
            nn.init.constant_(m.bn2.weight, 0)


def _linear_schedule(rate: float, n: int) -> list[float]:
    """Per-block stochastic-depth rates: 0 at the first block, ``rate`` at the last."""
    if n <= 1:
        return [rate] * n
    return [rate * i / (n - 1) for i in range(n)]
