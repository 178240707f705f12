"""Winograd's gate: our F(2x2,3x3) and F(4x4,3x3) kernels against our oneDNN direct conv on
the stride-1 3x3 convolutions of ResNet-50, per layer, fp32, channels_last, one process.

    python benchmarks/winograd_gate.py                       # batch 1 and 16
    python benchmarks/winograd_gate.py --json benchmarks/results/<host>/winograd_gate.json

Each layer is the second block's conv2 of a stage of the calibrated ResNet-50
(``resnet_fast.calibrate.reference_model``), its BatchNorm folded in, fed the activations that
reach it from seeded random images, bias and ReLU fused (as the model runs it). Candidates:
``onednn`` (``conv_bias_act_packed`` with its prepacked weight: what the plans run today),
``winograd2`` and ``winograd4`` (``conv_bias_act_winograd``), timed in rotated warm blocks
(``resnet_fast.bench.timing``); a ratio is the median over rounds of oneDNN's time over the
candidate's. Error: max |out - fp64 truth| over the layer's output for each candidate and for
torch's own fp32 conv (``F.conv2d`` NCHW, then bias and ReLU), the truth being the same
computation in float64. Then whole models (``--models``): the logits of 32 seeded images
against the fp64 model's, with top-1 agreement, for torchvision fp32 and ``optimize`` with
Winograd off, default (F(2x2,3x3) where measured faster) and on (F(4x4,3x3) allowed).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import resnet_fast  # noqa: F401  (registers torch.ops.resnet_fast)
from resnet_fast.bench.env import environment
from resnet_fast.bench.timing import flat, round_ratio, warm_blocks
from resnet_fast.calibrate import reference_model
from resnet_fast.ops import fold_bn

LAYERS = {"64x56x56": "layer1.1", "128x28x28": "layer2.1", "256x14x14": "layer3.1",
          "512x7x7": "layer4.1"}


def layer_inputs(batch: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (x, folded weight, bias)}: conv2's input for ``batch`` seeded images."""
    model = reference_model("resnet50")
    captured = {}
    hooks = [model.get_submodule(f"{path}.conv2").register_forward_pre_hook(
        lambda m, a, name=name: captured.__setitem__(name, a[0].detach().clone()))
        for name, path in LAYERS.items()]
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)))
    for h in hooks:
        h.remove()
    out = {}
    for name, path in LAYERS.items():
        block = model.get_submodule(path)
        w, b = fold_bn(block.conv2, block.bn2)
        out[name] = (captured[name].contiguous(memory_format=torch.channels_last), w.detach(),
                     b.detach())
    return out


def errors(x, w, b, outs: dict[str, torch.Tensor]) -> dict[str, float]:
    truth = F.conv2d(x.double(), w.double(), b.double(), padding=1).relu()
    torch_fp32 = F.conv2d(x.contiguous(), w, b, padding=1).relu()
    torch_cl = F.conv2d(x, w, b, padding=1).relu()
    err = {"torch_fp32": (torch_fp32.double() - truth).abs().max().item(),
           "torch_fp32_channels_last": (torch_cl.double() - truth).abs().max().item()}
    err.update({n: (o.double() - truth).abs().max().item() for n, o in outs.items()})
    return err


def run(batches, repeats: int, block: int) -> list[dict]:
    op = torch.ops.resnet_fast
    rows = []
    for batch in batches:
        for name, (x, w, b) in layer_inputs(batch).items():
            packed = op.prepack_conv_weight(w, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
            wino = {m: op.winograd_prepack(w, m) for m in (2, 4)}
            cands = {
                "onednn": partial(op.conv_bias_act_packed, x, packed, b, [1, 1], [1, 1], [1, 1],
                                  1, None, True),
                **{f"winograd{m}": partial(op.conv_bias_act_winograd, x, w, wino[m], b, [1, 1],
                                           None, True) for m in (2, 4)},
            }
            with torch.no_grad():
                err = errors(x, w, b, {n: fn() for n, fn in cands.items()})
                times = warm_blocks(cands, torch.device("cpu"), repeats, block)
            row = {"layer": name, "batch": batch,
                   "ms": {n: statistics.median(flat(t)) * 1e3 for n, t in times.items()},
                   "vs_onednn": {n: round_ratio(times["onednn"], t) for n, t in times.items()
                                 if n != "onednn"},
                   "max_abs_error": err}
            rows.append(row)
            print(f"batch {batch:3d} {name:>10}: " + "  ".join(
                f"{n} {ms:7.2f} ms" for n, ms in row["ms"].items()) + "  |  " + "  ".join(
                f"{n} {r:.2f}x" for n, r in row["vs_onednn"].items()) + "  |  err " + "  ".join(
                f"{n} {e:.1e}" for n, e in err.items()), flush=True)
    return rows


def model_errors(arch: str, images: int = 32, batch: int = 16) -> dict:
    """Whole-model numerics on seeded images: max |logit - fp64 truth| of torchvision fp32
    (NCHW and channels_last) and of ``optimize`` with each Winograd setting, and each one's
    top-1 agreement with the truth."""
    model = reference_model(arch)
    truth_model = copy.deepcopy(model).double()
    runs = {"torch_fp32": model,
            "torch_fp32_channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last)}
    for setting in (False, None, True):
        runs[f"optimize_winograd={setting}"] = resnet_fast.optimize(model, winograd=setting)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, 224, 224, generator=g) for _ in range(images // batch)]
    with torch.no_grad():
        truth = torch.cat([truth_model(x.double()) for x in xs])
        out = {}
        for name, m in runs.items():
            logits = torch.cat([m(x) for x in xs]).double()
            out[name] = {"max_abs_error": (logits - truth).abs().max().item(),
                         "top1_agreement": (logits.argmax(1) == truth.argmax(1)).float().mean().item()}
    out["logit_scale"] = truth.abs().max().item()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--block", type=int, default=5)
    p.add_argument("--json", type=Path)
    p.add_argument("--models", nargs="*", default=["resnet50"],
                   help="whole-model logit error and top-1 agreement vs fp64 for these archs")
    args = p.parse_args(argv)
    rows = run(args.batch_sizes, args.repeats, args.block)
    models = {arch: model_errors(arch) for arch in args.models}
    for arch, errs in models.items():
        print(arch, json.dumps(errs, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "environment": environment(torch.device("cpu")), "rows": rows,
            "models": models}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
