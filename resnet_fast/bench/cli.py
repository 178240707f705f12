"""``resnet-fast bench`` (also ``python -m resnet_fast.bench``, ``make bench``): arguments,
then the inference or training run, then the outputs: a JSON file (the source of truth), a
Markdown table and a PNG plot made from it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from ..cli import DTYPES, at_least, batch_sizes, torch_device
from ..models import TORCHVISION_ARCHS
from .candidates import CANDIDATES
from .env import device_slug
from .training import TRAIN_CANDIDATES


def write_outputs(results: dict, out_dir: Path, plot: bool = True) -> list[Path]:
    """JSON (atomically), Markdown table and PNG plot, named <arch>_<dtype>.* (inference) or
    <arch>_<dtype>_train.* (training step)."""
    from . import report

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results['arch']}_{results['dtype']}"
    if results.get("mode") == "train":
        stem += "_train"
    written = []
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    written.append(path)
    md = out_dir / f"{stem}.md"
    md.write_text(report.markdown_table(results) + "\n")
    written.append(md)
    if plot:
        png = out_dir / f"{stem}.png"
        report.plot(results, png)
        written.append(png)
    return written


def main(argv: list[str] | None = None) -> int:
    from . import report
    from .inference import run
    from .training import run_train

    parser = argparse.ArgumentParser(
        prog="resnet-fast bench",
        description="Benchmark ResNets: eager, torch.compile, ONNX Runtime, OpenVINO and "
                    "resnet_fast, interleaved on the same weights and input.")
    parser.add_argument("--arch", default="resnet50", choices=TORCHVISION_ARCHS)
    parser.add_argument("--train", action="store_true",
                        help="time a training step (forward, loss, backward, SGD) instead of "
                             "inference")
    parser.add_argument("--batch", type=batch_sizes, default=None,
                        help="comma-separated batch sizes (default: 1,16 on CPU and 1,32,256 on "
                             "GPU; with --train 16 on CPU and 256 on GPU)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: float32 on CPU, bfloat16 on GPU (with --train: the "
                             "autocast dtype; weights stay float32)")
    parser.add_argument("--candidates", default=None,
                        help=f"comma-separated, from {', '.join(CANDIDATES)} (default: all); with "
                             f"--train from {', '.join(TRAIN_CANDIDATES)} (default: all)")
    parser.add_argument("--repeats", type=at_least(1), default=None,
                        help="default: 10 on CPU, 30 on GPU")
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--device", type=torch_device, default=None,
                        help="cpu or cuda[:N] (default: cuda if visible)")
    parser.add_argument("--image-size", type=at_least(1), default=224)
    parser.add_argument("--weights", default=None,
                        help="a torchvision state_dict checkpoint (as resnet-fast fuse takes it; "
                             "the class count is its fc's) instead of calibrated random weights")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: bench-results/<device>)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    device = str(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.startswith("cuda")
    default_batch = ((256,) if gpu else (16,)) if args.train else ((1, 32, 256) if gpu else (1, 16))
    batches = args.batch or default_batch
    allowed = TRAIN_CANDIDATES if args.train else CANDIDATES
    names = tuple(n.strip() for n in (args.candidates or ",".join(allowed)).split(",") if n.strip())
    unknown = [n for n in names if n not in CANDIDATES + TRAIN_CANDIDATES]
    if unknown:
        parser.error(f"--candidates: unknown {', '.join(unknown)}; expected some of "
                     f"{', '.join(allowed)}")
    inference_only = [n for n in names if n not in allowed]
    if inference_only:
        parser.error(f"--candidates: {', '.join(inference_only)} (inference only) cannot run "
                     f"with --train; expected some of {', '.join(allowed)}")
    if "eager" not in names:
        parser.error("--candidates must include eager (the baseline of every ratio)")
    repeats = (30 if gpu else 10) if args.repeats is None else args.repeats
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--out: expected a folder it can write, got {args.out} "
                         f"({exc.strerror or exc})")
    if args.weights and not Path(args.weights).is_file():
        parser.error(f"--weights: no such file {args.weights}")
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]

    # This call's own arguments, not sys.argv: from `resnet-fast bench` sys.argv also holds
    # the subcommand, and a caller may pass argv explicitly.
    command = "resnet-fast bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    bench = run_train if args.train else run
    results = bench(args.arch, batches, dtype, names, repeats, args.warmup, device,
                    args.image_size, args.weights, progress=not args.no_progress, command=command)
    print(report.format_table(results))
    out_dir = args.out or Path("bench-results") / device_slug(results["environment"])
    for path in write_outputs(results, out_dir, plot=not args.no_plot):
        print(f"wrote {path}")
    return 0
