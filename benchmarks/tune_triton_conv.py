"""Tunes the Triton conv per shape and writes its config table.

On a GPU: for every distinct conv of ResNet-18, ResNet-50 and ResNeXt-50 (32x4d) at 224px,
batch 32 and 256, bfloat16 and float16, times the candidate configs (the autotune list with
GROUP_M 8, with split-K variants where the output has fewer tiles than the SMs, and the
heuristic config) with ``triton.testing.do_bench``, and cuDNN's fused conv + bias + ReLU
(``torch.cudnn_convolution_relu``, ``cudnn.benchmark`` on) as the baseline. Each config's
output is held to the project's tolerance rule against a float64 truth (:func:`error_limit`);
one past it is rejected, whatever its speed. The fastest config within the rule per shape is
merged into the config table (``resnet_fast._jsonfile.update``, keyed by device name, Triton
version and ``conv.shape_key``), and a per-layer JSON records every shape's times, errors,
rejections and ratios with the environment.

    python benchmarks/tune_triton_conv.py [--archs resnet50] [--batches 256] [--dtypes bfloat16]

merges into the package's table and benchmarks/results/<gpu>/triton_conv_tune.json after
every conv, so a run cut short keeps what it measured and runs over subsets add up.

``--smoke`` runs one tiny shape with one config on the CPU under Triton's interpreter (timed
with perf_counter against F.conv2d + bias + ReLU), so a test can run the whole script.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ARCHS = ("resnet18", "resnet50", "resnext50_32x4d")
BATCHES = (32, 256)
DTYPES = ("bfloat16", "float16")
# (conv as distinct_convs gives it, dtype, batch) of --smoke
SMOKE = ((16, 32, 3, 1, 1, 1, 1, 5), torch.float32, 2)


def _candidates(conv, gemm_m: int, sms: int, dtype: torch.dtype) -> list[dict]:
    from resnet_fast.kernels.triton import conv as tconv
    c_in, c_out, k, stride, _, _, groups, _ = conv
    out = []
    for bm, bn, bk, warps, stages in tconv.search_tiles(dtype):
        base = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=1, num_warps=warps,
                    num_stages=stages)
        out.append(base)
        ctas = -(-gemm_m // bm) * -(-(c_out // groups) // bn) * groups
        k_steps = k * k * -(-(c_in // groups) // bk)
        split = tconv.split_k(ctas, k_steps, sms)
        if split > 1:
            out.append(dict(base, SPLIT_K=split))
    heuristic = tconv.heuristic_config(gemm_m, c_out // groups, c_in // groups, k, k, groups,
                                       sms, dtype)
    return out if heuristic in out else [*out, heuristic]


def error_limit(reference_err: float, magnitude: float, dtype: torch.dtype) -> float:
    """The tolerance rule the tests hold every kernel to (docs/design.md, Tolerances;
    tests/_numerics.py): the max abs error against a float64 truth may be at most 2x the
    same-dtype PyTorch conv's error against that truth, plus two units of the dtype's
    precision at ``magnitude``, the largest term summed."""
    return 2 * reference_err + 2 * torch.finfo(dtype).eps * max(1.0, magnitude)


def select(measured: list[tuple[float, dict, float]], limit: float
           ) -> tuple[tuple[float, dict, float] | None, list[tuple[float, dict, float]]]:
    """(the fastest (ms, config, error) of ``measured`` whose error is within ``limit`` or
    None, the ones rejected for their error): a fast wrong config must not reach the table."""
    rejected = [m for m in measured if not m[2] <= limit]  # NaN errors are rejected too
    kept = [m for m in measured if m[2] <= limit]
    return (min(kept, key=lambda m: m[0]) if kept else None), rejected


def _timer(device: torch.device):
    if device.type == "cuda":
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])
        return bench

    def bench(fn):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return bench


def _tensors(conv, dtype, batch, device):
    c_in, c_out, k, _, _, _, groups, h = conv
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, h, h, generator=g).to(device, dtype)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g) / (c_in // groups * k * k) ** 0.5
    b = torch.randn(c_out, generator=g)
    cl = torch.channels_last
    return (x.contiguous(memory_format=cl), w.to(device, dtype).contiguous(memory_format=cl),
            b.to(device, dtype))


def _conv_relu(x, w, b, stride, pad, dil, groups):
    return F.conv2d(x, w, b, stride, pad, dil, groups).relu_()


def tune_one(conv, dtype, batch, device: torch.device, configs_for, timer) -> dict:
    """Times each config of ``configs_for(conv, gemm_m, dtype)`` and the baseline (before and
    after them) on one conv; the row of the per-layer JSON, with the fastest config within the
    tolerance rule as ``best`` (None when none is)."""
    from resnet_fast.kernels.triton import conv as tconv
    x, w, b = _tensors(conv, dtype, batch, device)
    c_in, c_out, k, stride, pad, dil, groups, h = conv
    geo = ((stride,) * 2, (pad,) * 2, (dil,) * 2)
    p = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    gemm_m = batch * p * p
    if device.type == "cuda":
        baseline = functools.partial(torch.cudnn_convolution_relu, x, w, b, *geo, groups)
    else:
        baseline = functools.partial(_conv_relu, x, w, b, stride, pad, dil, groups)
    xd, wd, bd = x.double(), w.double(), b.double()
    truth = F.conv2d(xd, wd, bd, stride, pad, dil, groups).relu_()
    magnitude = (F.conv2d(xd.abs(), wd.abs(), bd.abs(), stride, pad, dil, groups)
                 .max().item())
    del xd, wd, bd

    def error(out):
        return (out.double() - truth).abs().max().item()

    reference_err = error(baseline())
    limit = error_limit(reference_err, magnitude, dtype)
    base_ms = [timer(baseline)]
    times = []
    for config in configs_for(conv, gemm_m, dtype):
        ours = functools.partial(tconv.conv_bias_act, x, w, b, *geo, groups, None, True,
                                 config=config)
        try:
            times.append((timer(ours), config, error(ours())))
        except Exception as exc:  # out of shared memory or registers on this GPU
            print(f"  {conv} {config}: {type(exc).__name__}: {exc}", file=sys.stderr)
    base_ms.append(timer(baseline))
    baseline_ms = statistics.mean(base_ms)
    best, rejected = select(times, limit)
    for _, config, err in rejected:
        print(f"  {conv} {config}: rejected, error {err:.3g} vs the float64 truth exceeds "
              f"{limit:.3g} (2x the baseline's {reference_err:.3g} + floor)", file=sys.stderr)
    best_ms, best_config, best_err = best or (None, None, None)
    heuristic = tconv.heuristic_config(gemm_m, c_out // groups, c_in // groups, k, k, groups,
                                       tconv.sm_count(device), dtype)
    heuristic_ms = next((t for t, c, _ in times if c == heuristic), None)
    return dict(key=tconv.shape_key(gemm_m, c_out // groups, c_in // groups, groups, k, k,
                                    (stride, stride), dtype),
                conv=list(conv), batch=batch, dtype=str(dtype).removeprefix("torch."),
                best=best_config, best_ms=best_ms, baseline_ms=base_ms, heuristic=heuristic,
                heuristic_ms=heuristic_ms,
                best_over_baseline=best_ms and baseline_ms / best_ms,
                heuristic_over_baseline=heuristic_ms and baseline_ms / heuristic_ms,
                max_abs_err_vs_truth=best_err, baseline_err_vs_truth=reference_err,
                error_limit=limit,
                rejected=[dict(config=c, ms=ms, err=err) for ms, c, err in rejected],
                configs_timed=len(times))


def _store_best(device: str, version: str, row: dict, table: dict) -> None:
    if row["best"] is None:
        return
    shapes = table.setdefault("entries", {}).setdefault(device, {}).setdefault(version, {})
    shapes[row["key"]] = row["best"]


def _store_row(env: dict, row: dict, results: dict) -> None:
    results["environment"] = env  # of the latest run; each row names its command
    results.setdefault("layers", {})[row["key"]] = row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny shape, one config, CPU under Triton's interpreter")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated")
    parser.add_argument("--table", type=Path,
                        help="the config table to merge into (default: the package's)")
    parser.add_argument("--out", type=Path, help="the per-layer JSON to merge into (default: "
                        "benchmarks/results/<device>/triton_conv_tune.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported
    import triton

    from resnet_fast._jsonfile import update
    from resnet_fast.bench.conv_shapes import distinct_convs
    from resnet_fast.bench.env import device_slug, environment
    from resnet_fast.kernels.triton import conv as tconv

    if args.smoke:
        device = torch.device("cpu")
        cases = [SMOKE]

        def configs_for(conv, gemm_m, dtype):
            return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, SPLIT_K=1, num_warps=4,
                         num_stages=1)]
    else:
        if not torch.cuda.is_available():
            parser.error("needs a CUDA device (or --smoke)")
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        shapes = {c: None for arch in args.archs.split(",") for c in distinct_convs(arch, 224)}
        cases = [(c, getattr(torch, d), int(n)) for d in args.dtypes.split(",")
                 for n in args.batches.split(",") for c in shapes]

        def configs_for(conv, gemm_m, dtype):
            return _candidates(conv, gemm_m, tconv.sm_count(device), dtype)
    env = environment(device)
    name = tconv.device_name(device)
    version = f"triton {triton.__version__}"
    table = args.table or tconv.TABLE_PATH
    out = args.out or (Path(__file__).parent / "results" / device_slug(env)
                       / "triton_conv_tune.json")
    command = "python benchmarks/tune_triton_conv.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    timer = _timer(device)
    # Stored after every conv: a run cut short (a time limit) keeps what it measured, and
    # runs over different subsets merge.
    for conv, dtype, batch in cases:
        row = tune_one(conv, dtype, batch, device, configs_for, timer)
        if row["best"] is None:
            print(f"{row['key']}: no config within the tolerance rule; no table entry",
                  flush=True)
        else:
            print(f"{row['key']}: best {row['best_ms']:.4f} ms, "
                  f"{row['best_over_baseline']:.2f}x the baseline", flush=True)
        update(table, "Triton conv config table", functools.partial(_store_best, name, version,
                                                                    row))
        update(out, "Triton conv tuning results",
               functools.partial(_store_row, env, dict(row, command=command.strip())))
    print(f"wrote {table} and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
