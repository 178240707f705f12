"""Timing shared by the model benchmark and the kernel suites: candidates interleaved per
repeat (A B C A B C ...) so machine drift hits all alike; CPU timed with perf_counter around
whole calls, GPU with CUDA events (never wall clock around asynchronous launches); the garbage
collector frozen and off while timing, so a collection never lands in one candidate's repeat."""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import torch


def time_once(fn: Callable[[], object], device: torch.device, inner: int = 1) -> float:
    """Seconds per call, averaged over ``inner`` back-to-back calls (GPU: for calls too short
    for one event pair to resolve)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved(candidates: dict[str, Callable[[], object]], device: torch.device,
                repeats: int, warmup: int = 2, inner: int = 1,
                progress: Optional[Callable[[], None]] = None) -> dict[str, list[float]]:
    """Per-candidate lists of ``repeats`` timings, candidates alternating within each repeat."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
        if progress:
            progress()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with gc_paused():
        for _ in range(repeats):
            for name, fn in candidates.items():
                times[name].append(time_once(fn, device, inner))
                if progress:
                    progress()
    return times


@contextmanager
def gc_paused():
    """Collect once, then freeze every live object and disable the collector (a collection
    scans the whole heap: tens of ms with a compiled model alive); restored on exit."""
    gc.collect()
    gc.freeze()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.unfreeze()


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn``, waiting for the device after each call on a GPU: for timers that read the wall
    clock (pytest-benchmark's own), which would otherwise time the launches alone."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return call


def median_ratio(baseline: Iterable[float], candidate: Iterable[float]) -> float:
    """Median over repeats of baseline_time / candidate_time (> 1: candidate faster)."""
    return statistics.median(b / c for b, c in zip(baseline, candidate))


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1])."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
