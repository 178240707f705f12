"""The one run loop of ``resnet-fast bench``, for inference and for training steps, and the
set-up both share (device, the header every result file starts with).

Per batch size the mode sets up its calls (:class:`Batch`); the loop times each candidate's
first call on its own (compilation, export, autotuning), lets the mode judge the first results
(errors, divergence), measures peak memory (GPU), then runs ``warmup`` calls and ``repeats``
interleaved timed calls with the garbage collector off, and writes one row per candidate:
throughput, latency quantiles, outliers, and per-repeat speedups vs ``eager``, ``eager_cl`` and
the best peer (the fastest torch.compile variant or runtime that ran and did not diverge).
"""

from __future__ import annotations

import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .._optional import require
from .candidates import PEERS
from .env import environment
from .timing import interleaved, median_ratio, quantile

# A repeat slower than this many times the candidate's median is counted as an outlier (a host
# stall, a collection in a peer's own runtime): reported, not dropped.
OUTLIER = 1.5


@dataclass
class Batch:
    """What a mode sets up for one batch size: each candidate's zero-argument call, and a judge
    that turns the first calls' results into each candidate's extra row fields (including
    ``diverged``)."""
    calls: dict[str, Callable[[], object]]
    judge: Callable[[dict[str, object]], dict[str, dict]]


def pick_device(device: Optional[str]) -> torch.device:
    """``device``, else cuda when one is visible, else cpu."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a user of eager PyTorch does
    return dev


def header(arch: str, image_size: int, dtype: torch.dtype, repeats: int, warmup: int,
           weights: Optional[str], device: torch.device, command: Optional[str]) -> dict:
    """The fields every result file starts with; ``command`` defaults to this process's
    arguments."""
    return {"arch": arch, "image_size": image_size, "dtype": str(dtype).replace("torch.", ""),
            "repeats": repeats, "warmup": warmup, "weights": weights or "calibrated (seeded)",
            "environment": environment(device),
            "command": command or "resnet-fast bench " + " ".join(
                shlex.quote(a) for a in sys.argv[1:])}


class _NoBar:
    """What the run loop calls on a progress bar, doing nothing (``--no-progress``: tqdm is
    then not needed)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    tqdm = require("tqdm", "bench", "the benchmark's progress bar").tqdm
    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, mininterval=1.0)


def best_peer(times: dict[str, list[float]], diverged: set[str]) -> Optional[str]:
    """The peer with the lowest median time among those that ran and did not diverge."""
    ran = [n for n in times if n in PEERS and n not in diverged]
    return min(ran, key=lambda n: statistics.median(times[n])) if ran else None


def speed(times: dict[str, list[float]], name: str, batch_size: int,
          peer: Optional[str]) -> dict:
    """A candidate's throughput, latency quantiles, outlier count and per-repeat speedups."""
    ts = times[name]
    median = statistics.median(ts)

    def vs(baseline: Optional[str]) -> Optional[float]:
        return median_ratio(times[baseline], ts) if baseline in times else None

    return {"img_per_s": batch_size / median,
            "latency_ms": {"median": 1e3 * median, "p10": 1e3 * quantile(ts, 0.1),
                           "p90": 1e3 * quantile(ts, 0.9), "max": 1e3 * max(ts)},
            "outliers": sum(t > OUTLIER * median for t in ts),
            "speedup_vs_eager": vs("eager"), "speedup_vs_eager_cl": vs("eager_cl"),
            "speedup_vs_best_peer": vs(peer), "best_peer": peer}


def _peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None  # no per-call allocator statistics for CPU tensors
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_batches(setup: Callable[[int], Batch], batch_sizes, device: torch.device, repeats: int,
                warmup: int, bar) -> list[dict]:
    """The result rows of every candidate at every batch size (see the module docstring)."""
    rows = []
    for bs in batch_sizes:
        batch = setup(bs)
        if "eager" not in batch.calls:
            raise ValueError("the candidates must include 'eager' (the baseline of every ratio)")
        first, first_call = {}, {}
        for name, call in batch.calls.items():
            t0 = time.perf_counter()
            first[name] = call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_call[name] = time.perf_counter() - t0
            bar.update(1)
        fields = batch.judge(first)
        memory = {name: _peak_memory_mb(call, device) for name, call in batch.calls.items()}
        times = interleaved(batch.calls, device, repeats, warmup, progress=bar.update)
        peer = best_peer(times, {n for n, f in fields.items() if f["diverged"]})
        for name, ts in times.items():
            rows.append({"candidate": name, "batch_size": bs, **speed(times, name, bs, peer),
                         "first_call_s": first_call[name], "peak_memory_mb": memory[name],
                         **fields[name], "times_s": ts})
    bar.close()
    return rows
