"""A detection backbone as torchvision builds it: ResNet-50 with FrozenBatchNorm2d under
torchvision's FPN extractor (``_resnet_fpn_extractor``, trainable layers 3, as
``fasterrcnn_resnet50_fpn`` does), torchvision's model against resnet_fast's (two imports
changed: the ResNet, and the extractor from ``resnet_fast.models.detection``, whose FPN runs
its convs as our plans), on the same calibrated weights, fp32 on CPU.

    python benchmarks/fpn_backbone.py                         # 512 px, batch 1 and 4
    python benchmarks/fpn_backbone.py --json benchmarks/results/<host>/fpn_resnet50_float32.json

Per batch, three modes: ``inference`` (eval, ``torch.no_grad``), ``body inference`` (the
same, the ResNet body alone: ``model.body``, without the FPN) and ``train step`` (train mode,
the sum of the squared FPN outputs' means backpropagated, one SGD step on the trainable
layers), each with the model and its images NCHW (as torchvision's detection models feed them)
and channels_last (``model.to(memory_format=torch.channels_last)`` and channels_last images).
Every candidate is timed in rotated warm blocks (``resnet_fast.bench.timing``); the ratio is
the median over rounds of torchvision's time over ours in the same layout.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import torchvision
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fast
from resnet_fast.bench.env import environment
from resnet_fast.bench.timing import flat, round_ratio, warm_blocks
from resnet_fast.calibrate import reference_model
from resnet_fast.models import detection


def backbones() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(torchvision's, ours): ResNet-50 with FrozenBatchNorm2d carrying the calibrated BN
    statistics, under the FPN extractor, the same FPN weights."""
    state = {k: v for k, v in reference_model("resnet50").state_dict().items()
             if not k.endswith("num_batches_tracked")}  # FrozenBatchNorm2d has no counter
    tv = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    ours = resnet_fast.resnet50(norm_layer=FrozenBatchNorm2d)
    tv.load_state_dict(state)
    ours.load_state_dict(state)
    torch.manual_seed(0)
    fpn_tv = _resnet_fpn_extractor(tv, trainable_layers=3)
    fpn_ours = detection._resnet_fpn_extractor(ours, trainable_layers=3)
    fpn_ours.load_state_dict(fpn_tv.state_dict())
    return fpn_tv, fpn_ours


def calls(model: torch.nn.Module, x: torch.Tensor, train: bool, body: bool = False):
    """One inference forward (``body``: of the ResNet body alone), or one training step, of
    ``model`` on ``x``."""
    if not train:
        model.eval()
        run = model.body if body else model

        def infer():
            with torch.no_grad():
                return run(x)
        return infer
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = sum(f.square().mean() for f in model(x).values())
        loss.backward()
        opt.step()
        return loss
    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,4", help="comma-separated (default 1,4)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=6, help="timed calls per candidate")
    parser.add_argument("--block", type=int, default=2, help="timed calls per warm block")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    fpn_tv, fpn_ours = backbones()
    result = {"model": "resnet50 + FrozenBatchNorm2d, _resnet_fpn_extractor (trainable_layers=3): "
                       "torchvision's, and resnet_fast.models.detection's (the FPN fused)",
              "dtype": "float32",
              "image_size": args.image_size, "repeats": args.repeats, "block": args.block,
              "timing": "rotated warm blocks (resnet_fast.bench.timing.warm_blocks); ratio: "
                        "median over rounds of torchvision's time / ours",
              "command": "python benchmarks/fpn_backbone.py " + " ".join(argv or sys.argv[1:]),
              "environment": environment(torch.device("cpu")), "runs": []}
    for batch in (int(b) for b in args.batch.split(",")):
        images = torch.randn(batch, 3, args.image_size, args.image_size,
                             generator=torch.Generator().manual_seed(batch))
        for mode in ("inference", "body inference", "train step"):
            train, body = mode == "train step", mode == "body inference"
            for layout in ("nchw", "channels_last"):
                fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
                x = images.contiguous(memory_format=fmt)
                models = {name: copy.deepcopy(m).to(memory_format=fmt)
                          for name, m in (("torchvision", fpn_tv), ("resnet_fast", fpn_ours))}
                fns = {name: calls(m, x, train, body) for name, m in models.items()}
                if not train:  # same features, within fp32 rounding of 53 convs
                    got, want = fns["resnet_fast"](), fns["torchvision"]()
                    err = max((got[k] - want[k]).abs().max().item() for k in want)
                    scale = max(want[k].abs().max().item() for k in want)
                else:
                    err = scale = None
                times = warm_blocks(fns, torch.device("cpu"), args.repeats, args.block)
                run = {"batch": batch, "mode": mode, "layout": layout,
                       "median_ms": {n: 1e3 * statistics.median(flat(t)) for n, t in times.items()},
                       "speedup_vs_torchvision": round_ratio(times["torchvision"],
                                                             times["resnet_fast"]),
                       "max_abs_err_vs_torchvision": err, "feature_scale": scale}
                result["runs"].append(run)
                print(f"batch {batch} {mode:<14} {layout:<13} torchvision "
                      f"{run['median_ms']['torchvision']:8.1f} ms  resnet_fast "
                      f"{run['median_ms']['resnet_fast']:8.1f} ms  "
                      f"{run['speedup_vs_torchvision']:.2f}x"
                      + (f"  max err {err:.1e} (scale {scale:.1f})" if err is not None else ""),
                      flush=True)
                if args.json:  # after every run: an interrupted run keeps what finished
                    Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
