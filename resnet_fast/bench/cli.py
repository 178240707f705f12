"""``resnet-fast bench`` (also ``python -m resnet_fast.bench``, ``make bench``): arguments,
then the inference or training run, then the outputs: a JSON file (the source of truth), a
Markdown table and a PNG plot made from it, written after every batch size. Interrupted
(Ctrl-C, SIGTERM), it writes what it finished, marked ``interrupted``, and exits 128 + the
signal's number."""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from ..cli import DTYPES, at_least, batch_sizes, torch_device
from ..models import TORCHVISION_ARCHS
from .candidates import CANDIDATES, GRAD_CANDIDATES
from .env import device_slug
from .training import TRAIN_CANDIDATES


def write_outputs(results: dict, out_dir: Path, plot: bool = True) -> list[Path]:
    """JSON (atomically), Markdown table and PNG plot, named <arch>_<dtype>.* (inference),
    <arch>_<dtype>_grad.* (inference with autograd on) or <arch>_<dtype>_train.* (training
    step); returns the paths written."""
    from . import report

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results['arch']}_{results['dtype']}"
    if results.get("mode") in ("train", "grad"):
        stem += "_" + results["mode"]
    written = []
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    written.append(path)
    md = out_dir / f"{stem}.md"
    md.write_text(report.markdown_table(results) + "\n")
    written.append(md)
    if plot and report.measured_rows(results):  # (nothing to draw when every candidate failed)
        png = out_dir / f"{stem}.png"
        report.plot(results, png)
        written.append(png)
    return written


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, as Ctrl-C's KeyboardInterrupt is."""


@contextmanager
def sigterm_raises():
    """SIGTERM raises :class:`Terminated` in the main thread while inside (a batch job's
    time limit, ``kill``): the run then unwinds and writes what it finished, as on Ctrl-C."""
    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from . import report
    from .inference import run
    from .training import run_train

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

    # This call's own arguments, not sys.argv: from `resnet-fast bench` sys.argv also holds
    # the subcommand, and a caller may pass argv explicitly.
    command = "resnet-fast bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    bench = run_train if args.train else functools.partial(run, grad=args.grad)
    written: dict = {}

    def save(results: dict) -> None:
        out_dir = args.out or Path("bench-results") / device_slug(results["environment"])
        written["results"] = results
        written["paths"] = write_outputs(results, out_dir, plot=not args.no_plot)

    status = 0
    try:
        with sigterm_raises():
            bench(args.arch, batches, dtype, names, repeats=repeats, block=block,
                  warmup=args.warmup, device=device, image_size=args.image_size,
                  weights=args.weights, progress=not args.no_progress, command=command,
                  on_batch=save)
    except KeyboardInterrupt as exc:
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        status = 128 + signum
        if "results" not in written:
            print(f"interrupted ({signum.name}) before the first batch size finished: "
                  "nothing written", file=sys.stderr)
            return status
        results = written["results"]
        done = sorted({r["batch_size"] for r in results["runs"]})
        results["interrupted"] = (f"{signum.name} after batch size(s) "
                                  f"{', '.join(map(str, done))} of {', '.join(map(str, batches))}")
        save(results)
    print(report.format_table(written["results"]))
    for path in written["paths"]:
        print(f"wrote {path}")
    return status
