"""The ``resnet-fast`` command (also ``python -m resnet_fast``): ``bench``, ``check``, ``fuse``
and ``backends``, each with ``--help``. The command's argument parsing is all in this
package: the command's own, ``check``'s, ``fuse``'s and ``backends``' here, ``bench``'s in
:mod:`.bench` (imported only for that command: the others do not load the benchmark), the
argument types they share in :mod:`.args`. The work is the libraries':
:mod:`resnet_fast.deploy` and :mod:`resnet_fast.bench`.

Exit status: 0 on success; 1 when a check fails or the command stops on an error, printed as
one line ``resnet-fast <command>: error: ...`` (with the traceback under ``--debug``); 2 for
arguments it does not accept.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from pathlib import Path

import torch

from .. import __version__
from .args import DTYPES, at_least, positive_finite, torch_device

# What our code raises for a bad input or an environment that cannot run the command
# (BackendUnavailableError is a RuntimeError; a missing optional package an ImportError naming
# the extra to install): one line, no traceback.
ERRORS = (ValueError, RuntimeError, OSError, ImportError, pickle.UnpicklingError)


def _json(obj) -> str:
    """``obj`` as strict JSON: a NaN or infinite error (a failed check) becomes "nan", "inf"."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return [finite(v) for v in value] if isinstance(value, list) else value
    return json.dumps(finite(obj), indent=1, allow_nan=False)


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def environment_report() -> dict:
    """Versions, CUDA, CPU capability, whether the C++ extension loaded (and why not), every
    backend with whether it works here, and the autotuning cache: what ``resnet-fast
    backends`` prints."""
    from .. import _extension, autotune, available_backends
    from ..bench.env import environment

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {**environment(dev),
            "torch_cuda": torch.version.cuda,
            "cuda_devices": [torch.cuda.get_device_name(i)
                             for i in range(torch.cuda.device_count())],
            "extension": {"loaded": _extension.loaded(), "error": _extension.LOAD_ERROR},
            "backends": {name: {"available": status.available, "detail": status.detail}
                         for name, status in available_backends().items()},
            "autotune_cache": {"path": autotune.cache_path(),
                               "entries": autotune.cached_entries()}}


def backends_main(args: argparse.Namespace) -> int:
    report = environment_report()
    if args.json:
        print(_json(report))
        return 0
    for key, value in report.items():
        if key not in ("extension", "backends", "autotune_cache"):
            print(f"{key:<14} {value}")
    ext = report["extension"]
    print(f"{'extension':<14} " + ("loaded" if ext["loaded"] else f"not loaded: {ext['error']}"))
    cache = report["autotune_cache"]
    print(f"{'autotune cache':<14} {cache['path']} ({cache['entries']} entries)")
    print("\nbackends:")
    for name, status in report["backends"].items():
        print(f"  {name:<10} {'yes' if status['available'] else 'no ':<4} {status['detail']}")
    return 0


def check_main(args: argparse.Namespace) -> int:
    from ..deploy import check

    result = check(args.arch, checkpoint=args.weights, num_classes=args.num_classes,
                   batch=args.batch, image_size=args.image_size, device=args.device,
                   tolerance=args.tolerance)
    if args.json:
        print(_json(result))
    else:
        scale = result["logit_scale"]
        print(f"{args.arch} on {result['device']}, batch {args.batch}, logit scale {scale:.3g}")
        for name, row in result["backends"].items():
            if row["status"] in ("skipped", "error"):
                print(f"{name:<10} {row['status']}: {row['detail']}")
            else:
                print(f"{name:<10} max abs error {row['max_abs_err']:.3e} "
                      f"({row['relative_err']:.1e} of the logit scale) {row['status'].upper()}")
    if not result["ok"]:
        bad = [n for n, r in result["backends"].items() if r["status"] in ("fail", "error")]
        print(f"resnet-fast check: error: {', '.join(bad)} outside the tolerance "
              f"{args.tolerance:g} of the logit scale or raised", file=sys.stderr)
        return 1
    return 0


def fuse_main(args: argparse.Namespace) -> int:
    from ..deploy import fuse

    result = fuse(args.arch, args.out, fmt=args.format, checkpoint=args.weights,
                  num_classes=args.num_classes, dtype=DTYPES[args.dtype], device=args.device,
                  image_size=args.image_size, opset=args.opset, tolerance=args.tolerance)
    errors = ", ".join(f"batch {c['batch']} {c['max_abs_err']:.3e} ({c['relative_err']:.1e})"
                       for c in result["checks"])
    print(f"{args.arch}: BN folded, exported as {args.format} to {args.out} "
          f"({result['size_mib']:.1f} MiB in {len(result['files'])} file"
          f"{'s' if len(result['files']) > 1 else ''}); reloaded in a fresh process, max abs "
          f"error vs the fp32 original (of its logit scale): {errors}")
    if not result["ok"]:
        print(f"resnet-fast fuse: error: reload check failed: an error is not finite or above "
              f"{result['tolerance']:g} of the logit scale", file=sys.stderr)
        return 1
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``check`` and ``fuse`` share: which torchvision model, with which weights."""
    from ..models import TORCHVISION_ARCHS

    parser.add_argument("--arch", required=True, choices=TORCHVISION_ARCHS)
    parser.add_argument("--weights", default=None,
                        help="a torchvision state_dict checkpoint, also nested under 'state_dict' "
                             "or 'model' or saved from DDP ('module.' prefix); loaded with "
                             "weights_only=True (default: calibrated random weights)")
    parser.add_argument("--num-classes", type=at_least(1), default=None,
                        help="the class count (default: the checkpoint's fc.weight rows, else "
                             "1000); with --weights it must match the checkpoint")
    parser.add_argument("--image-size", type=at_least(1), default=224)


def build_parser() -> argparse.ArgumentParser:
    from ..deploy import FORMATS

    parser = argparse.ArgumentParser(
        prog="resnet-fast", description="Fused-kernel ResNets: benchmark, parity check, BN-folded "
                                        "export, backend report.",
        epilog="Exit status: 0 ok, 1 a failed check or an error, 2 bad arguments.")
    parser.add_argument("--version", action="version", version=f"resnet-fast {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    # bench has its own parser (.bench), built only for that command: its arguments go
    # there untouched.
    commands.add_parser("bench", add_help=False,
                        help="benchmark ResNets: eager, torch.compile, ONNX Runtime, OpenVINO and "
                             "resnet_fast (resnet-fast bench --help)")

    check = commands.add_parser(
        "check", help="parity of resnet_fast vs torchvision on every available backend",
        description="Parity of resnet_fast vs torchvision (eval, same weights) on every "
                    "backend that serves the device; exits 1 when one fails or raises.")
    _model_arguments(check)
    check.add_argument("--batch", type=at_least(1), default=2)
    check.add_argument("--device", type=torch_device, default=None,
                       help="cpu or cuda[:N] (default: cuda if visible)")
    check.add_argument("--tolerance", type=positive_finite, default=1e-4,
                       help="max abs error / logit scale counted as a pass (default 1e-4)")
    check.add_argument("--json", action="store_true", help="print the results as JSON")
    check.set_defaults(run=check_main)

    fuse = commands.add_parser(
        "fuse", help="fold BN into a checkpoint's convs, export, reload, report the error",
        description="Fold BN into the convs of a torchvision checkpoint, export it with a "
                    "dynamic batch dimension, reload the artefact in a fresh Python process "
                    "(torch, and onnxruntime for ONNX, only: no resnet_fast or torchvision "
                    "code) at batch sizes 1 and 3, and compare with the original; exits 1 "
                    "when an error is not finite or above the tolerance. Every artefact takes "
                    "one input, images (N, 3, H, W) in --dtype, and returns the logits (N, "
                    "classes); ONNX names them images and logits.")
    _model_arguments(fuse)
    fuse.add_argument("--format", default="export", choices=FORMATS,
                      help="export: torch.export program, .pt2 (torch.export.load(path)"
                           ".module()); aoti: AOTInductor package, .pt2 "
                           "(torch._inductor.aoti_load_package(path)), compiled for --device; "
                           "onnx: dynamo exporter, run by onnxruntime; torchscript: "
                           "torch.jit.trace, deprecated in PyTorch (default: export)")
    fuse.add_argument("--out", type=Path, required=True, help="the artefact's path")
    fuse.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    fuse.add_argument("--device", type=torch_device, default=torch.device("cpu"),
                      help="where the artefact runs: cpu or cuda[:N] (default: cpu)")
    fuse.add_argument("--opset", type=at_least(7), default=None,
                      help="ONNX opset version (default: torch.onnx's)")
    fuse.add_argument("--tolerance", type=positive_finite, default=None,
                      help="max abs error / logit scale counted as a pass (default: 1e-4 "
                           "float32, 1e-2 float16, 5e-2 bfloat16)")
    fuse.set_defaults(run=fuse_main)

    backends = commands.add_parser(
        "backends", help="versions, CUDA, CPU capability, the C++ extension and every kernel "
                         "backend: what works here and why not",
        description="Versions, CUDA, CPU capability, whether the C++ extension loaded (and why "
                    "not) and every kernel backend with whether it works here. Also "
                    "python -m resnet_fast.doctor.")
    backends.add_argument("--json", action="store_true", help="print the report as JSON")
    backends.set_defaults(run=backends_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "bench":
            from .bench import main as bench_main
            return bench_main(rest)
        return args.run(args)
    except ERRORS as exc:
        if args.debug:
            raise
        print(f"resnet-fast {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
