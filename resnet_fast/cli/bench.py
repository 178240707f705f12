"""``resnet-fast bench`` (also ``python -m resnet_fast.bench``, ``make bench``): its arguments,
checked and given this device's defaults, then the benchmark library's
:func:`resnet_fast.bench.run_and_write` (inference or training, the outputs written after
every batch size), then the table and the paths written. Interrupted (Ctrl-C, SIGTERM), it
exits 128 + the signal's number."""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from pathlib import Path

import torch

from ..bench import report, run, run_and_write, run_train
from ..bench.candidates import CANDIDATES, GRAD_CANDIDATES
from ..bench.training import TRAIN_CANDIDATES
from ..models import TORCHVISION_ARCHS
from .args import DTYPES, at_least, batch_sizes, torch_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-fast bench",
        description="Benchmark ResNets: eager, torch.compile, ONNX Runtime, OpenVINO and "
                    "resnet_fast, on the same weights and input, each timed in warm blocks "
                    "rotated across rounds.")
    parser.add_argument("--arch", default="resnet50", choices=TORCHVISION_ARCHS)
    parser.add_argument("--train", action="store_true",
                        help="time a training step (forward, loss, backward, SGD) instead of "
                             "inference")
    parser.add_argument("--grad", action="store_true",
                        help="time inference with autograd on (an eval model called without "
                             "torch.no_grad(): the forward records its graph); candidates from "
                             f"{', '.join(GRAD_CANDIDATES)}")
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
                        help="timed calls per candidate and batch size, in rounds of --block "
                             "(default: 9 on CPU, 30 on GPU)")
    parser.add_argument("--block", type=at_least(1), default=None,
                        help="at most this many timed calls back to back per candidate and "
                             "round; the repeats are split evenly over the fewest rounds "
                             "(default: 3 on CPU, 6 on GPU)")
    parser.add_argument("--warmup", type=at_least(0), default=1,
                        help="untimed calls before each block (default: 1); the first call "
                             "(compilation, export) is timed on its own and never counted")
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
    return parser


def main(argv: list[str]) -> int:
    """``resnet-fast bench`` with the arguments after ``bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)

    device = str(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.startswith("cuda")
    default_batch = ((256,) if gpu else (16,)) if args.train else ((1, 32, 256) if gpu else (1, 16))
    batches = args.batch or default_batch
    if args.train and args.grad:
        parser.error("--train and --grad: expected one of them (a training step always runs "
                     "with autograd)")
    allowed = TRAIN_CANDIDATES if args.train else GRAD_CANDIDATES if args.grad else CANDIDATES
    names = tuple(n.strip() for n in (args.candidates or ",".join(allowed)).split(",") if n.strip())
    unknown = [n for n in names if n not in CANDIDATES + TRAIN_CANDIDATES]
    if unknown:
        parser.error(f"--candidates: unknown {', '.join(unknown)}; expected some of "
                     f"{', '.join(allowed)}")
    refused = [n for n in names if n not in allowed]
    if refused:
        parser.error(f"--candidates: {', '.join(refused)} cannot run with "
                     f"{'--train' if args.train else '--grad'}; expected some of "
                     f"{', '.join(allowed)}")
    if "eager" not in names:
        parser.error("--candidates must include eager (the baseline of every ratio)")
    repeats = (30 if gpu else 9) if args.repeats is None else args.repeats
    block = (6 if gpu else 3) if args.block is None else args.block
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--out: expected a folder it can write, got {args.out} "
                         f"({exc.strerror or exc})")
    if args.weights and Path(args.weights).is_dir():
        parser.error(f"--weights: expected a checkpoint file, got a directory {args.weights}")
    if args.weights and not Path(args.weights).is_file():
        parser.error(f"--weights: no such file {args.weights}")
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]

    command = "resnet-fast bench " + " ".join(shlex.quote(a) for a in argv)
    bench = run_train if args.train else functools.partial(run, grad=args.grad)
    written = run_and_write(bench, args.arch, batches, dtype, names, out_dir=args.out,
                            plot=not args.no_plot, repeats=repeats, block=block,
                            warmup=args.warmup, device=device, image_size=args.image_size,
                            weights=args.weights, progress=not args.no_progress,
                            command=command)
    signum = written.interrupted_by
    if written.results is None:
        print(f"interrupted ({signum.name}) before the first batch size finished: "
              "nothing written", file=sys.stderr)
    else:
        print(report.format_table(written.results))
        for path in written.paths:
            print(f"wrote {path}")
    return 0 if signum is None else 128 + signum
