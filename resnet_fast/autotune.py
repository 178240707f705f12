"""Per-layer kernel choices by measurement: the ``auto`` backend's on CUDA (cuDNN or Triton)
and the CPU plans' (oneDNN or Winograd). Each candidate kernel is timed once per layer key
and the winner kept in memory and on disk.

A layer key is the op, the input's shape, dtype and layout, the weight's shape, the geometry,
and whether a residual and a ReLU are fused; the full key adds the device name and the versions
of torch, cuDNN, triton and resnet_fast, so a new driver stack or another GPU measures again
(on CPU: the CPU model, torch's vector capability, the thread count and the extension's build).
The table is ``autotune.json`` in ``$RESNET_FAST_CACHE_DIR``, else
``$XDG_CACHE_HOME/resnet_fast``, else ``~/.cache/resnet_fast``: JSON written through
``_jsonfile.update`` (locked, atomic, merging, so concurrent writers lose nothing). A corrupt
table is ignored with one warning and rewritten by the next measurement; an unwritable one
warns once and the measured choice is still used for this process. ``RESNET_FAST_AUTOTUNE=0``
never measures: a choice comes from the table or, failing that, from the fixed order of
``backends.resolve``.

The CPU tuner adds to each candidate's time the read of its prepared weight at the memory
bandwidth measured once per process (:func:`cpu_stream_gbs`): the timing loop finds a weight
in cache that a model's forward reads from memory.

Only the first call of a layer key in a process reaches this module (the models' plans keep
the chosen op per input shape), so file reads and environment reads stay off the hot path.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import statistics
import threading
import time
import warnings
from typing import Any, Callable, Optional

import torch

from . import _extension, _jsonfile
from ._version import __version__

CACHE_DIR_ENV = "RESNET_FAST_CACHE_DIR"
AUTOTUNE_ENV = "RESNET_FAST_AUTOTUNE"
CACHE_FILE = "autotune.json"
FORMAT = 1  # the table's layout: {"format": 1, "entries": {full key: {"backend", "ms"}}}
_WHAT = "resnet_fast autotuning cache"

log = logging.getLogger("resnet_fast")


class TuningCacheWarning(UserWarning):
    """The autotuning cache could not be written, or held an entry this version cannot use."""


def cache_path() -> str:
    """Where the autotuning table lives (see the module docstring)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "resnet_fast")
    return os.path.join(root, CACHE_FILE)


def _entries(table: dict[str, Any]) -> dict[str, Any]:
    entries = table.get("entries")
    return entries if table.get("format") == FORMAT and isinstance(entries, dict) else {}


def cached_entries(path: Optional[str] = None) -> int:
    """How many choices the table at ``path`` (default :func:`cache_path`) holds."""
    return len(_entries(_jsonfile.read(path or cache_path(), _WHAT)))


def environment(device: torch.device) -> dict[str, Any]:
    """The part of every key that names the machine: device name and library versions."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"device": name, "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
            "triton": triton_version, "resnet_fast": __version__}


def cuda_time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` on the GPU: ``triton.testing.do_bench`` (CUDA events, the
    L2 cache flushed before each call), after a first call that compiles or searches plans.
    A short budget (about 5 ms of warm-up and 20 ms of timed calls) keeps a model's first
    forward within seconds. Triton is installed wherever this runs: without it ``cuda`` is the
    only candidate and nothing is measured."""
    from triton.testing import do_bench
    fn()
    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def cpu_environment(device: torch.device) -> dict[str, Any]:
    """The machine part of a CPU key: the CPU's model and the vector capability torch uses
    (one model name covers AVX2 and AVX-512 machines), the threads, library versions, and the
    build of our extension (its file's size and time when this process loaded it: a rebuilt
    kernel is measured again, not judged by what an older build measured)."""
    return {"device": "cpu", "cpu": cpu_name(), "capability":
            torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "resnet_fast": __version__, "build": _extension.BUILD}


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), as results and tuning keys name it; read once per
    process (every tuning lookup asks: a model whose weights an optimizer changes rebuilds its
    plans, and looks up their kernels, on every step)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.cache
def cpu_stream_gbs() -> float:
    """GB/s at which this process's threads read a 256 MiB tensor (more than the caches a
    model's weights stay in between two calls of one layer): the best of three sums, measured
    once per process (~0.1 s), at the first CPU layer measured."""
    data = torch.ones(64 << 20)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - t0)
    return data.numel() * data.element_size() / best / 1e9


def cpu_time_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn`` on the CPU (perf_counter), after one untimed call
    that warms caches and thread pools; the CPU tuner takes the median of
    :data:`CPU_ROUNDS` such samples, the candidates interleaved (:class:`Tuner`)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def rotation(names: list[str], round_: int) -> list[str]:
    """``names`` in the order of round ``round_``: starting ``round_`` places later (the
    tuner's rounds and the benchmark's warm blocks)."""
    k = round_ % len(names) if names else 0
    return names[k:] + names[:k]


# Rounds of the CPU tuner: as many calls per candidate as five timed after one warm-up, the
# candidates taking turns (a 2-core host drifts between consecutive blocks of calls).
CPU_ROUNDS = 3


class Tuner:
    """Chooses among candidate kernels per key, measuring each key at most once.

    Args:
        path: the table (default :func:`cache_path`, read when the tuner is made).
        environment: device -> the machine part of the key (default :func:`environment`).
        timer: callable -> its time in ms (default :func:`cuda_time_ms`).
        stream_gbs: callable -> GB/s at which weights stream from memory, for ``choose``'s
            ``weight_bytes`` (default None: weights cost nothing beyond their timing).
        measure: whether a key missing from the table is measured (default: unless
            ``$RESNET_FAST_AUTOTUNE`` is ``0``).
        rounds: samples per candidate, the median kept: each round times every candidate
            once, starting one candidate later than the round before, so a slow spell of
            the machine lands on every candidate's samples instead of deciding the choice
            (default 1).
    """

    def __init__(self, path: Optional[str] = None,
                 environment: Callable[[torch.device], dict[str, Any]] = environment,
                 timer: Callable[[Callable[[], object]], float] = cuda_time_ms,
                 measure: Optional[bool] = None,
                 stream_gbs: Optional[Callable[[], float]] = None, rounds: int = 1) -> None:
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"Tuner: expected rounds to be a positive int, got {rounds!r}")
        self.path = path or cache_path()
        self.environment = environment
        self.timer = timer
        self.rounds = rounds
        self.stream_gbs = stream_gbs
        self.measure = os.environ.get(AUTOTUNE_ENV, "1") != "0" if measure is None else measure
        self._chosen: dict[str, str] = {}
        self._lock = threading.Lock()  # one measurement at a time: timings must not overlap
        self._warned: set[str] = set()

    def choose(self, device: torch.device, layer: dict[str, Any],
               candidates: dict[str, Callable[[], object]], default: str,
               weight_bytes: Optional[dict[str, int]] = None) -> str:
        """The name of the fastest of ``candidates`` (name -> a call of that kernel on the
        layer's real arguments) for ``layer`` on ``device``: from memory, else the table,
        else measured and stored (unless measuring is off: then ``default``).
        ``weight_bytes`` (name -> the bytes of that kernel's prepared weight): where the tuner
        has a ``stream_gbs``, each candidate's measured time gains the time to read its
        weight from memory, as a model's forward reads it (the other layers' weights pass
        through the caches between two calls of one layer) and the timing loop does not (it
        finds the weight in cache)."""
        key = json.dumps({**self.environment(device), **layer}, sort_keys=True)
        chosen = self._chosen.get(key)
        if chosen in candidates:
            return chosen
        with self._lock:
            chosen = self._chosen.get(key)
            if chosen not in candidates:
                chosen = self._look_up(key, candidates, default, weight_bytes or {})
                self._chosen[key] = chosen
        return chosen

    def _look_up(self, key: str, candidates: dict[str, Callable[[], object]],
                 default: str, weight_bytes: dict[str, int]) -> str:
        entry = _entries(_jsonfile.read(self.path, _WHAT)).get(key)
        if entry is not None:
            chosen = entry.get("backend") if isinstance(entry, dict) else None
            if isinstance(chosen, str) and chosen in candidates:  # a list is unhashable
                return chosen
            self._warn("entry", f"ignoring an entry of {self.path} that names none of "
                                f"{sorted(candidates)}: {entry!r}")
        if not self.measure:
            return default
        samples: dict[str, list[float]] = {name: [] for name in candidates}
        for r in range(self.rounds):
            for name in rotation(list(samples), r):  # a failed candidate is gone from samples
                try:
                    samples[name].append(float(self.timer(candidates[name])))
                except Exception as exc:  # a kernel that cannot run this layer loses
                    log.info("resnet_fast autotune: %s failed on %s (%s)", name, key, exc)
                    del samples[name]
        ms = {name: statistics.median(t) for name, t in samples.items()}
        if not ms:
            return default
        bytes_per_ms = None if self.stream_gbs is None else self.stream_gbs() * 1e6
        read_ms = {} if bytes_per_ms is None else {
            name: size / bytes_per_ms for name, size in weight_bytes.items()}
        chosen = min(ms, key=lambda name: ms[name] + read_ms.get(name, 0.0))
        log.info("resnet_fast autotune: %s for %s (ms: %s, weight read ms: %s)", chosen, key, ms,
                 read_ms)

        def store(table: dict[str, Any]) -> None:
            if table.get("format") != FORMAT or not isinstance(table.get("entries"), dict):
                table.clear()
                table.update(format=FORMAT, entries={})
            entry = {"backend": chosen, "ms": ms}
            if read_ms:
                entry["weight_read_ms"] = read_ms
            table["entries"][key] = entry

        try:
            _jsonfile.update(self.path, _WHAT, store)
        except OSError as exc:
            self._warn("write", f"cannot write {self.path} ({exc}); the measured choices are "
                                "used in this process only")
        return chosen

    def _warn(self, kind: str, message: str) -> None:
        """One warning per kind of problem and tuner."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, TuningCacheWarning, stacklevel=4)


_default: Optional[Tuner] = None
_default_cpu: Optional[Tuner] = None
_default_lock = threading.Lock()


def default_tuner() -> Tuner:
    """The process's GPU tuner, made at the first layer that needs one (environment read
    then)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Tuner()
        return _default


def cpu_tuner() -> Tuner:
    """The process's CPU tuner (the plans' choice between oneDNN and Winograd per layer):
    the same table, keys naming the CPU (:func:`cpu_environment`), timed on the CPU in
    :data:`CPU_ROUNDS` interleaved rounds, each candidate's weight read at
    :func:`cpu_stream_gbs` added."""
    global _default_cpu
    with _default_lock:
        if _default_cpu is None:
            _default_cpu = Tuner(environment=cpu_environment, timer=cpu_time_ms,
                                 stream_gbs=cpu_stream_gbs, rounds=CPU_ROUNDS)
        return _default_cpu
