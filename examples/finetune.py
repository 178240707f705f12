"""Fine-tune a resnet_fast model on an ImageFolder dataset (e.g. Imagenette).

    python examples/finetune.py /data/imagenette2-320 --arch resnet50 --weights DEFAULT \\
        --lr 0.01 --backbone-lr 0.001 --epochs 5 --amp

The data root must hold ``train/`` and ``val/``, each with one subfolder per class (the
ImageFolder layout Imagenette ships in). The model is built with ``resnet_fast.create_model``,
so ``--weights`` takes whatever its ``weights=`` argument takes; its ``fc`` is then replaced by
a new head for the dataset's classes. Training runs in train mode, where every BatchNorm -> (add ->) ReLU is one fused
batch_norm_act kernel (batch statistics, as torchvision computes them); validation, and the frozen backbone with ``--freeze-backbone``, run
in eval mode, where the model uses its fused conv+BN(+add)+ReLU inference kernels.

``main(argv)`` returns the final metrics, so the script can be driven in-process (the tests do).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

import resnet_fast

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The progress bar's loss is read from the device only this often: reading it every step
# would make the host wait for the GPU on every step.
_PROGRESS_EVERY = 10


class DatasetLayoutError(ValueError):
    """The data directory is not the ``train/`` + ``val/`` ImageFolder layout the script needs."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fine-tune a resnet_fast model on an ImageFolder dataset "
                    "(DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg).")
    p.add_argument("data", type=Path,
                   help="dataset root holding train/ and val/, one subfolder per class in each "
                        "(e.g. imagenette2-320)")
    p.add_argument("--arch", default="resnet18", choices=resnet_fast.list_models(),
                   metavar="ARCH", help="model architecture, one of "
                   f"{', '.join(resnet_fast.list_models())} (default: resnet18)")
    p.add_argument("--weights", default=None,
                   help="starting weights, anything create_model's weights= takes: a torchvision "
                        "weights name such as DEFAULT or IMAGENET1K_V2 (downloaded through the "
                        "torch.hub cache), or a checkpoint file (a torchvision .pth or this "
                        "script's --out). Default: random initialisation")
    p.add_argument("--epochs", type=int, default=5, help="epochs (default: 5)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default: 64)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate of the new head (default: 0.1 * batch-size / 256, "
                        "the linear scaling rule)")
    p.add_argument("--backbone-lr", type=float, default=None,
                   help="peak learning rate of everything but fc (default: --lr). Lower it, "
                        "e.g. to --lr / 10, when fine-tuning pretrained weights; ignored with "
                        "--freeze-backbone")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="weight decay of conv and linear weights; BN parameters and biases get "
                        "none (default: 1e-4)")
    p.add_argument("--drop-path-rate", type=float, default=0.0,
                   help="stochastic depth rate of the model's last block (default: 0)")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="train only the new fc; the backbone stays in eval mode, so its BN "
                        "statistics do not move (and it runs the fused inference kernels)")
    p.add_argument("--image-size", type=int, default=224,
                   help="training crop size; validation resizes to size*256/224 and "
                        "center-crops to size (default: 224)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes (default: min(8, CPU count)). On CPU "
                        "the model then gets the remaining cores; on a small machine --workers 0 "
                        "can be faster")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast (meant for CUDA; on CPU it runs, but is rarely faster)")
    p.add_argument("--out", type=Path, default=Path("finetune.pt"),
                   help="checkpoint path (default: finetune.pt). It holds the BEST epoch by "
                        "validation accuracy: rewritten (atomically) after every epoch that "
                        "improves on it, not after every epoch. Keys: model (state_dict), "
                        "classes, arch, epoch, val_acc, image_size")
    p.add_argument("--limit-batches", type=int, default=None,
                   help="at most this many train and val batches per epoch (smoke runs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.limit_batches is not None and args.limit_batches < 1:
        p.error(f"--limit-batches must be >= 1, got {args.limit_batches}")
    if args.lr is None:
        args.lr = 0.1 * args.batch_size / 256
    if args.backbone_lr is None:
        args.backbone_lr = args.lr
    return args


# --- data -------------------------------------------------------------------------------------

def _listing(path: Path, limit: int = 10) -> str:
    """A short description of what is in ``path``, for error messages."""
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in path.iterdir())
    if not entries:
        return "nothing (it is empty)"
    more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def _has_image(folder: Path) -> bool:
    """Whether ImageFolder would find at least one image under ``folder`` (it walks
    subdirectories and follows links, and matches extensions case-insensitively)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def check_split(root: Path, split: str) -> list[str]:
    """The class names of ``root/split``, or a DatasetLayoutError that says what was expected
    and what was found. Checked up front because ImageFolder's own errors name one problem at
    a time and not the layout it wants."""
    expected = (f"expected {root}/train and {root}/val, each with one subfolder per class "
                f"holding that class's images (e.g. {root}/train/<class>/img.jpg)")
    if not root.is_dir():
        raise DatasetLayoutError(f"data directory {root} does not exist or is not a directory; "
                                 f"{expected}")
    folder = root / split
    if not folder.is_dir():
        raise DatasetLayoutError(f"{folder} not found; {expected}. Found in {root}: "
                                 f"{_listing(root)}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DatasetLayoutError(f"{folder} has no class subfolders; {expected}. Found in "
                                 f"{folder}: {_listing(folder)}")
    empty = [c for c in classes if not _has_image(folder / c)]
    if empty:
        raise DatasetLayoutError(
            f"{folder}: {len(empty)} of {len(classes)} class folders hold no images "
            f"({', '.join(empty[:10])}{', ...' if len(empty) > 10 else ''}); every class "
            f"folder needs at least one file with an image extension "
            f"({', '.join(IMG_EXTENSIONS)})")
    return classes


def build_datasets(root: Path,
                   image_size: int) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """The course's train and val pipelines over ``root/train`` and ``root/val``."""
    train_classes = check_split(root, "train")
    val_classes = check_split(root, "val")
    if train_classes != val_classes:
        # ImageFolder numbers each split's classes on its own: different folder sets would
        # silently give the same label index to different classes.
        raise DatasetLayoutError(
            f"{root}/train and {root}/val must have the same class folders; only in train: "
            f"{sorted(set(train_classes) - set(val_classes)) or 'none'}, only in val: "
            f"{sorted(set(val_classes) - set(train_classes)) or 'none'}")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.4, 0.4, 0.4),
        transforms.ToTensor(),
        normalize,
    ])
    val_tf = transforms.Compose([
        transforms.Resize(int(image_size * 256 / 224)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        normalize,
    ])
    return (datasets.ImageFolder(str(root / "train"), transform=train_tf),
            datasets.ImageFolder(str(root / "val"), transform=val_tf))


# --- model and optimizer ----------------------------------------------------------------------

def _checkpoint_classes(obj: Any) -> Optional[int]:
    """The class count of a loaded checkpoint's fc, looking where create_model's weights
    handling looks (the mapping itself, or one nested under 'state_dict' / 'model', with or
    without DDP's 'module.' prefix)."""
    if not isinstance(obj, Mapping):
        return None
    for candidate in (obj, obj.get("state_dict"), obj.get("model")):
        if isinstance(candidate, Mapping):
            for key in ("fc.weight", "module.fc.weight"):
                weight = candidate.get(key)
                if isinstance(weight, Tensor):
                    return weight.shape[0]
    return None


def build_model(arch: str, weights: Optional[str], num_classes: int,
                drop_path_rate: float = 0.0) -> nn.Module:
    """``arch`` with ``weights`` loaded and a new zero-initialised fc for ``num_classes``.

    A checkpoint file is read here first (``weights_only=True``, as create_model would) to
    build the model with the checkpoint's own class count, so both torchvision's 1000-class
    files and this script's outputs load strictly before the head is replaced. The new head
    starts at zero: every class gets the same logit, so the first steps do not push large,
    random-head gradients into pretrained features.
    """
    kwargs: dict[str, Any] = {}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    source: Any = weights
    if weights is not None and os.path.isfile(weights):
        source = torch.load(weights, map_location="cpu", weights_only=True)
        n = _checkpoint_classes(source)
        if n is not None:
            kwargs["num_classes"] = n
    model = resnet_fast.create_model(arch, weights=source, **kwargs)
    head = nn.Linear(model.fc.in_features, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.fc = head
    return model


def freeze_backbone(model: nn.Module) -> None:
    """Only fc keeps requires_grad: the optimizer never sees the backbone, and with no
    backbone parameter wanting gradients its fused eval path reuses cached BN-folded weights."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("fc."))


def set_train_mode(model: nn.Module, frozen_backbone: bool) -> None:
    """Train mode, except that a frozen backbone stays in eval mode so its BN running
    statistics (and dropout-like regularizers) stay as they were loaded."""
    if frozen_backbone:
        model.eval()
        model.fc.train()
    else:
        model.train()


def param_groups(model: nn.Module, lr: float, backbone_lr: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """Head vs backbone learning rates, and no weight decay on BN parameters and biases
    (1-D tensors): decaying them only fights the normalisation and buys no regularisation."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name.startswith("fc."), param.ndim > 1), []).append(param)
    return [{"params": params, "lr": lr if is_head else backbone_lr,
             "weight_decay": weight_decay if decay else 0.0}
            for (is_head, decay), params in sorted(groups.items())]


def cosine_schedule(optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from each group's own lr to 0 over every step of the run (a multiplier,
    so the head/backbone ratio holds throughout)."""
    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- loops ------------------------------------------------------------------------------------

def _batches(loader: DataLoader, limit: Optional[int]) -> int:
    return len(loader) if limit is None else min(len(loader), limit)


def _device_batches(loader: DataLoader, n_batches: int, device: torch.device):
    """(step, images, labels) for the first ``n_batches`` batches, on ``device``, images
    channels_last."""
    non_blocking = device.type == "cuda"
    for step, (images, labels) in enumerate(loader):
        if step == n_batches:
            return
        yield (step, images.to(device, memory_format=torch.channels_last, non_blocking=non_blocking),
               labels.to(device, non_blocking=non_blocking))


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device,
                    amp: bool, frozen_backbone: bool, limit: Optional[int],
                    desc: str) -> dict[str, float]:
    """One pass over ``loader``; returns loss, accuracy and images per second."""
    set_train_mode(model, frozen_backbone)
    criterion = nn.CrossEntropyLoss()
    n_batches = _batches(loader, limit)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    with tqdm(total=n_batches, desc=desc, unit="batch", leave=False, dynamic_ncols=True) as bar:
        for step, images, labels in _device_batches(loader, n_batches, device):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(images)
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * labels.shape[0]
            correct += (logits.argmax(1) == labels).sum()
            seen += labels.shape[0]
            bar.update()
            if (step + 1) % _PROGRESS_EVERY == 0 or step + 1 == n_batches:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
    loss_avg = loss_sum.item() / seen  # .item() waits for the device, so the time is complete
    elapsed = time.perf_counter() - start
    return {"loss": loss_avg, "acc": correct.item() / seen, "img_per_s": seen / elapsed}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool,
             limit: Optional[int]) -> dict[str, float]:
    """Mean loss and accuracy over ``loader`` in eval mode (the fused kernels)."""
    model.eval()
    n_batches = _batches(loader, limit)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for _, images, labels in _device_batches(loader, n_batches, device):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen}


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file next to ``path``, then rename it over ``path``: an
    interrupted run never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --- entry point ------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Fine-tune as the command line says; returns the last epoch's metrics plus the best
    validation accuracy, its epoch and the checkpoint path."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {args.device}: no CUDA device is visible")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick conv algorithms once
    elif device.type == "cpu" and args.workers > 0:
        # Training on CPU, the model's OpenMP threads and the loader workers share the cores,
        # and idle OpenMP threads spin: with as many threads as cores, the workers starve
        # (measured on 2 cores, 2 workers: 3.5 img/s; one compute thread: 22 img/s).
        threads = max(1, (os.cpu_count() or 1) - args.workers)
        if threads < torch.get_num_threads():
            print(f"cpu: {threads} compute thread(s), leaving cores to {args.workers} loader "
                  f"worker(s); --workers 0 gives the model every core", flush=True)
            torch.set_num_threads(threads)

    train_set, val_set = build_datasets(args.data, args.image_size)
    classes = list(train_set.classes)
    if len(train_set) < args.batch_size:
        raise DatasetLayoutError(f"{args.data}/train holds {len(train_set)} images, fewer than "
                                 f"one batch (--batch-size {args.batch_size})")
    pin = device.type == "cuda"
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin,
                  persistent_workers=args.workers > 0)
    # drop_last: a last batch of one image would make train-mode BN fail on 1x1 feature maps.
    train_loader = DataLoader(train_set, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed), **common)
    val_loader = DataLoader(val_set, shuffle=False, **common)

    model = build_model(args.arch, args.weights, len(classes), args.drop_path_rate)
    if args.freeze_backbone:
        freeze_backbone(model)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        param_groups(model, args.lr, args.backbone_lr, args.weight_decay),
        lr=args.lr, momentum=0.9)
    steps_per_epoch = _batches(train_loader, args.limit_batches)
    scheduler = cosine_schedule(optimizer, args.epochs * steps_per_epoch)

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.arch} on {device}: {len(classes)} classes, {len(train_set)} train / "
          f"{len(val_set)} val images, {n_trainable:,} trainable parameters"
          f"{' (backbone frozen)' if args.freeze_backbone else ''}, lr {args.lr:g} head / "
          f"{args.backbone_lr:g} backbone", flush=True)

    best_acc, best_epoch = -1.0, 0
    metrics: dict[str, Any] = {}
    for epoch in range(1, args.epochs + 1):
        train = train_one_epoch(model, train_loader, optimizer, scheduler, device, args.amp,
                                args.freeze_backbone, args.limit_batches,
                                desc=f"epoch {epoch}/{args.epochs}")
        val = evaluate(model, val_loader, device, args.amp, args.limit_batches)
        improved = val["acc"] > best_acc
        if improved:
            best_acc, best_epoch = val["acc"], epoch
            save_checkpoint(args.out, {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "classes": classes, "arch": args.arch, "epoch": epoch, "val_acc": val["acc"],
                "image_size": args.image_size})
        print(f"epoch {epoch}/{args.epochs}  train loss {train['loss']:.4f} acc "
              f"{train['acc']:.4f}  val loss {val['loss']:.4f} acc {val['acc']:.4f}  "
              f"{train['img_per_s']:.1f} img/s{'  (saved: best so far)' if improved else ''}",
              flush=True)
        metrics = {"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
                   "val_loss": val["loss"], "val_acc": val["acc"],
                   "img_per_s": train["img_per_s"]}
    metrics.update(best_val_acc=best_acc, best_epoch=best_epoch, checkpoint=str(args.out),
                   classes=classes)
    print(f"best val acc {best_acc:.4f} (epoch {best_epoch}), checkpoint: {args.out}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except DatasetLayoutError as exc:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {exc}")
