"""Host overhead per fused conv: what a ResNet-50 eval forward costs beyond its kernels.

At a tiny input (batch 1, 32x32) the kernels do little work, so what separates a model's
forward from the same kernels called back to back from a flat list is the per-layer Python
and C++ bookkeeping. Four candidates, timed in rotated warm blocks (``bench.timing``) on the
same calibrated weights:

  torchvision         torchvision's resnet50 eval forward (161 modules)
  torchvision_direct  the same aten calls (conv2d, batch_norm, relu, add) from a flat list
  resnet_fast         the drop-in model's forward (53 fused convs from its fused program)
  resnet_fast_direct  the same plan kernels from a flat list

Two measurements:

  with kernels    the real forward; overhead per conv = (model - direct) / 53, median over
                  rounds of the rounds' medians. ResNet-50 reads ~100 MB of weights per
                  forward even at 32x32, so the kernels take ~10 ms and their run-to-run
                  noise (~1 ms) is as large as the overhead measured: read it next to the
                  host-only one.
  host only       every conv, BN and ReLU call answers with the output it recorded in one
                  real forward (ours: each plan's kernel; torchvision: F.conv2d, F.batch_norm,
                  F.relu), so what is timed is the host work around the kernels and nothing
                  of the kernels' own noise; host per conv = forward / 53 (pooling and fc,
                  the same in all four, still run), overhead = (model - direct) / 53.

``python -m resnet_fast.bench.overhead --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision

from .. import autotune, convert
from ..calibrate import calibrate_
from ..models._fused import ConvPlan
from .env import environment
from .timing import Blocks, flat, quantile, warm_blocks

N_CONVS = 53
BLOCK = 5  # timed samples per candidate and round


def _torchvision_direct(tv: torchvision.models.ResNet):
    """The calls of torchvision's eval forward (F.conv2d, F.batch_norm, F.relu, +=), as one
    flat function."""
    def cbn(x, conv, bn):
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                     conv.groups)
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                            bn.eps)

    def run(x):
        x = F.max_pool2d(F.relu(cbn(x, tv.conv1, tv.bn1), inplace=True), 3, 2, 1)
        for stage in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            for b in stage:
                out = F.relu(cbn(x, b.conv1, b.bn1), inplace=True)
                out = F.relu(cbn(out, b.conv2, b.bn2), inplace=True)
                out = cbn(out, b.conv3, b.bn3)
                out += x if b.downsample is None else cbn(x, b.downsample[0], b.downsample[1])
                x = F.relu(out, inplace=True)
        return tv.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
    return run


def _plans_direct(model):
    """The plan kernels of our eval forward (its program, built by one forward before) run
    as the model runs them, without its per-forward check and module calls."""
    program = model._fused_program([model.layer1, model.layer2, model.layer3, model.layer4])

    def run(x):
        x = program(x, model.maxpool)
        return model.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
    return run


@contextlib.contextmanager
def _recorded_kernels(tv: torchvision.models.ResNet, program, x: torch.Tensor):
    """Inside: F.conv2d, F.batch_norm and F.relu (what torchvision's modules and its direct
    twin call) return, in call order, what they returned in one real forward of ``tv``; each
    plan of ``program`` answers with its first output."""
    names = ("conv2d", "batch_norm", "relu")
    real = {name: getattr(F, name) for name in names}
    recorded: dict[str, list] = {name: [] for name in names}

    def recorder(name):
        def call(*args, **kwargs):
            out = real[name](*args, **kwargs)
            recorded[name].append(out)
            return out
        return call

    plans = program.plans()
    saved = [plan.dense_op for plan in plans]
    packed_call = ConvPlan._packed_call  # every prepared kernel: oneDNN, Winograd, the GEMM
    tuner = autotune.cpu_tuner()
    measure = tuner.measure
    first: dict[tuple, object] = {}

    def replay_packed(plan, *args, **kwargs):
        # an in-place call (one argument more) answers None; the stem's pooled call (relu=)
        # its conv without the ReLU
        key = (id(plan), len(args), tuple(kwargs.items()))
        if key not in first:
            first[key] = packed_call(plan, *args, **kwargs)
        return first[key]

    try:
        for name in names:
            setattr(F, name, recorder(name))
        tv(x)
        for name in names:
            setattr(F, name, _in_order(recorded[name]))
        for plan, dense_op in zip(plans, saved):
            plan.dense_op = _replaying(dense_op)
        ConvPlan._packed_call = replay_packed
        tuner.measure = False  # a replayed kernel takes no time: never let the tuner time one
        yield
    finally:
        for name in names:
            setattr(F, name, real[name])
        for plan, dense_op in zip(plans, saved):
            plan.dense_op = dense_op
        ConvPlan._packed_call = packed_call
        tuner.measure = measure


def _in_order(outputs: list) -> Callable:
    """A function answering its n-th call with ``outputs[n % len(outputs)]``."""
    cycle = itertools.cycle(outputs)
    return lambda *args, **kwargs: next(cycle)


def _replaying(op: Callable) -> Callable:
    """``op``, answering every call after the first with the first call's output."""
    out = []

    def replay(*args, **kwargs):
        if not out:
            out.append(op(*args, **kwargs))
        return out[0]
    return replay


def _candidates(tv, ours, x) -> dict:
    return {"torchvision": lambda: tv(x),
            "torchvision_direct": functools.partial(_torchvision_direct(tv), x),
            "resnet_fast": lambda: ours(x),
            "resnet_fast_direct": functools.partial(_plans_direct(ours), x)}


def _summary(times: dict[str, Blocks]) -> dict:
    result = {name: {"median_us": statistics.median(flat(t)) * 1e6,
                     "p10_us": quantile(flat(t), 0.1) * 1e6,
                     "p90_us": quantile(flat(t), 0.9) * 1e6} for name, t in times.items()}
    for model, direct in (("torchvision", "torchvision_direct"),
                          ("resnet_fast", "resnet_fast_direct")):
        per_round = [(statistics.median(m) - statistics.median(d)) * 1e6 / N_CONVS
                     for m, d in zip(times[model], times[direct], strict=True)]
        result[model]["overhead_us_per_conv"] = statistics.median(per_round)
    for r in result.values():
        r["us_per_conv"] = r["median_us"] / N_CONVS
    return result


def _timed(candidates: dict, repeats: int, inner: int) -> dict[str, Blocks]:
    """CPU timings in rotated warm blocks (the collector is off while they run)."""
    return warm_blocks(candidates, torch.device("cpu"), repeats, BLOCK, warmup=1, inner=inner)


def measure(image_size: int = 32, batch: int = 1, repeats: int = 30, inner: int = 5) -> dict:
    torch.manual_seed(0)
    tv = calibrate_(torchvision.models.resnet50(), batch_size=8, image_size=image_size)
    ours = convert(tv).eval()
    x = torch.randn(batch, 3, image_size, image_size)
    with torch.no_grad():
        ours(x)  # builds the plans
        candidates = _candidates(tv, ours, x)
        ref = tv(x)
        for name, fn in candidates.items():
            err = (fn() - ref).abs().max().item()
            if err > 1e-3 * ref.abs().max().item():
                raise RuntimeError(f"{name} differs from torchvision by {err:.3g}")
        with_kernels = _summary(_timed(candidates, repeats, inner))
        program = ours._fused_program([ours.layer1, ours.layer2, ours.layer3, ours.layer4])
        with _recorded_kernels(tv, program, x):
            host_only = _summary(_timed(_candidates(tv, ours, x), repeats, inner * 4))
    return {"benchmark": "host_overhead", "arch": "resnet50", "batch": batch,
            "image_size": image_size, "repeats": repeats, "inner": inner,
            "threads": torch.get_num_threads(), "env": environment(torch.device("cpu")),
            "results": with_kernels, "host_only": host_only}


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
          f"{out['threads']} threads (median of {args.repeats} samples in rotated warm blocks "
          f"of {BLOCK})")
    for title, section in (("with kernels", out["results"]),
                           ("host only (kernels answer from a recording)", out["host_only"])):
        print(f" {title}:")
        for name, r in section.items():
            extra = (f"   overhead {r['overhead_us_per_conv']:6.1f} us/conv"
                     if "overhead_us_per_conv" in r else "")
            print(f"  {name:<20}{r['median_us']:10.0f} us  {r['us_per_conv']:7.1f} us/conv  "
                  f"(p10 {r['p10_us']:.0f}, p90 {r['p90_us']:.0f}){extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
