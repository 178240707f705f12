"""examples/classify.py on a tiny generated folder (3 PNGs, one in a subfolder, and a text file
it must pass over). Run as a command on a random 10-class resnet18 checkpoint, it prints one
line per image with that image's top-k, the top-1 being the model's own on the standard
ImageNet eval transform. In-process: --optimize gives the same classes, named weights bring
their own transforms and labels (no download: the model builder is replaced), a finetune.py
checkpoint its class names and image size, and the mistakes a user makes are refused with what
was expected."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from _examples import load_example
from PIL import Image
from torchvision import transforms

import resnet_fast

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "classify.py"
NAMES = ["a.png", "b.PNG", "sub/c.png"]  # the order the script reports them in (sorted)
SIZE = 32


classify = load_example("classify")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    gen = torch.Generator().manual_seed(0)
    for name in NAMES:
        pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy(), "RGB").save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 10-class resnet18 state_dict on disk, its fc scaled up so that the classes are well
    apart (a random head gives near-ties, where any rounding could swap the top-1)."""
    torch.manual_seed(0)
    model = resnet_fast.resnet18(num_classes=10)
    with torch.no_grad():
        model.fc.weight.mul_(50)
    path = tmp_path_factory.mktemp("weights") / "resnet18_10.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def _args(images: Path, weights: Path, *extra: str) -> list[str]:
    return ["--arch", "resnet18", "--weights", str(weights), str(images), "--top", "3",
            "--batch", "2", "--image-size", str(SIZE), "--device", "cpu", *extra]


def _direct_top1(state: dict[str, torch.Tensor], images: Path) -> list[int]:
    """The model run on the images directly, through the standard ImageNet eval transform."""
    model = resnet_fast.resnet18(num_classes=10)
    model.load_state_dict(state)
    tf = transforms.Compose([transforms.Resize(int(SIZE * 256 / 224)),
                             transforms.CenterCrop(SIZE), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406),
                                                  (0.229, 0.224, 0.225))])
    batch = torch.stack([tf(Image.open(images / n).convert("RGB")) for n in NAMES])
    with torch.inference_mode():
        return model.eval()(batch).argmax(1).tolist()


@pytest.mark.slow
def test_command_prints_each_images_top_k_led_by_the_models_top1(images, checkpoint):
    weights, state = checkpoint
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(EXAMPLE), *_args(images, weights)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    entry = r"(\d+) \((\d+\.\d)%\)"
    lines = run.stdout.splitlines()
    assert len(lines) == len(NAMES), run.stdout
    for line, name, top1 in zip(lines, NAMES, _direct_top1(state, images)):
        match = re.fullmatch(f"{re.escape(name)}: {entry}, {entry}, {entry}", line)
        assert match, f"unexpected line format: {line!r}"
        classes, probs = [int(c) for c in match.groups()[::2]], [float(p) for p in
                                                                match.groups()[1::2]]
        assert classes[0] == top1, (line, top1)
        assert len(set(classes)) == 3 and probs == sorted(probs, reverse=True), line


def test_optimize_gives_the_same_classes(images, checkpoint, capsys):
    weights, _ = checkpoint
    plain = classify.main(_args(images, weights))
    optimized = classify.main(_args(images, weights, "--optimize"))
    assert [n for n, _ in plain] == NAMES and [n for n, _ in optimized] == NAMES
    for (_, ours), (_, ref) in zip(optimized, plain):
        assert ours[0][0] == ref[0][0]
        assert ours[0][1] == pytest.approx(ref[0][1], abs=1e-4)


def test_named_weights_bring_their_own_transforms_and_labels(images, monkeypatch, capsys):
    asked = []

    def no_download(arch, weights=None, **kwargs):
        asked.append(weights)
        torch.manual_seed(0)
        return resnet_fast.resnet18(**kwargs)

    monkeypatch.setattr(resnet_fast, "create_model", no_download)
    member = torchvision.models.ResNet18_Weights.DEFAULT
    _, transform, labels = classify.load_model("resnet18", "DEFAULT", None)
    assert asked == [member]
    assert labels == member.meta["categories"]
    assert repr(transform) == repr(member.transforms())
    results = classify.main(["--arch", "resnet18", "--weights", "IMAGENET1K_V1", str(images),
                             "--top", "2", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    for line, (name, ranked) in zip(lines, results):
        shown = ", ".join(f"{labels[c]} ({p:.1%})" for c, p in ranked)
        assert line == f"{name}: {shown}"


def test_a_finetune_checkpoint_brings_its_class_names_and_size(images, checkpoint, tmp_path,
                                                              capsys):
    _, state = checkpoint
    classes = [f"class_{i}" for i in range(10)]
    path = tmp_path / "finetune.pt"
    torch.save({"model": state, "classes": classes, "arch": "resnet18", "image_size": SIZE},
               path)
    results = classify.main(["--arch", "resnet18", "--weights", str(path), str(images),
                             "--top", "1", "--device", "cpu"])
    assert [r[0][0] for _, r in results] == _direct_top1(state, images)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == [
        classes[r[0][0]] for _, r in results]


def test_a_folder_without_images_says_what_was_looked_for(tmp_path, checkpoint):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"no images under .*\.png"):
        classify.main(_args(tmp_path, checkpoint[0]))


def test_image_size_is_refused_with_named_weights(images, capsys):
    with pytest.raises(SystemExit):
        classify.main(["--weights", "DEFAULT", "--image-size", "64", str(images)])
    assert "--image-size applies to checkpoint files" in capsys.readouterr().err


def test_an_architecture_without_torchvision_weights_needs_a_checkpoint(images):
    with pytest.raises(ValueError, match="resnet20 has no torchvision weights"):
        classify.main(["--arch", "resnet20", "--weights", "DEFAULT", str(images)])
