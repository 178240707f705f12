"""examples/finetune.py end to end on a tiny generated ImageFolder: one epoch on CPU writes a
checkpoint that loads strictly into a fresh model, --freeze-backbone trains fc and nothing
else, and a wrong layout fails with a message that says what was expected."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _examples import load_example
from PIL import Image

import resnet_fast

CLASSES = ("cat", "dog")


finetune = load_example("finetune")


def _write_images(folder: Path, n: int, base: tuple[int, int, int], gen: torch.Generator) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        # A class colour plus noise: distinguishable classes, no two images alike.
        noise = torch.randint(-40, 41, (40, 40, 3), generator=gen)
        pixels = (torch.tensor(base) + noise).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    gen = torch.Generator().manual_seed(0)
    for cls, colour in zip(CLASSES, [(200, 60, 60), (60, 60, 200)]):
        _write_images(root / "train" / cls, 6, colour, gen)
        _write_images(root / "val" / cls, 2, colour, gen)
    return root


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 1000-class resnet18 state_dict on disk, as a torchvision checkpoint would be, so the
    tests know the backbone the run starts from."""
    torch.manual_seed(1)
    state = resnet_fast.resnet18().state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18_init.pth"
    torch.save(state, path)
    return path, state


def _run(data_root: Path, out: Path, weights: Path, *extra: str) -> dict:
    return finetune.main([str(data_root), "--arch", "resnet18", "--weights", str(weights),
                          "--epochs", "1", "--batch-size", "4", "--image-size", "32",
                          "--workers", "0", "--device", "cpu", "--out", str(out), *extra])


def _load_checkpoint(out: Path) -> dict:
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "resnet18" and ckpt["epoch"] == 1 and ckpt["image_size"] == 32
    assert ckpt["classes"] == list(CLASSES)
    fresh = resnet_fast.resnet18(num_classes=len(CLASSES))
    fresh.load_state_dict(ckpt["model"], strict=True)
    return ckpt


def _check_metrics(metrics: dict, out: Path) -> None:
    for key in ("train_loss", "val_loss", "img_per_s"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, (key, metrics[key])
    for key in ("train_acc", "val_acc", "best_val_acc"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["epoch"] == 1 and metrics["best_epoch"] == 1
    assert metrics["checkpoint"] == str(out) and metrics["classes"] == list(CLASSES)


@pytest.mark.slow
def test_finetune_one_epoch_writes_a_strictly_loadable_checkpoint(data_root, initial_weights,
                                                                  tmp_path):
    weights, start = initial_weights
    out = tmp_path / "ckpt" / "finetune.pt"
    metrics = _run(data_root, out, weights, "--lr", "0.05", "--backbone-lr", "0.01")
    _check_metrics(metrics, out)
    ckpt = _load_checkpoint(out)
    assert not list(out.parent.glob("*.tmp")), "the temporary checkpoint file was left behind"
    assert ckpt["val_acc"] == metrics["val_acc"]
    # The whole model trained: the backbone moved too, not only the new head.
    assert not torch.equal(ckpt["model"]["conv1.weight"], start["conv1.weight"])
    assert ckpt["model"]["fc.weight"].abs().sum() > 0


def test_freeze_backbone_changes_only_fc(data_root, initial_weights, tmp_path):
    weights, start = initial_weights
    out = tmp_path / "frozen.pt"
    # --limit-batches 2: also the smoke-run path (2 of the 3 train batches).
    metrics = _run(data_root, out, weights, "--freeze-backbone", "--lr", "0.1",
                   "--limit-batches", "2")
    _check_metrics(metrics, out)
    model = _load_checkpoint(out)["model"]
    backbone = [k for k in start if not k.startswith("fc.")]
    changed = [k for k in backbone if not torch.equal(model[k], start[k])]
    # Weights, BN running statistics and num_batches_tracked all as loaded.
    assert not changed, f"frozen backbone tensors changed: {changed}"
    # The new head starts at zero, so any non-zero entry means it trained.
    assert model["fc.weight"].shape == (len(CLASSES), 512)
    assert model["fc.weight"].abs().sum() > 0


def test_missing_train_folder_says_what_was_expected(tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "training").mkdir()
    with pytest.raises(finetune.DatasetLayoutError) as info:
        finetune.main([str(tmp_path), "--device", "cpu", "--workers", "0"])
    message = str(info.value)
    assert f"{tmp_path / 'train'} not found" in message
    assert "one subfolder per class" in message
    assert "training/" in message and "val/" in message  # what was found instead


def test_empty_class_folder_is_named(tmp_path, data_root):
    for split in ("train", "val"):
        for cls in CLASSES:
            (tmp_path / split / cls).mkdir(parents=True)
            for src in (data_root / split / cls).iterdir():
                (tmp_path / split / cls / src.name).write_bytes(src.read_bytes())
    (tmp_path / "train" / "bird").mkdir()
    (tmp_path / "train" / "bird" / "notes.txt").write_text("not an image")
    with pytest.raises(finetune.DatasetLayoutError, match=r"class folders hold no images \(bird\)"):
        finetune.main([str(tmp_path), "--device", "cpu", "--workers", "0"])


def test_missing_data_dir(tmp_path):
    with pytest.raises(finetune.DatasetLayoutError, match="does not exist"):
        finetune.main([str(tmp_path / "nowhere"), "--device", "cpu", "--workers", "0"])
