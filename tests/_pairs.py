"""A resnet_fast model and its torchvision twin on the same calibrated weights, and the
comparison the model tests share."""

import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fast
from resnet_fast.calibrate import calibrate_


def model_pair(arch="resnet18", size=32, seed=0):
    """(resnet_fast model, torchvision model) with the same calibrated weights, eval mode."""
    torch.manual_seed(seed)
    tv = calibrate_(getattr(torchvision.models, arch)(), batch_size=4, image_size=size, seed=seed)
    return resnet_fast.convert(tv).eval(), tv


def frozen_pair(arch="resnet50", seed=0):
    """(ours, torchvision's) with FrozenBatchNorm2d and the same weights, frozen BN statistics
    drawn away from the identity so the fold matters."""
    torch.manual_seed(seed)
    tv = getattr(torchvision.models, arch)(norm_layer=FrozenBatchNorm2d)
    for m in tv.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    for m in tv.modules():  # keep activations O(1) through 50 layers
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data.mul_(0.5)
    ours = getattr(resnet_fast, arch)(norm_layer=FrozenBatchNorm2d)
    ours.load_state_dict(tv.state_dict())
    return ours.eval(), tv.eval()


def assert_close_logits(ours, expected, rel=1e-4):
    """Max abs error at most ``rel`` of the expected output's largest magnitude."""
    err = (ours - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} at logit scale {scale:.3g}"
