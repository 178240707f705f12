"""Training BatchNorm + add + ReLU, forward and backward, at the ResNet-50 block-output shapes:
``batch_norm_act`` vs eager ``BatchNorm2d(train) -> add -> relu`` and its autograd backward.

One timed call = forward + backward (grad of the output given), the way a training step runs it.
Bytes counted (the useful traffic, the same for both): forward x, r read and out written;
backward grad read, dx and d residual written.
"""

import statistics

import pytest
import torch
from conftest import batch_sizes, devices_and_backends, timed

from resnet_fast.bench.timing import flat, round_ratio, synchronized
from resnet_fast.ops import batch_norm_act

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


def _cases():
    for device, backend in devices_and_backends():
        dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16]
        for dtype in dtypes:
            for n in batch_sizes(device):
                for c, hw in STAGES:
                    yield pytest.param(device, backend, dtype, (n, c, hw, hw),
                                       id=f"{device}-{backend}-{str(dtype)[6:]}-{n}x{c}x{hw}x{hw}")


@pytest.mark.parametrize("device, backend, dtype, shape", list(_cases()))
def test_bn_add_relu_train(benchmark, record, device, backend, dtype, shape):
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    make = lambda: (torch.randn(shape, generator=g).to(device, dtype)  # noqa: E731
                    .contiguous(memory_format=torch.channels_last).requires_grad_())
    x, r = make(), make()
    grad = torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    c = shape[1]
    bn_eager = torch.nn.BatchNorm2d(c).to(dev).train()
    bn_ours = torch.nn.BatchNorm2d(c).to(dev).train()

    def eager():
        torch.relu(bn_eager(x) + r).backward(grad)

    def ours():
        batch_norm_act(x, bn_ours.weight, bn_ours.bias, bn_ours.running_mean, bn_ours.running_var,
                       True, 0.1, 1e-5, r, True, bn_ours.num_batches_tracked,
                       backend=backend).backward(grad)

    numel = x.numel()
    nbytes = 6 * numel * x.element_size()
    small = nbytes < 128 << 20
    repeats = 1 if benchmark.disabled else (20 if small else 8)
    if device == "cuda" and dtype != torch.float32:
        eager_fn, ours_fn = eager, ours

        def eager():  # noqa: F811 (bf16 activations, fp32 BN parameters: as under autocast)
            with torch.autocast("cuda", dtype):
                eager_fn()

        def ours():  # noqa: F811
            with torch.autocast("cuda", dtype):
                ours_fn()
    times = timed(benchmark, {"ours": ours, "eager": eager}, dev, repeats)
    benchmark.pedantic(synchronized(ours, dev), rounds=repeats, warmup_rounds=1)
    ours_s, eager_s = (statistics.median(flat(times[k])) for k in ("ours", "eager"))
    row = dict(op="bn_act train fwd+bwd", device=device, backend=backend, dtype=str(dtype)[6:],
               shape=list(shape), ours_gbps=nbytes / ours_s / 1e9, eager_gbps=nbytes / eager_s / 1e9,
               ours_ms=1e3 * ours_s, eager_ms=1e3 * eager_s,
               ratio=round_ratio(times["eager"], times["ours"]), repeats=repeats)
    benchmark.extra_info.update(row)
    record(row)
