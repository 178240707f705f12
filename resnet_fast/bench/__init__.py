"""Model benchmark: ``python -m resnet_fast.bench`` (also ``resnet-fast bench``, ``make bench``).

ResNet-50 with calibrated weights on this machine's device: eager torchvision (NCHW and
channels_last) against resnet_fast on every backend available here. Candidates are
interleaved in each repeat (A B C A B C ...) so machine drift hits all of them alike; the
table reports median img/s, p10/p90 latency, the median of per-repeat speedups over eager
torchvision and the max abs error of the logits vs fp32 torchvision. JSON is the source of
truth (``--json``); the table is made from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision

from .. import __version__, available_backends, create_model
from .calibrate import calibrate_

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def environment(device: torch.device) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "resnet_fast": __version__,
        "git_commit": _git_commit(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call: perf_counter around the call on CPU, CUDA events on GPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run(arch: str = "resnet50", batch_sizes=(1, 8), repeats: int = 10, warmup: int = 2,
        device: str | None = None, image_size: int = 224) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a user of eager PyTorch does
    torch.manual_seed(0)
    tv = calibrate_(getattr(torchvision.models, arch)()).to(dev)
    tv_cl = getattr(torchvision.models, arch)().to(dev).to(memory_format=torch.channels_last)
    tv_cl.load_state_dict(tv.state_dict())
    tv_cl.eval()

    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "torchvision eager": lambda x: tv(x),
        "torchvision eager channels_last": lambda x: tv_cl(x.contiguous(memory_format=torch.channels_last)),
    }
    status = available_backends()
    serves = {"cpu": ("reference", "cpu"), "cuda": ("reference", "cuda", "triton")}[dev.type]
    skipped = {}
    for backend in serves:
        if not status[backend].available:
            skipped[backend] = status[backend].detail
            continue
        model = create_model(arch, backend=backend).to(dev)
        model.load_state_dict(tv.state_dict())
        model.eval()
        candidates[f"resnet_fast [{backend}]"] = model

    results = {"arch": arch, "image_size": image_size, "dtype": "float32",
               "memory_format": "NCHW input", "repeats": repeats, "warmup": warmup,
               "environment": environment(dev), "skipped_backends": skipped, "runs": []}
    gen = torch.Generator().manual_seed(1)
    for bs in batch_sizes:
        x = torch.randn(bs, 3, image_size, image_size, generator=gen).to(dev)
        with torch.inference_mode():
            truth = tv(x)
            errors = {name: (fn(x) - truth).abs().max().item() for name, fn in candidates.items()}
            for fn in candidates.values():
                for _ in range(warmup):
                    fn(x)
            _sync(dev)
            times: dict[str, list[float]] = {name: [] for name in candidates}
            for _ in range(repeats):
                for name, fn in candidates.items():  # interleaved: A B C A B C ...
                    times[name].append(_time_call(lambda: fn(x), dev))
        base = times["torchvision eager"]
        for name, ts in times.items():
            results["runs"].append({
                "candidate": name, "batch_size": bs,
                "img_per_s": bs / statistics.median(ts),
                "latency_ms": {"median": 1e3 * statistics.median(ts),
                               "p10": 1e3 * _quantile(ts, 0.1), "p90": 1e3 * _quantile(ts, 0.9)},
                "speedup_vs_eager": statistics.median(b / t for b, t in zip(base, ts)),
                "max_abs_err_vs_torchvision": errors[name],
                "times_s": ts,
            })
    return results


def format_table(results: dict) -> str:
    env = results["environment"]
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    lines = [f"{results['arch']}  {results['dtype']}  {results['image_size']}px  calibrated "
             f"weights  on {where}  (torch {env['torch']}, {results['repeats']} interleaved repeats)",
             ""]
    header = f"{'candidate':<34}{'batch':>6}{'img/s':>10}{'p50 ms':>10}{'p90 ms':>10}" \
             f"{'vs eager':>10}{'max err':>11}"
    lines += [header, "-" * len(header)]
    for r in results["runs"]:
        lines.append(f"{r['candidate']:<34}{r['batch_size']:>6}{r['img_per_s']:>10.1f}"
                     f"{r['latency_ms']['median']:>10.2f}{r['latency_ms']['p90']:>10.2f}"
                     f"{r['speedup_vs_eager']:>9.2f}x{r['max_abs_err_vs_torchvision']:>11.2e}")
    for backend, why in results["skipped_backends"].items():
        lines.append(f"(backend {backend} not run: {why})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resnet-fast bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", choices=ARCHS)
    parser.add_argument("--batch-sizes", default="1,8",
                        help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        parser.error(f"--batch-sizes: expected comma-separated integers, got {args.batch_sizes!r}")
    if args.repeats < 1 or any(b < 1 for b in batch_sizes):
        parser.error("--repeats and every batch size must be >= 1")
    results = run(args.arch, batch_sizes, args.repeats, args.warmup, args.device, args.image_size)
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.json)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
