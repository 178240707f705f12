"""A resnet_fast model and its torchvision twin on the same calibrated weights, and the
comparison the model tests share."""

import torch
import torchvision

import resnet_fast
from resnet_fast.calibrate import calibrate_


def model_pair(arch="resnet18", size=32, seed=0):
    """(resnet_fast model, torchvision model) with the same calibrated weights, eval mode."""
    torch.manual_seed(seed)
    tv = calibrate_(getattr(torchvision.models, arch)(), batch_size=4, image_size=size, seed=seed)
    return resnet_fast.convert(tv).eval(), tv


def assert_close_logits(ours, expected, rel=1e-4):
    """Max abs error at most ``rel`` of the expected output's largest magnitude."""
    err = (ours - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} at logit scale {scale:.3g}"
