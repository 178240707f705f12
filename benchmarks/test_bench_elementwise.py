"""Elementwise ops at the ResNet-50 block-output shapes: ours vs eager PyTorch.

add_relu vs `torch.relu(x + r)`; scale_shift_act with residual vs eager
`BatchNorm2d(eval) -> add -> relu`. Bytes counted: x and r read, out written (the useful
traffic, the same for both). Memory format channels_last, as ResNets run fastest.
"""

import statistics

import pytest
import torch
from conftest import batch_sizes, devices_and_backends, timed

from resnet_fast.bench.timing import flat, round_ratio, synchronized
from resnet_fast.ops import add_relu, scale_shift_act

# (channels, spatial) of the ResNet-50 stage outputs, where every block joins its residual.
STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


def _cases():
    for device, backend in devices_and_backends():
        dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
        for dtype in dtypes:
            for n in batch_sizes(device):
                for c, hw in STAGES:
                    yield pytest.param(device, backend, dtype, (n, c, hw, hw),
                                       id=f"{device}-{backend}-{str(dtype)[6:]}-{n}x{c}x{hw}x{hw}")


def _inputs(device, dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    r = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    return x, r


def _run(benchmark, record, op, device, backend, dtype, shape, ours, eager):
    dev = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    nbytes = 3 * numel * torch.empty((), dtype=dtype).element_size()
    small = nbytes < 64 << 20
    # --benchmark-disable (make test's smoke run): one call each, so the suite cannot rot.
    repeats = 1 if benchmark.disabled else (30 if small else 10)
    inner = 20 if (device == "cuda" and small) else 1
    with torch.inference_mode():
        times = timed(benchmark, {"ours": ours, "eager": eager}, dev, repeats, inner)
        benchmark.pedantic(synchronized(ours, dev), rounds=repeats, warmup_rounds=1)
    ours_s, eager_s = (statistics.median(flat(times[k])) for k in ("ours", "eager"))
    row = dict(op=op, device=device, backend=backend, dtype=str(dtype)[6:], shape=list(shape),
               ours_gbps=nbytes / ours_s / 1e9, eager_gbps=nbytes / eager_s / 1e9,
               ours_ms=1e3 * ours_s, eager_ms=1e3 * eager_s,
               ratio=round_ratio(times["eager"], times["ours"]), repeats=repeats)
    benchmark.extra_info.update(row)
    record(row)


@pytest.mark.parametrize("device, backend, dtype, shape", list(_cases()))
def test_add_relu(benchmark, record, device, backend, dtype, shape):
    x, r = _inputs(device, dtype, shape)
    _run(benchmark, record, "add_relu", device, backend, dtype, shape,
         ours=lambda: add_relu(x, r, backend=backend), eager=lambda: torch.relu(x + r))


@pytest.mark.parametrize("device, backend, dtype, shape", list(_cases()))
def test_bn_add_relu(benchmark, record, device, backend, dtype, shape):
    x, r = _inputs(device, dtype, shape)
    c = shape[1]
    bn = torch.nn.BatchNorm2d(c).to(device, dtype).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    inv = torch.rsqrt(bn.running_var.float() + bn.eps)
    scale = (bn.weight.float() * inv).detach()
    shift = (bn.bias.float() - bn.running_mean.float() * bn.weight.float() * inv).detach()
    _run(benchmark, record, "scale_shift_act(+res,relu)", device, backend, dtype, shape,
         ours=lambda: scale_shift_act(x, scale, shift, r, True, backend=backend),
         eager=lambda: torch.relu(bn(x) + r))
