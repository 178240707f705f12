"""What a benchmark run writes: :func:`write_outputs` (a JSON file, the source of truth, and a
Markdown table and a PNG plot made from it) and :func:`run_and_write`, which runs the
benchmark and writes them after every batch size. Interrupted (Ctrl-C, SIGTERM), it writes
what it finished, marked ``interrupted``, and returns the signal."""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .env import device_slug


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


@dataclass
class Written:
    """What :func:`run_and_write` wrote: the results (None when it was interrupted before the
    first batch size finished: then nothing was written), the paths, and the signal that
    interrupted the run (None when it finished)."""
    results: Optional[dict] = None
    paths: list[Path] = field(default_factory=list)
    interrupted_by: Optional[signal.Signals] = None


def run_and_write(bench: Callable[..., dict], arch: str, batch_sizes: tuple[int, ...],
                  dtype: torch.dtype, candidates: tuple[str, ...], *,
                  out_dir: Optional[Path] = None, plot: bool = True, **options) -> Written:
    """Runs ``bench`` (:func:`.run` or :func:`.run_train`, given ``options`` as keywords) and
    writes its outputs (:func:`write_outputs`) to ``out_dir`` (default:
    bench-results/<device>) after every batch size. On Ctrl-C or SIGTERM it writes the batch
    sizes it finished again, with an ``interrupted`` field, and returns."""
    written = Written()

    def save(results: dict) -> None:
        folder = out_dir or Path("bench-results") / device_slug(results["environment"])
        written.results = results
        written.paths = write_outputs(results, folder, plot=plot)

    try:
        with sigterm_raises():
            bench(arch, batch_sizes, dtype, candidates, on_batch=save, **options)
    except KeyboardInterrupt as exc:
        written.interrupted_by = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        if written.results is not None:
            done = sorted({r["batch_size"] for r in written.results["runs"]})
            written.results["interrupted"] = (
                f"{written.interrupted_by.name} after batch size(s) "
                f"{', '.join(map(str, done))} of {', '.join(map(str, batch_sizes))}")
            save(written.results)
    return written
