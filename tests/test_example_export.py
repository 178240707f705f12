"""examples/export.py end to end on a tiny resnet18: the BN-folded export reloads with a dynamic
batch and matches the unfused model, with random weights and with a checkpoint as
examples/finetune.py writes it (nested under 'model', a fine-tuned class count)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision

from resnet_fast.calibrate import calibrate_

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "export.py"


def _load_example():
    # examples/ is not a package: load the script from its path.
    spec = importlib.util.spec_from_file_location("export_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_export_example_with_random_weights_and_a_fine_tuned_checkpoint(tmp_path, capsys):
    example = _load_example()
    out = tmp_path / "r18.pt2"
    result = example.main(["--image-size", "32", "--out", str(out)])
    assert out.is_file() and result["num_classes"] == 1000
    assert "batch 5: logits (5, 1000)" in capsys.readouterr().out

    torch.manual_seed(0)
    tuned = calibrate_(torchvision.models.resnet18(num_classes=4), batch_size=2, image_size=32)
    ckpt = tmp_path / "finetune.pt"
    torch.save({"model": tuned.state_dict(), "classes": ["a", "b", "c", "d"]}, ckpt)
    result = example.main(["--weights", str(ckpt), "--image-size", "32", "--out", str(out)])
    assert result["num_classes"] == 4 and set(result["relative_err"]) == {1, 5}
    assert all(err < 1e-4 for err in result["relative_err"].values()), result
    assert "batch 1: logits (1, 4)" in capsys.readouterr().out
