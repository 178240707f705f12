"""Deployment: :func:`fuse` (fold BN into a torchvision checkpoint's convs, export it, reload the
artefact in a fresh process at two batch sizes and compare) and :func:`check` (parity of
resnet_fast vs torchvision on every available backend); ``resnet-fast fuse`` and
``resnet-fast check`` print what they return.

Every artefact takes one input, ``images`` (N, 3, H, W) with N dynamic (>= 1), in the export
dtype, and returns the logits (N, classes). ONNX also names the output ``logits``; a
torch.export program's output node is named by the op that makes it. The BN-folded model is
plain torchvision, so no artefact references resnet_fast ops: torch (and onnxruntime for ONNX)
loads and runs it without this package.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import available_backends
from ._optional import require
from .backends import device_backends
from .calibrate import reference_model
from .convert import convert, fuse_bn

FORMATS = ("export", "aoti", "onnx", "torchscript")
# The batch sizes the fresh process runs the artefact at; the export example has batch 2, so
# both differ from it.
RELOAD_BATCHES = (1, 3)
# Max abs error vs the fp32 original, as a fraction of its largest logit, counted as a pass.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

__all__ = ["FORMATS", "Deployable", "export", "run_in_fresh_process", "fuse", "check"]


class Deployable(nn.Module):
    """``model`` with its input named ``images``: the name an exported program's callers use."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


def _check_target(fmt: str, out: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"expected a format of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "aoti" and not out.endswith(".pt2"):
        raise ValueError(f"aoti: expected an output path ending in .pt2, got {out}")


def export(model: nn.Module, example: torch.Tensor, fmt: str, out: str | os.PathLike, *,
           opset: Optional[int] = None) -> None:
    """Write ``model`` (eval mode) as ``fmt`` to ``out``, with a dynamic batch dimension.

    ``export``: a torch.export program (``torch.export.load(out).module()``); ``aoti``: that
    program compiled by AOTInductor into a package (``torch._inductor.aoti_load_package``; the
    path must end in .pt2); ``onnx``: the dynamo exporter at ``opset`` (default: torch's),
    input ``images``, output ``logits``; ``torchscript``: ``torch.jit.trace`` (deprecated in
    PyTorch)."""
    out = os.fspath(out)
    _check_target(fmt, out)
    wrapped = Deployable(model).eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        if fmt in ("export", "aoti"):
            program = torch.export.export(wrapped, (example,),
                                          dynamic_shapes={"images": {0: batch}})
            if fmt == "export":
                torch.export.save(program, out)
            else:
                torch._inductor.aoti_compile_and_package(program, package_path=out)
        elif fmt == "onnx":
            require("onnxscript", "onnx", "ONNX export")  # torch.onnx's exporter needs it
            torch.onnx.export(wrapped, (example,), out, dynamo=True, verbose=False,
                              input_names=["images"], output_names=["logits"],
                              dynamic_shapes={"images": {0: batch}}, opset_version=opset)
        else:
            torch.jit.save(torch.jit.trace(wrapped, (example,)), out)


def run_in_fresh_process(fmt: str, path: str | os.PathLike, inputs: list[torch.Tensor],
                         device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The float32 CPU outputs of the artefact ``path`` on each of ``inputs``, computed in a
    fresh Python process that imports torch (and onnxruntime) only, as a deployment would.

    Raises RuntimeError with the process's last error line when it fails."""
    source = Path(__file__).with_name("_reload.py").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.pt")
        torch.save({"inputs": [x.cpu() for x in inputs], "device": str(device)}, data)
        done = subprocess.run([sys.executable, "-c", source, fmt, os.fspath(path), data],
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"reloading {path} in a fresh process failed: {last}")
        return torch.load(data, weights_only=True)["outputs"]


def _writable(out: Path) -> None:
    if out.is_dir():
        raise ValueError(f"expected an output file path, got the directory {out}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot write {out}: cannot create {out.parent} "
                         f"({exc.strerror or exc})") from exc
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"cannot write {out}: {out.parent} is not writable")


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error, that error as a fraction of the largest expected logit)."""
    err = (got.float() - expected.float()).abs().max().item()
    return err, err / max(expected.abs().max().item(), 1e-6)


def _passes(relative: float, tolerance: float) -> bool:
    return math.isfinite(relative) and relative <= tolerance


def artefact_files(fmt: str, out: Path) -> list[Path]:
    """``out`` and every file it refers to: for ONNX, the external data files its initializers
    name (torch's exporter writes the weights beside the model, as ``<name>.data``)."""
    files = [out]
    if fmt == "onnx":
        import onnx

        model = onnx.load(os.fspath(out), load_external_data=False)
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = {e.key: e.value for e in tensor.external_data}["location"]
                path = out.parent / location
                if path not in files:
                    files.append(path)
    return files


def fuse(arch: str, out: str | os.PathLike, *, fmt: str = "export",
         checkpoint: Optional[str] = None, num_classes: Optional[int] = None,
         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         image_size: int = 224, opset: Optional[int] = None,
         tolerance: Optional[float] = None) -> dict:
    """Fold BN into the convs of torchvision ``arch`` (``checkpoint``'s weights, else calibrated
    random ones), cast to ``dtype`` on ``device``, :func:`export` as ``fmt`` to ``out``, then
    run the artefact in a fresh process at batch sizes 1 and 3 on seeded images.

    Returns {"arch", "format", "out", "files", "size_mib", "tolerance", "checks": [{"batch",
    "max_abs_err", "relative_err", "ok"}], "ok"}: ``files`` is every file the artefact needs
    (an ONNX model's external weight data too) and ``size_mib`` their total; a check passes
    when its error, as a fraction of the fp32 original's largest logit, is finite and <=
    ``tolerance`` (default by dtype: 1e-4 float32, 1e-2 float16, 5e-2 bfloat16)."""
    _check_target(fmt, os.fspath(out))
    if fmt == "onnx" and dtype == torch.bfloat16:
        raise ValueError("onnx: expected float32 or float16, got bfloat16 (onnxruntime takes "
                         "numpy arrays, which have no bfloat16)")
    out = Path(out)
    _writable(out)
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    original = reference_model(arch, checkpoint, num_classes)
    fused = fuse_bn(original).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, image_size, image_size, generator=gen)
    export(fused, example.to(device=device, dtype=dtype), fmt, out, opset=opset)
    inputs = [torch.randn(b, 3, image_size, image_size, generator=gen) for b in RELOAD_BATCHES]
    outputs = run_in_fresh_process(fmt, out, [x.to(dtype) for x in inputs], device)
    checks = []
    with torch.no_grad():
        for x, got in zip(inputs, outputs):
            err, relative = _relative_error(got, original(x))
            checks.append({"batch": x.shape[0], "max_abs_err": err, "relative_err": relative,
                           "ok": _passes(relative, tolerance)})
    files = artefact_files(fmt, out)
    return {"arch": arch, "format": fmt, "out": str(out), "files": [str(f) for f in files],
            "size_mib": sum(f.stat().st_size for f in files) / 2**20, "tolerance": tolerance,
            "checks": checks, "ok": all(c["ok"] for c in checks)}


def check(arch: str, *, checkpoint: Optional[str] = None, num_classes: Optional[int] = None,
          batch: int = 2, image_size: int = 224, device: torch.device | str | None = None,
          tolerance: float = 1e-4) -> dict:
    """Parity of resnet_fast vs torchvision ``arch`` (eval, the same weights: ``checkpoint``'s or
    calibrated ones) on every backend that serves ``device`` (default: cuda when visible).

    Returns {"arch", "device", "logit_scale", "tolerance", "backends": {name: {"status": "ok",
    "fail", "skipped" or "error", "max_abs_err", "relative_err", "detail"}}, "ok"}: ``ok`` when
    no backend failed or raised."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tv = reference_model(arch, checkpoint, num_classes).to(device)
    x = torch.randn(batch, 3, image_size, image_size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected = tv(x)
    ours = convert(tv)
    results = {}
    serves = device_backends(device.type)
    for backend, status in available_backends().items():
        if backend not in serves:
            continue
        row = {"status": "skipped", "max_abs_err": None, "relative_err": None, "detail": None}
        results[backend] = row
        if not status.available:
            row["detail"] = status.detail
            continue
        try:
            with torch.no_grad():
                got = ours.set_backend(backend)(x)
        except (RuntimeError, ValueError) as exc:
            row.update(status="error", detail=f"{type(exc).__name__}: {exc}")
            continue
        row["max_abs_err"], row["relative_err"] = _relative_error(got, expected)
        row["status"] = "ok" if _passes(row["relative_err"], tolerance) else "fail"
    return {"arch": arch, "device": str(device), "logit_scale": expected.abs().max().item(),
            "tolerance": tolerance, "backends": results,
            "ok": all(r["status"] in ("ok", "skipped") for r in results.values())}
