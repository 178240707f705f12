"""The distinct convolutions of a ResNet as it runs: the shape list the conv tests and the
Triton conv tuner (``benchmarks/tune_triton_conv.py``) share."""

from __future__ import annotations

import torch

from ..models import create_model


def distinct_convs(arch: str, size: int = 32) -> list[tuple[int, ...]]:
    """(C_in, C_out, kernel, stride, padding, dilation, groups, H) of every conv as it runs
    in ``arch`` on a batch of size x size images, in forward order, without duplicates."""
    # Train mode: the eval path fuses convs into conv_bias_act calls, which hooks do not see.
    model = create_model(arch).train()
    seen = {}

    def hook(mod, inputs, _out):
        key = (mod.in_channels, mod.out_channels, mod.kernel_size[0], mod.stride[0],
               mod.padding[0], mod.dilation[0], mod.groups, inputs[0].shape[2])
        seen[key] = None

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    for h in handles:
        h.remove()
    return list(seen)
