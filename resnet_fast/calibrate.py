"""Calibrated weights for benchmarks and deployment checks: a random-init eval ResNet has BN
running stats of mean 0 / var 1, its activations blow up or vanish, and on x86 the denormals
alone make eager ResNet-50 ~60x slower. Re-estimating the running stats on a few seeded
batches gives logits of a sane scale, as trained weights would. :func:`reference_model` is
the torchvision model both start from."""

from __future__ import annotations

from typing import Optional

import torch
import torchvision
from torch import nn

from .models.weights import load_checkpoint, load_into


@torch.no_grad()
def calibrate_(model: nn.Module, *, batches: int = 2, batch_size: int = 8, image_size: int = 224,
               in_channels: int = 3, seed: int = 0) -> nn.Module:
    """Re-estimate every BatchNorm's running stats in place on seeded random images (cumulative
    average: ``momentum=None``), then return the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.train()
    for _ in range(batches):
        x = torch.randn(batch_size, in_channels, image_size, image_size, generator=gen)
        model(x.to(device))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    return model.eval()


def reference_model(arch: str, checkpoint: Optional[str] = None,
                    num_classes: Optional[int] = None) -> nn.Module:
    """The seeded torchvision ``arch`` in eval mode that benchmarks and deployment checks start
    from: the weights of ``checkpoint`` (read by ``load_checkpoint``), else calibrated random
    weights. The class count is the checkpoint's (its ``fc.weight`` rows), else ``num_classes``,
    else 1000; a ``num_classes`` the checkpoint contradicts is a ValueError."""
    state = load_checkpoint(checkpoint) if checkpoint else None
    fc = state.get("fc.weight") if state is not None else None
    if fc is not None and num_classes is not None and fc.shape[0] != num_classes:
        raise ValueError(f"expected num_classes to match the checkpoint's fc.weight "
                         f"({fc.shape[0]} classes), got {num_classes}")
    classes = fc.shape[0] if fc is not None else (num_classes or 1000)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=classes)
    if state is None:
        return calibrate_(model)
    load_into(model, state, f"{arch}: the weights of {checkpoint}")
    return model.eval()
