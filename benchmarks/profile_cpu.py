"""Where the time goes on CPU: per-operator time of ``resnet_fast.optimize``, ONNX Runtime and
OpenVINO on the same calibrated model and input, per forward, grouped into comparable kinds
(convolutions, the passes around them, pooling, fc).

    python benchmarks/profile_cpu.py                    # ResNet-50, batch 1 and 16, fp32
    python benchmarks/profile_cpu.py --dtype bfloat16   # ours and OpenVINO in bf16 (no ORT)
    python benchmarks/profile_cpu.py --batch 16 --threads 1 --json prof.json
    python benchmarks/profile_cpu.py --iters 9 --block 3  # 3 rounds of 3 profiled forwards

Sources: ``torch.profiler`` (self CPU time per aten/mkldnn/resnet_fast op), ORT's
``enable_profiling`` trace (``Node`` events, kernel time per node) and OpenVINO's
``PERF_COUNT`` report (real time per executed node). Each profiler adds its own overhead, so
compare kinds within a runtime and totals against ``resnet-fast bench``, not to the last 5%.
The runtimes are profiled as ``resnet-fast bench`` times them, in rotated warm blocks: per
round each runtime makes one unprofiled warm-up forward, then up to ``--block`` profiled ones
back to back, the order starting one runtime later every round (``--iters`` profiled forwards
each in all). Each reports its forward of median total time. Run one after the other, a slow
spell of a shared VM would land on one runtime; single forwards taken in turn would each pay
for the runtime before (ONNX Runtime's spinning workers, an idle thread pool waking up).

Per layer, each runtime's convolution nodes are grouped by geometry ("C×H×W k R×S -> K": a
ResNet has no two convolutions of one geometry and different strides) with the whole fused
node's time: ours is the ``resnet_fast::conv_bias_act_packed`` call with everything under it
(fill, copy, ReLU pass), ORT's the ``Conv``/``FusedConv`` kernel (add and ReLU fused in),
OpenVINO's the ``Convolution`` node (post-ops fused in; separate ``Eltwise`` nodes are not
counted there).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torchvision

import resnet_fast
from resnet_fast.autotune import rotation
from resnet_fast.bench.env import environment
from resnet_fast.bench.peers import (
    _OV_PRECISION,
    ORT_SESSION_CONFIG,
    onnxruntime_unsupported,
    openvino_unsupported,
    signal_stack_kept,
)
from resnet_fast.bench.timing import block_sizes
from resnet_fast.calibrate import calibrate_
from resnet_fast.models.program import Kept

# Our ops by kind; anything else is "other". Our own kernels (Winograd, the 1x1 GEMM, the
# trailing _: written over the residual; the maxpool; the bf16 ReLU on bits, a frame inside
# the oneDNN path's op) run no aten op beneath them.
_OWN_CONVS = {f"resnet_fast::{name}" for name in (
    "conv_bias_act_winograd", "conv_bias_act_winograd_", "conv_bias_act_1x1",
    "conv_bias_act_1x1_")}
_OWN_KERNELS = _OWN_CONVS | {"resnet_fast::max_pool_act", "resnet_fast::relu_bits"}
_CONVS = _OWN_CONVS | {"resnet_fast::conv_bias_act_packed"}  # every conv a plan runs
_OURS = {"mkldnn::_convolution_pointwise_": "conv", "mkldnn::_convolution_pointwise": "conv",
         **dict.fromkeys(_OWN_CONVS, "conv"),
         # the input's NCHW -> channels_last copy (and, in bf16, its cast): the reorder that
         # ONNX Runtime's ReorderInput and OpenVINO's Reorder do (labelled "residual copy"
         # until db2319b, from when a residual was copied into the conv's output)
         "aten::copy_": "reorder",
         "aten::fill_": "zero fill", "aten::zero_": "zero fill", "aten::clamp_min_": "relu pass",
         "aten::relu_": "relu pass", "aten::max_pool2d_with_indices": "maxpool",
         "aten::max_pool2d": "maxpool", "aten::mean": "avgpool", "aten::sum": "avgpool",
         "aten::div_": "avgpool", "aten::adaptive_avg_pool2d": "avgpool", "aten::addmm": "fc",
         "aten::linear": "fc", "resnet_fast::fc": "fc", "resnet_fast::max_pool_act": "maxpool",
         "resnet_fast::relu_bits": "relu pass"}
_ORT = {"Conv": "conv", "FusedConv": "conv", "MaxPool": "maxpool",
        "GlobalAveragePool": "avgpool", "ReduceMean": "avgpool", "Gemm": "fc", "Add": "add", "Relu": "relu pass",
        "ReorderInput": "reorder", "ReorderOutput": "reorder"}
_OV = {"Convolution": "conv", "MaxPool": "maxpool", "ReduceMean": "avgpool",
       "FullyConnected": "fc", "Reorder": "reorder", "Eltwise": "add"}


class Unavailable(Exception):
    """A runtime that cannot run here (not installed, or not in this precision): said in the
    table, not fatal."""


# One forward's profile: (ms per op name, ms per conv geometry).
Forward = tuple[dict[str, float], dict[str, float]]


class Ours:
    """resnet_fast.optimize; each profiled forward under its own torch.profiler."""

    kinds = _OURS

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
        x = x.to(dtype)
        self.fast = resnet_fast.optimize(model, dtype=dtype, example_input=x)
        self.x = x
        self.forwards: list[Forward] = []
        self.warm()

    def warm(self) -> None:
        """One forward, not profiled."""
        with torch.inference_mode():
            self.fast(self.x)

    def forward(self) -> None:
        with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
            self.fast(self.x)
        ops: dict[str, float] = defaultdict(float)
        layers: dict[str, float] = defaultdict(float)
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
        convs = [e for e in events if e.name in _CONVS]
        # The fc, where it runs as a plan (a 1x1 conv over (N, C, 1, 1): Kept.head_for), is
        # the forward's last conv, with the fc plan's weight; it and every frame beneath it
        # count as the fc.
        head = self.fc_weight_shape()
        fc = ({convs[-1].id} if convs and head is not None and convs[-1].input_shapes[0][2:]
              == [1, 1] and convs[-1].input_shapes[1] == head else set())
        for event in events:
            if event.cpu_parent is not None and event.cpu_parent.id in fc:
                fc.add(event.id)
            # Our ops' frames: the children of the oneDNN path count; our own kernels' code
            # runs in their own frames (no aten children), so those frames are the time.
            if not event.name.startswith("resnet_fast::") or event.name in _OWN_KERNELS:
                name = "resnet_fast::fc" if event.id in fc else event.name
                ops[name] += event.self_cpu_time_total / 1e3
            if event.name in _CONVS and event.id not in fc:
                layers[_layer(*event.input_shapes[:2])] += event.cpu_time_total / 1e3
        self.forwards.append((dict(ops), dict(layers)))

    def fc_weight_shape(self) -> list[int] | None:
        """The weight shape of the fc's plan, where the model keeps one (Kept.head_for)."""
        for m in self.fast.modules():
            if Kept.HEAD in m.__dict__:
                return list(m.__dict__[Kept.HEAD].program.weight.shape)
        return None

    def results(self) -> list[Forward]:
        return self.forwards


class OnnxRuntime:
    """ORT's CPU provider at ORT_ENABLE_ALL, its workers not spinning between runs (as the
    bench runs it: ``ORT_SESSION_CONFIG``); one profiling trace of every run, split per
    ``model_run``, of which the profiled forwards' are kept."""

    kinds = _ORT

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
        why = onnxruntime_unsupported(torch.device("cpu"), dtype)
        if why:
            raise Unavailable(why)
        import onnxruntime as ort

        self.tmp = tempfile.TemporaryDirectory()
        path = str(Path(self.tmp.name) / "model.onnx")
        with torch.no_grad():
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["input"],
                              verbose=False)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        for key, value in ORT_SESSION_CONFIG.items():
            opts.add_session_config_entry(key, value)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(self.tmp.name) / "ort")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self.feed = {"input": x.numpy()}
        self.runs, self.profiled = 0, []  # runs so far; the indices of the profiled ones
        self.warm()

    def warm(self) -> None:
        """One run, left out of the results (the session traces every run)."""
        self.session.run(None, self.feed)
        self.runs += 1

    def forward(self) -> None:
        self.profiled.append(self.runs)
        self.warm()

    def results(self) -> list[Forward]:
        events = json.loads(Path(self.session.end_profiling()).read_text())
        self.tmp.cleanup()
        runs = sorted((e for e in events if e.get("cat") == "Session"
                       and e["name"] == "model_run"), key=lambda e: e["ts"])
        if len(runs) != self.runs:
            raise RuntimeError(f"expected {self.runs} model_run events in ORT's trace, got "
                               f"{len(runs)}")
        forwards = []
        for run in (runs[i] for i in self.profiled):
            ops: dict[str, float] = defaultdict(float)
            layers: dict[str, float] = defaultdict(float)
            for e in events:
                if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                        and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]):
                    op = e["args"].get("op_name", "?")
                    ops[op] += e["dur"] / 1e3
                    if _ORT.get(op) == "conv":
                        x_shape, w_shape = (next(iter(t.values()))
                                            for t in e["args"]["input_type_shape"][:2])
                        layers[_layer(x_shape, w_shape)] += e["dur"] / 1e3
            forwards.append((dict(ops), dict(layers)))
        return forwards


class OpenVino:
    """OpenVINO's CPU plugin with PERF_COUNT at the precision asked for (f32 or bf16; it runs
    f32 where the CPU has no native bf16, and says so): the report of each inference."""

    kinds = _OV

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> None:
        why = openvino_unsupported(torch.device("cpu"))
        if why:
            raise Unavailable(why)
        import openvino as ov

        with torch.no_grad():
            converted = ov.convert_model(model, example_input=x)
        with signal_stack_kept():  # else Ctrl-C crashes the process
            compiled = ov.Core().compile_model(converted, "CPU", {
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                "INFERENCE_PRECISION_HINT": _OV_PRECISION[dtype], "PERF_COUNT": True})
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.request, self.x = compiled.create_infer_request(), x.numpy()
        self.warm()
        self.conv_layers = {  # runtime node name -> geometry, from the executed graph's shapes
            node.get_friendly_name(): _layer(*(node.input(i).get_partial_shape().to_shape()
                                               for i in (0, 1)))
            for node in compiled.get_runtime_model().get_ordered_ops()
            if node.get_rt_info()["layerType"].astype(str) == "Convolution"}
        self.forwards: list[Forward] = []

    def warm(self) -> None:
        """One inference, its report not read."""
        self.request.infer([self.x])

    def forward(self) -> None:
        self.warm()
        ops: dict[str, float] = defaultdict(float)
        layers: dict[str, float] = defaultdict(float)
        for info in self.request.get_profiling_info():
            ms = info.real_time.total_seconds() * 1e3
            if ms > 0:
                ops[f"{info.node_type} ({info.exec_type})"] += ms
            if info.node_name in self.conv_layers:
                layers[self.conv_layers[info.node_name]] += ms
        self.forwards.append((dict(ops), dict(layers)))

    def results(self) -> list[Forward]:
        return self.forwards


def _layer(x_shape, w_shape) -> str:
    """A convolution's geometry: input C×H×W, kernel R×S, output channels K."""
    return (f"{x_shape[1]}x{x_shape[2]}x{x_shape[3]} k{w_shape[2]}x{w_shape[3]} "
            f"-> {w_shape[0]}")


def _median_forward(forwards: list[Forward], kinds: dict[str, str]) -> dict:
    """The profiled forward of median total time (a stall that hits one forward does not move
    it): {"kinds": ms per kind, "ops": ms per op name as the profiler names it, "layers": ms
    per conv geometry, "forwards_ms": every forward's total}."""
    totals = [sum(ops.values()) for ops, _ in forwards]
    ops, layers = forwards[sorted(range(len(forwards)), key=totals.__getitem__)[len(totals) // 2]]
    grouped: dict[str, float] = defaultdict(float)
    for name, ms in ops.items():
        grouped[kinds.get(name.split(" (")[0], "other")] += ms
    return {"kinds": dict(grouped), "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "layers": layers, "forwards_ms": totals}


def _print_layers(table: dict) -> None:
    """Per convolution geometry, ms per forward in each runtime, slowest of ours first."""
    ours_ms = table["optimize"]["layers"]
    print(f"\n{'conv layer (all of this geometry)':<34}" + "".join(f"{n:>13}" for n in table))
    for layer in sorted(ours_ms, key=lambda k: -ours_ms[k]):
        print(f"{layer:<34}" + "".join(f"{t['layers'].get(layer, float('nan')):>13.2f}"
                                       for t in table.values()))


RUNTIMES = {"optimize": Ours, "onnxruntime": OnnxRuntime, "openvino": OpenVino}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", default="1,16", help="comma-separated (default 1,16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=6,
                        help="profiled forwards per runtime (default 6)")
    parser.add_argument("--block", type=int, default=2,
                        help="profiled forwards back to back per runtime and round, after one "
                             "warm-up forward (default 2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="bfloat16: ours and OpenVINO bf16 (ONNX Runtime's CPU provider "
                             "has no bf16 convolution)")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = calibrate_(getattr(torchvision.models, args.arch)(), image_size=args.image_size)
    dtype = getattr(torch, args.dtype)
    result = {"arch": args.arch, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "unit": "ms per forward",
              "iters": args.iters, "block": args.block, "image_size": args.image_size,
              "protocol": "rotated warm blocks: per round, each runtime's warm-up forward, then "
                          "up to block profiled forwards; the order starts one runtime later "
                          "every round",
              "command": "python benchmarks/profile_cpu.py " + " ".join(argv or sys.argv[1:]),
              "environment": environment(torch.device("cpu")), "batches": {}}
    for batch in (int(b) for b in args.batch.split(",")):
        x = torch.randn(batch, 3, args.image_size, args.image_size)
        profilers, table = {}, {}
        for name, runtime in RUNTIMES.items():
            start = time.perf_counter()
            try:
                profilers[name] = runtime(model, x, dtype)
            except (ImportError, Unavailable) as exc:  # a peer that cannot run: said
                table[name] = {"kinds": {}, "ops": {}, "layers": {}, "not_run": str(exc)}
                print(f"{name} not run: {exc}")
                continue
            print(f"set up {name} at batch {batch} in {time.perf_counter() - start:.0f} s")
        for r, calls in enumerate(block_sizes(args.iters, args.block)):
            for name in rotation(list(profilers), r):
                profilers[name].warm()  # pays for whoever ran before
                for _ in range(calls):
                    profilers[name].forward()
        for name, profiler in profilers.items():
            table[name] = _median_forward(profiler.results(), profiler.kinds)
        table = {name: table[name] for name in RUNTIMES}
        result["batches"][batch] = table
        rows = [t["kinds"] for t in table.values()]
        kinds = sorted({k for row in rows for k in row})
        precision = getattr(profilers.get("openvino"), "precision", None)
        if precision:
            result.setdefault("openvino_precision", precision)
        print(f"\n{args.arch} {args.dtype} batch {batch}, {result['threads']} threads, "
              f"ms per forward" + (f" (OpenVINO ran {precision})" if precision else ""))
        print(f"{'kind':<14}" + "".join(f"{name:>13}" for name in table))
        for kind in kinds + ["total"]:
            cells = [sum(row.values()) if kind == "total" else row.get(kind, 0.0)
                     for row in rows]
            print(f"{kind:<14}" + "".join(f"{c:>13.2f}" for c in cells))
        _print_layers(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
