"""Host overhead per fused conv: what a ResNet-50 eval forward costs beyond its kernels.

At a tiny input (batch 1, 32x32) the kernels do little work, so what separates a model's
forward from the same kernels called back to back from a flat list is the per-layer Python
and C++ bookkeeping. Four candidates, interleaved per repeat on the same calibrated weights:

  torchvision         torchvision's resnet50 eval forward (161 modules)
  torchvision_direct  the same aten calls (conv2d, batch_norm, relu, add) from a flat list
  resnet_fast         the drop-in model's forward (53 fused convs from its per-layer plans)
  resnet_fast_direct  the same plan kernels from a flat list

Overhead per conv = (model - direct) / 53. ``python -m resnet_fast.bench.overhead --help``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys

import torch
import torch.nn.functional as F
import torchvision

from .. import convert
from ..models.resnet import Bottleneck
from .calibrate import calibrate_
from .env import environment
from .timing import interleaved, quantile

N_CONVS = 53


def _torchvision_direct(tv: torchvision.models.ResNet):
    """The aten calls of torchvision's eval forward, as one flat function."""
    def cbn(x, conv, bn):
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                     conv.groups)
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                            bn.eps)

    def run(x):
        x = F.max_pool2d(torch.relu(cbn(x, tv.conv1, tv.bn1)), 3, 2, 1)
        for stage in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            for b in stage:
                out = torch.relu(cbn(x, b.conv1, b.bn1))
                out = torch.relu(cbn(out, b.conv2, b.bn2))
                out = cbn(out, b.conv3, b.bn3)
                idt = x if b.downsample is None else cbn(x, b.downsample[0], b.downsample[1])
                x = torch.relu(out + idt)
        return tv.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
    return run


def _plans_direct(model):
    """The plan kernels of our eval forward (built by one forward before), as one flat
    function: what the model's forward runs with none of its per-block work."""
    stem = model._fused_plans()[0]
    blocks = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for b in stage:
            assert isinstance(b, Bottleneck)
            blocks.append(b._fused_plans())

    def run(x):
        x = F.max_pool2d(stem(x.contiguous(memory_format=torch.channels_last)), 3, 2, 1)
        for plans in blocks:
            c1, c2, c3, *ds = plans
            x = c3(c2(c1(x)), ds[0](x) if ds else x)
        return model.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
    return run


def measure(image_size: int = 32, batch: int = 1, repeats: int = 30, inner: int = 5) -> dict:
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet50(), batch_size=8, image_size=image_size)
    ours = convert(tv).eval()
    x = torch.randn(batch, 3, image_size, image_size)
    with torch.no_grad():
        ours(x)  # builds the plans
        candidates = {"torchvision": lambda: tv(x), "torchvision_direct": _torchvision_direct(tv),
                      "resnet_fast": lambda: ours(x), "resnet_fast_direct": _plans_direct(ours)}
        candidates = {k: (v if k in ("torchvision", "resnet_fast") else (lambda f=v: f(x)))
                      for k, v in candidates.items()}
        ref = tv(x)
        for name, fn in candidates.items():
            err = (fn() - ref).abs().max().item()
            if err > 1e-3 * ref.abs().max().item():
                raise RuntimeError(f"{name} differs from torchvision by {err:.3g}")
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            times = interleaved(candidates, torch.device("cpu"), repeats, warmup=3, inner=inner)
        finally:
            gc.enable()
            gc.unfreeze()
    result = {name: {"median_us": statistics.median(t) * 1e6, "p10_us": quantile(t, 0.1) * 1e6,
                     "p90_us": quantile(t, 0.9) * 1e6} for name, t in times.items()}
    for model, direct in (("torchvision", "torchvision_direct"), ("resnet_fast", "resnet_fast_direct")):
        per_repeat = [(m - d) * 1e6 / N_CONVS for m, d in zip(times[model], times[direct])]
        result[model]["overhead_us_per_conv"] = statistics.median(per_repeat)
    return {"benchmark": "host_overhead", "arch": "resnet50", "batch": batch,
            "image_size": image_size, "repeats": repeats, "inner": inner,
            "threads": torch.get_num_threads(), "env": environment(torch.device("cpu")),
            "results": result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_fast.bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--inner", type=int, default=5, help="forwards per timed sample")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    for name in ("image_size", "batch", "repeats", "inner"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_flush_denormal(True)  # denormals would time the FPU, not the host
    try:
        out = measure(args.image_size, args.batch, args.repeats, args.inner)
    finally:
        torch.set_flush_denormal(False)
    print(f"ResNet-50 eval, batch {args.batch}, {args.image_size}x{args.image_size}, CPU, "
          f"{out['threads']} threads (median of {args.repeats} interleaved repeats)")
    for name, r in out["results"].items():
        extra = (f"   overhead {r['overhead_us_per_conv']:6.1f} us/conv"
                 if "overhead_us_per_conv" in r else "")
        print(f"  {name:<20}{r['median_us']:10.0f} us  (p10 {r['p10_us']:.0f}, p90 "
              f"{r['p90_us']:.0f}){extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
