"""Would calling oneDNN directly pay? Per conv of ResNet-50: torch's oneDNN op as our plans run
it (``conv_bias_act_packed``: ``mkldnn::_convolution_pointwise`` on a prepacked weight, then our
NaN-keeping ReLU pass) against a oneDNN primitive made once and executed per call (the ReLU a
post-op that keeps NaN), one process, channels_last, float32 and bfloat16 where oneDNN runs it.

    pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0   # oneDNN 3.2, GNU OpenMP
    python benchmarks/onednn_direct.py --json benchmarks/results/<host>/onednn_direct.json

torch links oneDNN statically and exports none of its ``dnnl_*`` symbols, so the direct side
is a second oneDNN (PyPI's GNU-OpenMP build: it shares torch's ``libgomp.so.1``, one thread
pool), compiled here against that wheel's headers on first use (~40 s). On an AMX Xeon torch's
op measured 55-120 us per call above the primitive's own execution in bf16
(benchmarks/results/cpu-xeon-amx-2core/README.md): this script measures that gap per layer on
whichever host runs it, which decides whether a direct-oneDNN backend is worth its dependency.

oneDNN's ``eltwise_relu`` maps NaN to 0 (torch.relu keeps it); ``eltwise_elu`` with alpha
-0.0 is x for x > 0 and -0.0 * (exp(x) - 1) = +0 otherwise, NaN staying NaN: the post-op used
here, checked against torch.relu on a NaN input for every layer (``nan_kept``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import resnet_fast  # noqa: F401  (registers torch.ops.resnet_fast)
from resnet_fast.bench.conv_shapes import distinct_convs
from resnet_fast.bench.env import environment
from resnet_fast.bench.timing import flat, round_ratio, warm_blocks

SOURCE = r"""
#include <torch/extension.h>
#include <oneapi/dnnl/dnnl.hpp>

using namespace dnnl;

engine& cpu_engine() { static engine e(engine::kind::cpu, 0); return e; }
stream& cpu_stream() { static stream s(cpu_engine()); return s; }

memory::data_type dt(const torch::Tensor& t) {
  return t.scalar_type() == torch::kBFloat16 ? memory::data_type::bf16 : memory::data_type::f32;
}

// relu(conv2d(x, w) + bias), x and the output channels_last (nhwc); the weight reordered once
// to the primitive's layout; NaN-keeping ReLU as an elu(alpha = -0.0) post-op.
struct Conv {
  convolution_forward prim;
  memory weights, bias;
  memory::desc src, dst;
  std::vector<int64_t> out_shape;

  Conv(std::vector<int64_t> x_shape, torch::Tensor w, torch::Tensor b, int64_t s, int64_t p) {
    const int64_t K = w.size(0), R = w.size(2), S = w.size(3);
    out_shape = {x_shape[0], K, (x_shape[2] + 2 * p - R) / s + 1, (x_shape[3] + 2 * p - S) / s + 1};
    src = memory::desc(x_shape, dt(w), memory::format_tag::nhwc);
    dst = memory::desc(out_shape, dt(w), memory::format_tag::nhwc);
    const memory::desc bias_d({K}, dt(b), memory::format_tag::a);
    post_ops ops;
    ops.append_eltwise(algorithm::eltwise_elu, -0.0f, 0.f);
    primitive_attr attr;
    attr.set_post_ops(ops);
    const auto pd = convolution_forward::primitive_desc(
        cpu_engine(), prop_kind::forward_inference, algorithm::convolution_direct, src,
        memory::desc(w.sizes().vec(), dt(w), memory::format_tag::any), bias_d, dst, {s, s},
        {p, p}, {p, p}, attr);
    prim = convolution_forward(pd);
    memory plain({w.sizes().vec(), dt(w), memory::format_tag::oihw}, cpu_engine(),
                 w.contiguous().data_ptr());
    weights = memory(pd.weights_desc(), cpu_engine());
    reorder(plain, weights).execute(cpu_stream(), plain, weights);
    bias = memory(bias_d, cpu_engine());
    std::memcpy(bias.get_data_handle(), b.contiguous().data_ptr(), b.nbytes());
    cpu_stream().wait();
    impl = pd.impl_info_str();
  }

  // Into `out`, made by the caller once: torch's op takes its output from our buffer pool
  // (no page faults), so a fresh torch::empty per call here would time the allocator.
  torch::Tensor run(const torch::Tensor& x, torch::Tensor out) {
    TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.sizes().vec() == src.get_dims() &&
                out.is_contiguous(at::MemoryFormat::ChannelsLast) && out.sizes().vec() == out_shape &&
                out.scalar_type() == x.scalar_type(),
                "onednn_direct: expected channels_last input and output of the planned shapes");
    prim.execute(cpu_stream(), {{DNNL_ARG_SRC, memory(src, cpu_engine(), x.data_ptr())},
                                {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_BIAS, bias},
                                {DNNL_ARG_DST, memory(dst, cpu_engine(), out.data_ptr())}});
    return out;
  }
  std::string impl;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Conv>(m, "Conv")
      .def(pybind11::init<std::vector<int64_t>, torch::Tensor, torch::Tensor, int64_t, int64_t>())
      .def("__call__", &Conv::run)
      .def_readonly("out_shape", &Conv::out_shape)
      .def_readonly("impl", &Conv::impl);
}
"""


def onednn_prefix() -> Path | None:
    """Where the onednn-cpu-gomp wheels put oneDNN (their data files land in sys.prefix)."""
    prefix = Path(sys.prefix)
    found = (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists() and any(
        (prefix / "lib").glob("libdnnl.so*"))
    return prefix if found else None


def build():
    prefix = onednn_prefix()
    if prefix is None:
        raise SystemExit("onednn_direct: oneDNN not found under sys.prefix; pip install "
                         "onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0")
    from torch.utils.cpp_extension import load_inline
    # -I before torch's -isystem: the wheel's headers, not the ones torch ships for its own build.
    return load_inline("resnet_fast_onednn_direct", cpp_sources=[SOURCE], extra_cflags=["-O2"],
                       extra_include_paths=[str(prefix / "include")],
                       extra_ldflags=[f"-L{prefix / 'lib'}", "-ldnnl",
                                      f"-Wl,-rpath,{prefix / 'lib'}"])


def run(direct, batches, dtypes, repeats: int, block: int, size: int) -> list[dict]:
    op = torch.ops.resnet_fast
    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for batch in batches:
            for (c, k, r, s, p, _d, _groups, h) in distinct_convs("resnet50", size):
                x = torch.randn(batch, c, h, h, generator=g).to(dtype).contiguous(
                    memory_format=torch.channels_last)
                w = (torch.randn(k, c, r, r, generator=g) * (2 / (c * r * r)) ** 0.5).to(dtype)
                b = (torch.randn(k, generator=g) * 0.1).to(dtype)
                packed = op.prepack_conv_weight(w, [s, s], [p, p], [1, 1], 1, list(x.shape))
                conv = direct.Conv(list(x.shape), w, b, s, p)
                out = torch.empty(conv.out_shape, dtype=dtype).contiguous(
                    memory_format=torch.channels_last)
                def torch_op(t, packed=packed, b=b, s=s, p=p):
                    return op.conv_bias_act_packed(t, packed, b, [s, s], [p, p], [1, 1], 1,
                                                   None, True)
                cands = {"torch_op": partial(torch_op, x), "direct": partial(conv, x, out)}
                truth = F.conv2d(x.double(), w.double(), b.double(), s, p).relu()
                nan_x = x.clone()
                nan_x[0, :, 0, 0] = float("nan")  # every channel of one pixel: NaN outputs there
                with torch.no_grad():
                    err = {n: (fn().double() - truth).abs().max().item() for n, fn in cands.items()}
                    nan_kept = bool(torch.equal(conv(nan_x, out.clone()).isnan(),
                                                torch_op(nan_x).isnan()))
                    times = warm_blocks(cands, torch.device("cpu"), repeats, block)
                row = {"layer": f"{c}x{h}x{h} k{r} s{s} -> {k}", "batch": batch,
                       "dtype": str(dtype).removeprefix("torch."), "direct_impl": conv.impl,
                       "ms": {n: statistics.median(flat(t)) * 1e3 for n, t in times.items()},
                       "torch_op_over_direct": round_ratio(times["torch_op"], times["direct"]),
                       "max_abs_error": err, "nan_kept": nan_kept}
                rows.append(row)
                print(f"{row['dtype']:8s} b{batch:<3d} {row['layer']:26s} torch op "
                      f"{row['ms']['torch_op']:8.3f} ms  direct {row['ms']['direct']:8.3f} ms  "
                      f"{row['torch_op_over_direct']:.2f}x  ({conv.impl}; err "
                      f"{err['torch_op']:.1e} / {err['direct']:.1e}; NaN kept: {nan_kept})",
                      flush=True)
    return rows


def totals(rows: list[dict]) -> dict:
    """Per dtype and batch: the summed medians (each distinct conv once)."""
    out = {}
    for row in rows:
        t = out.setdefault(f"{row['dtype']} batch {row['batch']}", {"torch_op": 0.0, "direct": 0.0})
        for n in t:
            t[n] += row["ms"][n]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="float32 bfloat16 (default: float32, and bfloat16 where oneDNN runs it)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    supported = torch.ops.resnet_fast.onednn_dtype_supported
    dtypes = ([getattr(torch, d) for d in args.dtypes] if args.dtypes else
              [torch.float32] + ([torch.bfloat16] if supported(torch.bfloat16) else []))
    rows = run(build(), args.batch_sizes, dtypes, args.repeats, args.block, args.image_size)
    result = {"command": " ".join(["python", "benchmarks/onednn_direct.py", *(argv or sys.argv[1:])]),
              "environment": environment(torch.device("cpu")),
              "totals_ms": totals(rows), "layers": rows}
    for name, t in result["totals_ms"].items():
        print(f"{name}: torch op {t['torch_op']:.2f} ms, direct {t['direct']:.2f} ms "
              f"({t['torch_op'] / t['direct']:.2f}x)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
