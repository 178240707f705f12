"""Classify the images in a folder with a resnet_fast model, printing each image's top-k.

    python examples/classify.py --arch resnet50 --weights DEFAULT path/to/images --top 5

``--weights`` is a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V2``; downloaded
through the torch.hub cache) or a checkpoint file. With a weights name, the images go
through the weights' own transforms (``weights.transforms()``), and the labels are
``weights.meta["categories"]``. With a checkpoint, the images go through the standard ImageNet
eval transform (resize to size * 256 / 224, center-crop to ``--image-size``, normalise), and
the script prints class indices. The exception is a checkpoint written by
``examples/finetune.py``: its ``classes`` are the labels and its ``image_size`` is the default
size.

The folder is searched recursively for images (the extensions torchvision's ImageFolder reads).
Each image is read with PIL as RGB, and the images are run in batches in eval mode, where every
conv -> BN (-> add) -> ReLU is one fused kernel. ``--optimize`` wraps the model in
``resnet_fast.optimize`` (channels_last, CUDA graphs on a GPU).

One line per image goes to stdout: ``path: label (p%), label (p%), ...``, best first. The path
is relative to the folder. ``main(argv)`` returns the same results as a list.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

import resnet_fast

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Classify every image under a folder with a resnet_fast model; prints "
                    "each image's top-k classes.")
    p.add_argument("images", type=Path, help="a folder of images (searched recursively) or "
                                             "one image file")
    p.add_argument("--arch", default="resnet50", choices=resnet_fast.list_models(),
                   metavar="ARCH", help="model architecture, one of "
                   f"{', '.join(resnet_fast.list_models())} (default: resnet50)")
    p.add_argument("--weights", default="DEFAULT",
                   help="a torchvision weights name such as DEFAULT or IMAGENET1K_V2 "
                        "(downloaded through the torch.hub cache), or a checkpoint file "
                        "(default: DEFAULT)")
    p.add_argument("--top", type=int, default=5, help="classes printed per image (default: 5)")
    p.add_argument("--batch", type=int, default=16, help="images per forward (default: 16)")
    p.add_argument("--image-size", type=int, default=None,
                   help="checkpoints only: center-crop size after resizing to size*256/224 "
                        "(default: the checkpoint's image_size, else 224). Named weights use "
                        "their own transforms")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--optimize", action="store_true",
                   help="run through resnet_fast.optimize (channels_last; CUDA graphs on GPU)")
    args = p.parse_args(argv)
    for name in ("top", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.image_size is not None and args.image_size < 1:
        p.error(f"--image-size must be >= 1, got {args.image_size}")
    if args.image_size is not None and not os.path.isfile(args.weights):
        p.error(f"--image-size applies to checkpoint files; weights {args.weights!r} come with "
                "their own transforms")
    return args


# --- images -----------------------------------------------------------------------------------

def find_images(root: Path) -> list[Path]:
    """``root`` itself if it is a file, else every file under it with an image extension,
    sorted (case-insensitive extensions, links followed, as ImageFolder does)."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    found = [Path(folder) / name
             for folder, _, names in os.walk(root, followlinks=True)
             for name in names if name.lower().endswith(IMG_EXTENSIONS)]
    if not found:
        raise FileNotFoundError(f"no images under {root} (looked for {', '.join(IMG_EXTENSIONS)})")
    return sorted(found)


def eval_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    """The standard ImageNet eval transform at ``image_size`` (224: resize 256, crop 224)."""
    return transforms.Compose([
        transforms.Resize(int(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# --- model ------------------------------------------------------------------------------------

def _state_dict_of(obj: Any) -> Mapping:
    """Where a checkpoint keeps its state_dict: itself, or under 'state_dict' / 'model'."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj if isinstance(obj, Mapping) else {}


def load_model(arch: str, weights: str, image_size: Optional[int]
               ) -> tuple[nn.Module, Callable[[Image.Image], Tensor], Optional[list[str]]]:
    """(model in eval mode, the transform its images need, class labels or None)."""
    if os.path.isfile(weights):
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
        state = _state_dict_of(ckpt)
        fc = state.get("fc.weight", state.get("module.fc.weight"))
        kwargs = {"num_classes": fc.shape[0]} if isinstance(fc, Tensor) else {}
        model = resnet_fast.create_model(arch, weights=ckpt, **kwargs)
        meta = ckpt if isinstance(ckpt, Mapping) else {}
        size = image_size or meta.get("image_size") or 224
        classes = meta.get("classes")  # examples/finetune.py's checkpoints name them
        if not (isinstance(classes, list) and len(classes) == model.fc.out_features):
            classes = None
        return model.eval(), eval_transform(size), classes
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:  # the CIFAR ResNets: torchvision has no weights for them
        raise ValueError(f"{arch} has no torchvision weights; pass a checkpoint file as "
                         f"--weights") from None
    member = enum.verify(weights)
    model = resnet_fast.create_model(arch, weights=member)
    return model.eval(), member.transforms(), list(member.meta["categories"])


# --- entry point ------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> list[tuple[str, list[tuple[int, float]]]]:
    """Classify as the command line says; returns (path, [(class index, probability), ...])
    per image, best class first."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device}: no CUDA device is visible")
    paths = find_images(args.images)
    model, transform, labels = load_model(args.arch, args.weights, args.image_size)
    model = model.to(device)
    if args.optimize:
        model = resnet_fast.optimize(model)
    base = args.images if args.images.is_dir() else args.images.parent
    print(f"{args.arch} ({args.weights}) on {device}: {len(paths)} images", file=sys.stderr)

    results = []
    for start in range(0, len(paths), args.batch):
        batch, names = [], []
        for path in paths[start:start + args.batch]:
            try:
                with Image.open(path) as image:
                    batch.append(transform(image.convert("RGB")))
            except (UnidentifiedImageError, OSError) as exc:
                print(f"skipped {path}: {exc}", file=sys.stderr)
                continue
            names.append(str(path.relative_to(base)))
        if not batch:
            continue
        with torch.inference_mode():
            logits = model(torch.stack(batch).to(device))
        probs = logits.float().softmax(dim=1)
        values, indices = probs.topk(min(args.top, probs.shape[1]), dim=1)
        for name, p, i in zip(names, values.tolist(), indices.tolist()):
            ranked = list(zip(i, p))
            results.append((name, ranked))
            shown = ", ".join(f"{labels[c] if labels else c} ({prob:.1%})" for c, prob in ranked)
            print(f"{name}: {shown}", flush=True)
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {exc}")
