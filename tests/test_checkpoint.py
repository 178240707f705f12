"""The one checkpoint loader (resnet_fast.models.weights.load_checkpoint) that the builders'
``weights=``, ``resnet-fast fuse/check`` and the benchmark share: training scripts' nesting and
DDP's prefix unwrapped, foreign files refused with a message naming the file."""

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast.calibrate import reference_model
from resnet_fast.models.weights import load_checkpoint


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=7).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp", "ddp_in_model"])
def test_training_script_checkpoints_unwrap(tmp_path, state, wrap):
    ddp = {f"module.{k}": v for k, v in state.items()}
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
             "model": {"model": state, "classes": ["a"] * 7}, "ddp": ddp,
             "ddp_in_model": {"model": ddp}}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(saved, path)
    loaded = load_checkpoint(path)
    assert list(loaded) == list(state) and torch.equal(loaded["fc.weight"], state["fc.weight"])
    model = resnet_fast.resnet18(weights=path, num_classes=7)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert reference_model("resnet18", str(path)).fc.out_features == 7  # read from fc.weight


@pytest.mark.parametrize("content, message", [
    (b"", r"expected a PyTorch checkpoint, got an empty file: .*bad\.pth"),
    (b"epoch,loss\n1,0.5\n", r".*bad\.pth is not a PyTorch checkpoint \(\w+ from torch\.load"),
    (b"hello world\n", r".*bad\.pth is not a PyTorch checkpoint \(KeyError from torch\.load"),
    (b"PK\x03\x04 truncated zip", r".*bad\.pth is not a PyTorch checkpoint \(RuntimeError"),
])
def test_foreign_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=message):
        resnet_fast.resnet18(weights=path)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected a checkpoint file, got '.*nope\.pth'"):
        load_checkpoint(tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match=r"list\.pth does not hold a state_dict .* got list"):
        load_checkpoint(path)


@pytest.mark.slow
def test_reference_model_checks_class_count_and_architecture(tmp_path, state):
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"expected num_classes to match the checkpoint's "
                                         r"fc\.weight \(7 classes\), got 10"):
        reference_model("resnet18", str(path), num_classes=10)
    with pytest.raises(ValueError, match=r"resnet34: the weights of .*r18\.pth do not match "
                                         r"the architecture"):
        reference_model("resnet34", str(path))
    assert reference_model("resnet18", num_classes=3).fc.out_features == 3  # calibrated
