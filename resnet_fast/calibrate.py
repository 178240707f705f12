"""Calibrated weights for benchmarks and deployment checks: a random-init eval ResNet has BN
running stats of mean 0 / var 1, its activations blow up or vanish, and on x86 the denormals
alone make eager ResNet-50 ~60x slower. Re-estimating the running stats on a few seeded
batches gives logits of a sane scale, as trained weights would."""

from __future__ import annotations

import torch
from torch import nn


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
