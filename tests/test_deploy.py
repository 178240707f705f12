"""resnet-fast fuse / check: BN-folded exports reload in a fresh process with matching
outputs; the parity check passes on every available backend."""

import subprocess
import sys

import pytest
import torch
import torchvision

from resnet_fast import deploy
from resnet_fast.cli import main

_RELOAD = """
import sys, torch, torchvision
from resnet_fast import deploy
fmt, path, ckpt = sys.argv[1:4]
model = torchvision.models.resnet18()
model.load_state_dict(torch.load(ckpt, weights_only=True))
model.eval()
x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    err = (deploy.load(fmt, path)(x) - model(x)).abs().max().item()
print(err)
"""


@pytest.mark.parametrize("fmt, suffix", [("torchscript", "pt"), ("trace", "pt"), ("export", "pt2"),
                                         ("onnx", "onnx")])
def test_fuse_exports_and_reloads_in_a_fresh_process(tmp_path, fmt, suffix, capsys):
    torch.manual_seed(3)
    ckpt = tmp_path / "resnet18.pth"
    src = torchvision.models.resnet18()
    from resnet_fast.calibrate import calibrate_
    calibrate_(src, batch_size=2, image_size=64)
    torch.save(src.state_dict(), ckpt)
    out = tmp_path / f"fused.{suffix}"
    assert main(["fuse", "--arch", "resnet18", "--weights", str(ckpt), "--format", fmt,
                 "--out", str(out), "--image-size", "64"]) == 0
    assert "reloaded max abs error" in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-c", _RELOAD, fmt, str(out), str(ckpt)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-4


def test_check_passes_on_every_backend(capsys):
    assert main(["check", "--arch", "resnet18", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "cpu" in out and "FAIL" not in out


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fuse", "--arch", "resnet18", "--weights", "/nope.pth", "--out", "/tmp/x.pt"])
    assert "no such file /nope.pth" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown format 'tflite'"):
        deploy.export(torch.nn.Identity(), torch.zeros(1), "tflite", "/tmp/x")
