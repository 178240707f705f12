"""The runtimes a deployer would pick instead of us, as benchmark candidates: ONNX Runtime
(CPU provider; the CUDA and TensorRT providers where the onnxruntime-gpu build is installed)
and OpenVINO (CPU). Optional dependencies (``pip install resnet_fast[peers]``): a missing one
is skipped, with the reason, by the caller.

Each peer builds on its first call: export, conversion and compilation are part of its
first-call time, as torch.compile's are. On CPU a peer takes the float32 input as a numpy array
(numpy has no bfloat16) and computes in the precision it was built for; ``precision`` says
which one it runs in, as the runtime reports it.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import nn

# ONNX Runtime's worker threads spin after a run by default (waiting for the next one), and
# that spinning slowed whichever candidate ran next 1.5-1.9x at batch 1 on 2 cores. A deployer
# serving one model keeps the default; a benchmark sharing the cores with other candidates
# turns it off, and records that it did (``OnnxRuntime.settings``).
ORT_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
_OV_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_OV_NAMES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def missing(module: str) -> Optional[str]:
    """Why ``module`` cannot be used here (with the install hint), or None when it can."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{module} is not installed (pip install resnet_fast[peers]): {exc}"
    return None


def onnxruntime_unsupported(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ONNX Runtime cannot run ``dtype`` on ``device`` here, or None when it can."""
    why = missing("onnxruntime")
    if why:
        return why
    if device.type == "cuda":
        import onnxruntime as ort
        if not {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(
                ort.get_available_providers()):
            return ("this onnxruntime has no CUDA or TensorRT provider (the GPU build is "
                    "onnxruntime-gpu)")
        if dtype == torch.bfloat16:
            return "onnxruntime's CUDA provider has no bfloat16 convolution; run --dtype float16"
    elif dtype != torch.float32:
        return (f"onnxruntime's CPU provider has no {str(dtype)[6:]} convolution; its float32 "
                "result is in the --dtype float32 run")
    return None


def openvino_unsupported(device: torch.device) -> Optional[str]:
    """Why OpenVINO cannot run on ``device`` here, or None when it can."""
    if device.type != "cpu":
        return "OpenVINO is benchmarked on CPU (its GPU plugin drives Intel GPUs)"
    return missing("openvino")


class OnnxRuntime:
    """ONNX Runtime on ``model`` exported by ``torch.onnx.export`` (the dynamo exporter) with a
    dynamic batch dimension: all graph optimizations, sequential execution, intra-op threads =
    torch's, no spinning workers (``ORT_SESSION_CONFIG``; ``settings`` says all of it). On a
    GPU the TensorRT provider is preferred (fp16 enabled for a 16-bit dtype),
    else the CUDA provider on the model cast to ``dtype``; inputs and outputs stay on the GPU
    (I/O binding)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.session = None
        self.precision = str(dtype)[6:] if device.type == "cuda" else "float32"
        self._dir: Optional[tempfile.TemporaryDirectory] = None
        self.settings = {"graph_optimization_level": "ORT_ENABLE_ALL",
                         "execution_mode": "ORT_SEQUENTIAL",
                         "intra_op_num_threads": torch.get_num_threads(),
                         "inter_op_num_threads": 1, **ORT_SESSION_CONFIG}

    def _build(self, x: torch.Tensor) -> None:
        import onnxruntime as ort

        self._dir = tempfile.TemporaryDirectory(prefix="resnet_fast_ort_")
        path = Path(self._dir.name) / "model.onnx"
        gpu = self.device.type == "cuda"
        model = self.model.to(self.device, x.dtype) if gpu else self.model.float()
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"],
                              output_names=["logits"], verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                self.settings["graph_optimization_level"])
        opts.execution_mode = getattr(ort.ExecutionMode, self.settings["execution_mode"])
        opts.intra_op_num_threads = self.settings["intra_op_num_threads"]
        opts.inter_op_num_threads = self.settings["inter_op_num_threads"]
        for key, value in ORT_SESSION_CONFIG.items():
            opts.add_session_config_entry(key, value)
        providers: list = ["CPUExecutionProvider"]
        if gpu:
            index = {"device_id": self.device.index or 0}
            available = ort.get_available_providers()
            providers = ([("CUDAExecutionProvider", index)]
                         if "CUDAExecutionProvider" in available else [])
            if "TensorrtExecutionProvider" in available:
                trt = {**index, "trt_fp16_enable": self.dtype != torch.float32}
                providers.insert(0, ("TensorrtExecutionProvider", trt))
        self.session = ort.InferenceSession(str(path), opts, providers=providers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            self._build(x)
        if self.device.type != "cuda":
            return torch.from_numpy(self.session.run(None, {"input": x.numpy()})[0])
        import numpy as np

        x = x.contiguous()
        out = torch.empty(x.shape[0], self.model.fc.out_features, device=x.device,
                          dtype=x.dtype)
        binding = self.session.io_binding()
        elem = {torch.float32: np.float32, torch.float16: np.float16}[x.dtype]
        binding.bind_input("input", "cuda", x.device.index or 0, elem, tuple(x.shape),
                           x.data_ptr())
        binding.bind_output("logits", "cuda", out.device.index or 0, elem, tuple(out.shape),
                            out.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()  # x is ready before ORT's stream reads it
        self.session.run_with_iobinding(binding)  # returns when the GPU work is done
        return out


class _SignalStack(ctypes.Structure):
    """Linux's ``stack_t``."""
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t)]


@contextmanager
def signal_stack_kept():
    """Inside, the calling thread's alternate signal stack may change; on exit it is put back
    (Linux; elsewhere nothing is done). OpenVINO's ``compile_model`` leaves the thread a small
    stack of its own (seen with 2026.4: 11.5 KiB), and Python runs its signal handlers on
    the alternate stack: Ctrl-C or SIGTERM then crashed the process (SIGSEGV) instead of
    interrupting it."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = _SignalStack()
    if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack: could not read the signal stack")
    try:
        yield
    finally:
        if libc.sigaltstack(ctypes.byref(saved), None) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"sigaltstack: could not restore the signal stack "
                                 f"({os.strerror(errno)})")


class OpenVino:
    """OpenVINO on ``model`` converted by ``openvino.convert_model`` (its PyTorch front end),
    compiled for each input shape (static shapes, as a deployer with a fixed batch runs it):
    LATENCY hint (one stream), INFERENCE_NUM_THREADS = torch's, INFERENCE_PRECISION_HINT f32,
    bf16 or f16 to match ``dtype``. ``precision`` is what the compiled model says it runs in:
    on a CPU without native bf16, OpenVINO runs f32 whatever the hint."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.model = model.float()
        self.hint = _OV_PRECISION[dtype]
        self.settings = {"PERFORMANCE_HINT": "LATENCY",
                         "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                         "INFERENCE_PRECISION_HINT": self.hint}
        self.precision: Optional[str] = None
        self._converted = None
        self._requests: dict[tuple[int, ...], object] = {}

    def _compile(self, x: torch.Tensor):
        import openvino as ov

        if self._converted is None:
            # OpenVINO's PyTorch front end traces with torch.jit.trace, which torch now warns
            # is deprecated on every call: the warning is OpenVINO's to act on, not the user's.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "`torch.jit.trace", FutureWarning)
                self._converted = ov.convert_model(self.model, example_input=x,
                                                   input=[-1, *x.shape[1:]])
        self._converted.reshape(list(x.shape))
        with signal_stack_kept():
            compiled = ov.Core().compile_model(self._converted, "CPU", self.settings)
        runs = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = _OV_NAMES.get(runs, runs)
        request = self._requests[tuple(x.shape)] = compiled.create_infer_request()
        return request

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        request = self._requests.get(tuple(x.shape)) or self._compile(x)
        return torch.from_numpy(request.infer([x.numpy()])[0])
