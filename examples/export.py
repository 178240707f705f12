"""Export a ResNet for deployment: fold BN into the convs, export with a dynamic batch
dimension, reload the file with torch alone and run it at several batch sizes.

    python examples/export.py --arch resnet50 --weights r50_imagenette.pt --out r50.pt2
    python examples/export.py --image-size 64 --out /tmp/resnet18.pt2   # random weights

``--weights`` takes a torchvision state_dict checkpoint, also one nested under 'model' (as
examples/finetune.py writes it) or saved from DDP; the class count is read from its ``fc``.
The BN-folded model is plain torchvision, so the .pt2 holds only aten ops: a server loads it
with ``torch.export.load(path).module()`` and needs neither resnet_fast nor torchvision.
``resnet-fast fuse`` does the same with more formats (AOTInductor, ONNX) and a fresh-process
check; ``main(argv)`` returns what it measured, so the script can be driven in-process.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torchvision

import resnet_fast
from resnet_fast.models.weights import load_checkpoint


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18",
                        help="a torchvision ResNet (default resnet18)")
    parser.add_argument("--weights", default=None, help="checkpoint (default: random weights)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default="resnet.pt2")
    args = parser.parse_args(argv)

    # 1. The model, with the checkpoint's weights and class count.
    state = load_checkpoint(args.weights) if args.weights else None
    num_classes = state["fc.weight"].shape[0] if state else 1000
    model = getattr(torchvision.models, args.arch)(num_classes=num_classes)
    if state:
        model.load_state_dict(state)
    model.eval()

    # 2. BN folded into the convs: one conv (with bias) per conv -> BN pair, same outputs.
    fused = resnet_fast.fuse_bn(model)

    # 3. Export with the batch dimension dynamic (any N >= 1), then save.
    example = torch.randn(2, 3, args.image_size, args.image_size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(fused, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, args.out)

    # 4. What a server does: load the file and run it, at batch sizes other than the example's.
    deployed = torch.export.load(args.out).module()
    errors = {}
    with torch.no_grad():
        for n in (1, 5):
            images = torch.randn(n, 3, args.image_size, args.image_size)
            logits, expected = deployed(images), model(images)
            # The error as a fraction of the largest logit: float32 rounding, ~1e-6.
            errors[n] = ((logits - expected).abs().max() / expected.abs().max()).item()
            print(f"batch {n}: logits {tuple(logits.shape)}, max abs error vs the unfused model "
                  f"{errors[n]:.1e} of the largest logit")
    print(f"wrote {args.out}")
    return {"out": args.out, "num_classes": num_classes, "relative_err": errors}


if __name__ == "__main__":
    main()
