"""The deployment commands: ``resnet-fast fuse`` (fold BN, export, reload, report the error)
and ``resnet-fast check`` (parity of resnet_fast vs torchvision on every available backend)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

from . import available_backends
from .backends import device_backends
from .calibrate import calibrate_
from .cli import DTYPES
from .convert import convert, fuse_bn
from .models import TORCHVISION_ARCHS

FORMATS = ("torchscript", "trace", "export", "onnx")  # torchscript = torch.jit.script


def _source_model(arch: str, weights: str | None) -> torch.nn.Module:
    """The torchvision model with a checkpoint (weights_only=True) or calibrated weights."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)()
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model.load_state_dict(state)
        return model.eval()
    return calibrate_(model)


def export(model: torch.nn.Module, example: torch.Tensor, fmt: str, out: Path) -> None:
    """Write ``model`` (a fused torchvision module) in ``fmt`` to ``out``."""
    with torch.no_grad():
        if fmt == "torchscript":
            torch.jit.save(torch.jit.script(model), str(out))
        elif fmt == "trace":
            torch.jit.save(torch.jit.trace(model, (example,)), str(out))
        elif fmt == "export":
            torch.export.save(torch.export.export(model, (example,)), str(out))
        elif fmt == "onnx":
            try:
                import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
            except ImportError as exc:
                raise RuntimeError("ONNX export needs the onnx and onnxscript packages "
                                   "(pip install onnx onnxscript onnxruntime)") from exc
            torch.onnx.export(model, (example,), str(out), dynamo=True)
        else:
            raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def load(fmt: str, path: Path):
    """A callable running the saved artefact (ONNX: through onnxruntime on CPU)."""
    if fmt in ("torchscript", "trace"):
        return torch.jit.load(str(path))
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError as exc:
            raise RuntimeError("reloading ONNX needs onnxruntime (pip install onnxruntime)") from exc
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])
    return torch.export.load(str(path)).module()


def fuse_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="resnet-fast fuse",
                                     description="Fold BN into the convs of a torchvision "
                                                 "checkpoint, export it, reload it and print the "
                                                 "max error vs the original.")
    parser.add_argument("--arch", required=True, choices=TORCHVISION_ARCHS)
    parser.add_argument("--weights", default=None, help="torchvision state_dict checkpoint "
                        "(default: calibrated random weights)")
    parser.add_argument("--format", default="torchscript", choices=FORMATS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    if args.weights and not Path(args.weights).is_file():
        parser.error(f"--weights: no such file {args.weights}")
    dtype = DTYPES[args.dtype]
    original = _source_model(args.arch, args.weights)
    fused = fuse_bn(original).to(dtype)
    x = torch.randn(2, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export(fused, x.to(dtype), args.format, args.out)
    reloaded = load(args.format, args.out)
    with torch.no_grad():
        expected = original(x)
        got = reloaded(x.to(dtype)).float()
    err = (got - expected).abs().max().item()
    print(f"{args.arch}: BN folded, exported as {args.format} to {args.out} "
          f"({args.out.stat().st_size / 2**20:.1f} MiB); reloaded max abs error vs the original "
          f"fp32 model: {err:.3e} (logit scale {expected.abs().max().item():.3g})")
    return 0


def check_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="resnet-fast check",
                                     description="Parity of resnet_fast vs torchvision (eval, "
                                                 "same weights) on every available backend.")
    parser.add_argument("--arch", required=True, choices=TORCHVISION_ARCHS)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max abs error / logit scale counted as a pass (default 1e-4)")
    args = parser.parse_args(argv)
    if args.weights and not Path(args.weights).is_file():
        parser.error(f"--weights: no such file {args.weights}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tv = _source_model(args.arch, args.weights).to(device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size,
                    generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected = tv(x)
    scale = expected.abs().max().item()
    ours = convert(tv)
    failed = False
    serves = device_backends(device.type)
    for backend, status in available_backends().items():
        if backend not in serves:
            continue
        if not status.available:
            print(f"{backend:<10} skipped: {status.detail}")
            continue
        with torch.no_grad():
            err = (ours.set_backend(backend)(x) - expected).abs().max().item()
        ok = err <= args.tolerance * max(scale, 1e-6)
        failed |= not ok
        print(f"{backend:<10} max abs error {err:.3e} ({err / max(scale, 1e-6):.1e} of the "
              f"logit scale) {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(check_main(sys.argv[1:]))
