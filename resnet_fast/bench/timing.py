"""Timing shared by the model benchmark and the kernel suites.

Candidates run in **rotated warm blocks**: in every round each candidate makes ``warmup``
untimed calls, then a block of timed calls back to back (A A A B B B C C C), and the next
round starts one candidate later (B B B C C C A A A, then C C C A A A B B B, ...). Why not
single interleaved calls (A B C A B C): a candidate's time then depends on who ran just before
it. ONNX Runtime's worker threads keep spinning after a run and slowed the next candidate
1.5-1.9x at batch 1; a runtime whose thread pool went idle while the others ran pays to wake
it (OpenVINO bf16 20% slower than warm). The block's warm-up call absorbs what the previous
candidate left behind, and the rotation still spreads machine drift over all candidates.
Ratios are taken per round (:func:`round_ratio`): the blocks of one round run close together.

CPU calls are timed with perf_counter around whole calls, GPU calls with CUDA events (never
wall clock around asynchronous launches); the garbage collector is frozen and off while
timing, so a collection never lands in one candidate's block.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch

from ..autotune import rotation

# One candidate's timings: per round, the seconds of each timed call of its block.
Blocks = list[list[float]]


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


def block_sizes(repeats: int, block: int) -> list[int]:
    """``repeats`` timed calls split into the fewest rounds of at most ``block`` calls, as
    evenly as possible (10 calls in blocks of 3: 3, 3, 2, 2)."""
    if repeats < 1 or block < 1:
        raise ValueError(f"expected repeats >= 1 and block >= 1, got {repeats} and {block}")
    rounds = math.ceil(repeats / block)
    return [repeats // rounds + (i < repeats % rounds) for i in range(rounds)]


def warm_blocks(candidates: dict[str, Callable[[], object]], device: torch.device,
                repeats: int, block: int, warmup: int = 1, inner: int = 1,
                progress: Optional[Callable[[], None]] = None,
                on_error: Optional[Callable[[str, Exception], None]] = None
                ) -> dict[str, Blocks]:
    """Each candidate's ``repeats`` timings in rotated warm blocks (see the module docstring):
    ``{name: [[s, s, s], [s, s, s], ...]}``, one list per round, rounds in the same order for
    every candidate. ``progress`` is called after every call, warm-up included.

    A call that raises propagates, unless ``on_error`` is given: it then gets the candidate's
    name and the exception, and the candidate is dropped (from the result too) while the
    others go on."""
    times: dict[str, Blocks] = {name: [] for name in candidates}
    with gc_paused():
        for r, calls in enumerate(block_sizes(repeats, block)):
            for name in rotation(list(times), r):  # a failed candidate is gone from times
                fn = candidates[name]
                try:
                    for _ in range(warmup):
                        fn()
                        if progress:
                            progress()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # the warm-up is not in the first timing
                    timed = []
                    for _ in range(calls):
                        timed.append(time_once(fn, device, inner))
                        if progress:
                            progress()
                except Exception as exc:
                    if on_error is None:
                        raise
                    on_error(name, exc)
                    del times[name]
                    continue
                times[name].append(timed)
    return times


def flat(blocks: Blocks) -> list[float]:
    """Every timed call of every round."""
    return [t for round_ in blocks for t in round_]


def round_ratio(baseline: Blocks, candidate: Blocks) -> float:
    """Median over rounds of baseline's median time / candidate's median time in that round
    (> 1: candidate faster). The blocks of one round run close together, so a drift of the
    machine between rounds cancels out of each round's ratio."""
    return statistics.median(statistics.median(b) / statistics.median(c)
                             for b, c in zip(baseline, candidate, strict=True))


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


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1])."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
