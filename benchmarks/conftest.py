"""Kernel benchmarks (pytest-benchmark): `make bench-kernels`, or
`pytest benchmarks/ --benchmark-json=out.json`. Each benchmark also times the eager PyTorch
baseline with ours, in rotated warm blocks (`resnet_fast.bench.timing`), and stores GB/s and
the same-run ratio in extra_info; a table of those is printed at the end.

With --benchmark-disable (`make test`'s smoke run, so that the suites cannot rot) every
candidate is called once, cold: that is not a measurement, and the table says so instead of
printing numbers."""

import os

import pytest
import torch

from resnet_fast import available_backends
from resnet_fast.bench.timing import warm_blocks

_ROWS = []
BLOCK = 5  # timed calls per candidate and round


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def batch_sizes(device_type: str) -> list[int]:
    """Batches to run: 1, 32, 256 on GPU; 1 and 32 on CPU (256 makes 0.8 GB tensors), or the
    comma-separated list in RESNET_FAST_BENCH_BATCHES."""
    env = os.environ.get("RESNET_FAST_BENCH_BATCHES")
    if env:
        return [int(b) for b in env.split(",")]
    return [1, 32, 256] if device_type == "cuda" else [1, 32]


def devices_and_backends():
    out = []
    status = available_backends()
    if status["cpu"].available:
        out.append(("cpu", "cpu"))
    if torch.cuda.is_available():
        for b in ("cuda", "triton"):
            if status[b].available:
                out.append(("cuda", b))
    return out


def timed(benchmark, candidates: dict, device: torch.device, repeats: int, inner: int = 1):
    """The candidates' timings in rotated warm blocks of ``BLOCK`` (``repeats`` each), or one
    cold call each when benchmarking is disabled (the smoke run)."""
    if benchmark.disabled:
        return warm_blocks(candidates, device, repeats=1, block=1, warmup=0)
    return warm_blocks(candidates, device, repeats, BLOCK, warmup=1, inner=inner)


@pytest.fixture
def record(benchmark):
    def _record(row):
        _ROWS.append({**row, "smoke": benchmark.disabled})
    return _record


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    smoke = [r for r in _ROWS if r["smoke"]]
    if smoke:
        tr.section("kernel suites: smoke run")
        tr.write_line(f"{len(smoke)} cases ran with benchmarking disabled: one cold call per "
                      "candidate, not a measurement; no throughput or ratios shown")
    rows = [r for r in _ROWS if not r["smoke"]]
    if not rows:
        return
    tr.section("kernel throughput (same-run ratios vs eager PyTorch)")
    header = (f"{'op':<28}{'device':<8}{'backend':<8}{'dtype':<10}{'shape':<22}"
              f"{'ours GB/s':>10}{'eager GB/s':>11}{'ratio':>8}")
    if any("ours_gbps" in r for r in rows):
        tr.write_line(header)
        tr.write_line("-" * len(header))
    for r in (r for r in rows if "ours_gbps" in r):
        tr.write_line(f"{r['op']:<28}{r['device']:<8}{r['backend']:<8}{r['dtype']:<10}"
                      f"{str(tuple(r['shape'])):<22}{r['ours_gbps']:>10.1f}{r['eager_gbps']:>11.1f}"
                      f"{r['ratio']:>7.2f}x")
    for r in (r for r in rows if "layers" in r):
        tr.write_line("")
        tr.write_line(f"{r['op']}  {r['device']}/{r['backend']}  {r['dtype']}  batch {r['shape'][0]}: "
                      f"ours {r['ours_ms']:.2f} ms, eager {r['eager_ms']:.2f} ms, "
                      f"ratio {r['ratio']:.2f}x")
        for layer in r["layers"]:
            tr.write_line(f"    {layer['layer']:<24}{layer['role']:<10}{str(layer['input']):<18}"
                          f"ours {layer['ours_ms']:8.3f} ms  eager {layer['eager_ms']:8.3f} ms  "
                          f"{layer['ratio_vs_eager']:5.2f}x  {layer['ours_tflops']:.2f} TFLOP/s")
