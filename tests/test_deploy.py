"""resnet-fast fuse / check: every export format reloads in a fresh process at two batch sizes
with matching outputs, names its input (ONNX also its output), and a failed check exits 1;
the parity check passes on every available backend."""

import json

import onnxruntime
import pytest
import torch
import torchvision

from resnet_fast import deploy
from resnet_fast._reload import load_artefact
from resnet_fast.calibrate import calibrate_
from resnet_fast.cli import main

CLASSES = 5  # a fine-tuned head: the class count comes from the checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A fine-tuned resnet18 as DDP training scripts save it: nested under 'model', with the
    'module.' prefix."""
    torch.manual_seed(3)
    src = calibrate_(torchvision.models.resnet18(num_classes=CLASSES), batch_size=2,
                     image_size=32)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18_ft.pth"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 7},
               path)
    return path


# Each format once, the dtypes spread over them (aoti compiles C++: ~40 s on 2 cores).
# The onnx one stays in the fast tier (make test-fast).
@pytest.mark.parametrize("fmt, dtype, suffix", [
    pytest.param("export", "float32", "pt2", marks=pytest.mark.slow),
    pytest.param("aoti", "float32", "pt2", marks=pytest.mark.slow), ("onnx", "float16", "onnx"),
    pytest.param("torchscript", "bfloat16", "pt", marks=pytest.mark.slow),
])
def test_fuse_exports_with_a_dynamic_batch_and_reloads_in_a_fresh_process(
        tmp_path, checkpoint, capsys, fmt, dtype, suffix):
    out = tmp_path / "deep" / f"fused.{suffix}"
    assert main(["fuse", "--arch", "resnet18", "--weights", str(checkpoint), "--format", fmt,
                 "--dtype", dtype, "--image-size", "32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported as {fmt} to {out}" in printed
    assert "batch 1 " in printed and "batch 3 " in printed  # neither is the export's batch 2
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (images,), (logits,) = session.get_inputs(), session.get_outputs()
        assert (images.name, logits.name) == ("images", "logits")
        assert isinstance(images.shape[0], str) and logits.shape[1] == CLASSES
    if fmt == "export":
        program = torch.export.load(str(out))
        assert program.graph_signature.user_inputs == ("images",)
        # Plain aten ops: the BN-folded model is torchvision's, nothing of resnet_fast's.
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not any("resnet_fast" in t for t in targets), targets
        assert load_artefact(fmt, str(out))(torch.randn(6, 3, 32, 32)).shape == (6, CLASSES)


@pytest.mark.slow
def test_a_non_finite_reload_error_fails_the_fuse(tmp_path, checkpoint, capsys):
    state = torch.load(checkpoint, weights_only=True)["model"]
    state["module.fc.weight"][0, 0] = float("nan")
    nan_ckpt = tmp_path / "nan.pth"
    torch.save(state, nan_ckpt)
    assert main(["fuse", "--arch", "resnet18", "--weights", str(nan_ckpt), "--format",
                 "torchscript", "--image-size", "32", "--out", str(tmp_path / "nan.pt")]) == 1
    captured = capsys.readouterr()
    assert "nan" in captured.out
    assert captured.err.startswith("resnet-fast fuse: error: reload check failed")
    assert main(["check", "--arch", "resnet18", "--weights", str(nan_ckpt), "--image-size",
                 "32", "--json"]) == 1
    # Strict JSON: the NaN error is the string "nan".
    result = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)
    reference = result["backends"]["reference"]
    assert not result["ok"] and reference["status"] == "fail" and reference["max_abs_err"] == "nan"


@pytest.mark.slow
def test_check_passes_on_every_backend(capsys):
    assert main(["check", "--arch", "resnet18", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "cpu" in out and "FAIL" not in out
    assert main(["check", "--arch", "resnet18", "--image-size", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["backends"]["reference"]["status"] == "ok"
    assert set(result["backends"]) <= {"reference", "cpu", "cuda", "triton"}


def test_export_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"expected a format of export, aoti, onnx, "
                                         r"torchscript, got 'tflite'"):
        deploy.export(torch.nn.Identity(), torch.zeros(1), "tflite", tmp_path / "x")
    with pytest.raises(ValueError, match=r"aoti: expected an output path ending in \.pt2"):
        deploy.export(torch.nn.Identity(), torch.zeros(2, 3), "aoti", tmp_path / "x.so")
    with pytest.raises(ValueError, match=r"onnx: expected float32 or float16, got bfloat16"):
        deploy.fuse("resnet18", tmp_path / "x.onnx", fmt="onnx", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected an output file path, got the directory"):
        deploy.fuse("resnet18", tmp_path)
