"""The one run loop of ``resnet-fast bench``, for inference and for training steps, and the
set-up both share (device, the header every result file starts with).

Per batch size the mode sets up its calls (:class:`Batch`); the loop makes each candidate's
first calls (the first timed on its own: compilation, export, autotuning) and measures its peak
memory (GPU), lets the mode judge the first results (errors, divergence), then times the
candidates in rotated warm blocks (:mod:`.timing`) with the garbage collector off, and adds
one row per candidate: throughput, latency quantiles, outliers, and per-round speedups vs
``eager``, ``eager_cl`` and the best peer (the fastest torch.compile variant or runtime that
ran and did not diverge).

A candidate that raises (an ``Exception``) in its first calls or while timed gets a row that
says so (``failed``) and the others go on; when ``eager`` fails before it is timed, the others
are not run at that batch size (every error and ratio is judged against it). The mode writes
its results after every batch size, so an interrupted run keeps what it finished.
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
from .timing import Blocks, block_sizes, flat, quantile, round_ratio, warm_blocks

# A timed call slower than this many times the candidate's median is counted as an outlier (a
# host stall, a collection in a peer's own runtime): reported, not dropped.
OUTLIER = 1.5


@dataclass
class Batch:
    """What a mode sets up for one batch size: each candidate's zero-argument call, and a judge
    that turns the results of each candidate's first ``judged_calls`` calls (a list per
    candidate, for the candidates whose calls did not raise, ``eager`` among them) into each
    candidate's extra row fields (including ``diverged``)."""
    calls: dict[str, Callable[[], object]]
    judge: Callable[[dict[str, list]], dict[str, dict]]
    judged_calls: int = 1


@dataclass(frozen=True)
class Schedule:
    """How each candidate is timed at each batch size: ``repeats`` timed calls in rounds of at
    most ``block`` back-to-back calls, each block after ``warmup`` untimed calls."""
    repeats: int
    block: int
    warmup: int

    @property
    def rounds(self) -> int:
        return len(block_sizes(self.repeats, self.block))

    def calls(self, judged_calls: int) -> int:
        """Every call a candidate makes at one batch size (for the progress bar)."""
        return judged_calls + self.rounds * self.warmup + self.repeats


def pick_device(device: Optional[str]) -> torch.device:
    """``device``, else cuda when one is visible, else cpu."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a user of eager PyTorch does
    return dev


def header(arch: str, image_size: int, dtype: torch.dtype, schedule: Schedule,
           weights: Optional[str], device: torch.device, command: Optional[str]) -> dict:
    """The fields every result file starts with; ``command`` defaults to this process's
    arguments."""
    return {"arch": arch, "image_size": image_size, "dtype": str(dtype).replace("torch.", ""),
            "repeats": schedule.repeats, "block": schedule.block, "rounds": schedule.rounds,
            "warmup": schedule.warmup,
            "timing": "rotated warm blocks: per round, each candidate's warmup untimed calls, "
                      "then up to block timed calls back to back; the order starts one "
                      "candidate later every round; ratios are medians of per-round ratios",
            "weights": weights or "calibrated (seeded)",
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


def best_peer(times: dict[str, Blocks], diverged: set[str]) -> Optional[str]:
    """The peer with the lowest median time among those that ran and did not diverge."""
    ran = [n for n in times if n in PEERS and n not in diverged]
    return min(ran, key=lambda n: statistics.median(flat(times[n]))) if ran else None


def speed(times: dict[str, Blocks], name: str, batch_size: int,
          peer: Optional[str]) -> dict:
    """A candidate's throughput, latency quantiles over all its timed calls, outlier count and
    per-round speedups (:func:`.timing.round_ratio`)."""
    ts = flat(times[name])
    median = statistics.median(ts)

    def vs(baseline: Optional[str]) -> Optional[float]:
        return round_ratio(times[baseline], times[name]) if baseline in times else None

    return {"img_per_s": batch_size / median,
            "latency_ms": {"median": 1e3 * median, "p10": 1e3 * quantile(ts, 0.1),
                           "p90": 1e3 * quantile(ts, 0.9), "max": 1e3 * max(ts)},
            "outliers": sum(t > OUTLIER * median for t in ts),
            "speedup_vs_eager": vs("eager"), "speedup_vs_eager_cl": vs("eager_cl"),
            "speedup_vs_best_peer": vs(peer), "best_peer": peer}


def failure(exc: BaseException) -> str:
    """What a failed row says: the exception's type and message."""
    return f"{type(exc).__name__}: {exc}"


def _peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None  # no per-call allocator statistics for CPU tensors
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_batches(setup: Callable[[int], Batch], batch_sizes, device: torch.device,
                schedule: Schedule, results: dict, on_batch: Optional[Callable[[dict], None]],
                progress: bool, desc: str) -> dict:
    """Appends each batch size's rows (every candidate's, failed ones included, in the order
    of ``Batch.calls``) to ``results["runs"]`` and hands ``results`` to ``on_batch`` as soon as
    that batch size is measured (see the module docstring); returns ``results``."""
    results["runs"] = []
    bar = None
    try:
        for bs in batch_sizes:
            batch = setup(bs)
            if "eager" not in batch.calls:
                raise ValueError("the candidates must include 'eager' (the baseline of every "
                                 f"ratio), got {', '.join(batch.calls)}")
            if bar is None:
                bar = progress_bar(len(batch_sizes) * len(batch.calls)
                                   * schedule.calls(batch.judged_calls), desc, progress)
            results["runs"] += _measure(batch, bs, device, schedule, bar)
            if on_batch:
                on_batch(results)
    finally:
        if bar is not None:
            bar.close()
    return results


def _measure(batch: Batch, bs: int, device: torch.device, schedule: Schedule,
             bar) -> list[dict]:
    outputs, first_call, memory, failed = {}, {}, {}, {}
    for name, call in batch.calls.items():
        try:
            t0 = time.perf_counter()
            outs = [call()]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first_call[name] = time.perf_counter() - t0
            outs += [call() for _ in range(batch.judged_calls - 1)]
            memory[name] = _peak_memory_mb(call, device)
        except Exception as exc:  # the candidate's failure, not the run's: the others go on
            failed[name] = failure(exc)
        else:
            outputs[name] = outs
        bar.update(batch.judged_calls)
    if "eager" in failed:
        failed.update({n: "not run: eager failed (the baseline of every error and ratio)"
                       for n in outputs})
        outputs = {}
    fields = batch.judge(outputs) if outputs else {}

    def timing_failed(name: str, exc: Exception) -> None:
        failed[name] = failure(exc)

    times = warm_blocks({n: batch.calls[n] for n in outputs}, device, schedule.repeats,
                        schedule.block, schedule.warmup, progress=bar.update,
                        on_error=timing_failed)
    peer = best_peer(times, {n for n, f in fields.items() if f["diverged"]})
    rows = []
    for name in batch.calls:
        row = {"candidate": name, "batch_size": bs}
        if name in failed:
            row["failed"] = failed[name]
        else:
            row.update(speed(times, name, bs, peer))
        if name in first_call:
            row.update(first_call_s=first_call[name], peak_memory_mb=memory.get(name))
        row.update(fields.get(name, {}))
        if name in times:
            row["times_s"] = times[name]
        rows.append(row)
    return rows
