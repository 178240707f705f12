"""The inference candidates of ``resnet-fast bench``, each on its own copy of the same weights:

- torch's own: ``eager`` (torchvision, NCHW), ``eager_cl`` (channels_last), ``compile``
  (torch.compile default), ``compile_freezing`` (inductor freezing, no_grad),
  ``compile_reduce_overhead`` (GPU: CUDA graphs) and ``compile_max_autotune`` (GPU:
  max-autotune + freezing);
- ours: ``resnet_fast`` (our model on every available backend, NCHW input: the drop-in case)
  ``optimize`` (``resnet_fast.optimize`` of the torchvision model: auto backend, CUDA
  graphs on GPU) and ``optimize_winograd`` (the same with ``winograd=True``: F(4x4,3x3) allowed
  too, the opt-in with 5-11x the error per layer; CPU float32 only);
- the runtimes a deployer would pick instead (:mod:`.peers`): ``onnxruntime`` and
  ``openvino``.

The peers ("vs best peer") are the torch.compile variants and the runtimes: what a user would
run instead of us.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import available_backends, create_model, optimize
from ..backends import device_backends
from . import peers

CANDIDATES = ("eager", "eager_cl", "compile", "compile_freezing", "compile_reduce_overhead",
              "compile_max_autotune", "resnet_fast", "optimize", "optimize_winograd",
              "onnxruntime", "openvino")
# What ``resnet-fast bench --grad`` times: the modules autograd runs through.
GRAD_CANDIDATES = ("eager", "eager_cl", "resnet_fast")
PEERS = ("compile", "compile_freezing", "compile_reduce_overhead", "compile_max_autotune",
         "onnxruntime", "openvino")
_COMPILE_MODES = {"compile": (None, False), "compile_freezing": (None, True),
                  "compile_reduce_overhead": ("reduce-overhead", False),
                  "compile_max_autotune": ("max-autotune", True)}


@dataclass
class Candidate:
    """A benchmarked callable and the input it takes: channels_last or NCHW, in the run's dtype
    or (``float32_input``: runtimes fed numpy arrays) in float32."""
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    channels_last_input: bool
    float32_input: bool = False

    @property
    def precision(self) -> Optional[str]:
        """What the candidate computes in, where it reports it (a peer, once built); None:
        the run's dtype."""
        return getattr(self.fn, "precision", None)

    @property
    def settings(self) -> Optional[dict]:
        """The runtime options a peer runs with (recorded in the result), else None."""
        return getattr(self.fn, "settings", None)


def compiled(model: torch.nn.Module, mode: Optional[str], freezing: bool):
    """torch.compile with inductor options passed explicitly (not by patching the global
    config): each variant is then a different backend, so dynamo compiles it on its own
    instead of reusing another variant's graph (seen: a second variant's "first call" took
    0.06 s)."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode)) if mode else {}
    options["freezing"] = freezing
    return torch.compile(model, dynamic=False, options=options)


def build_candidates(names, arch: str, reference: torch.nn.Module, dtype: torch.dtype,
                     device: torch.device) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates asked for, each on its own copy of ``reference``'s weights, and the
    reason for every one that cannot run here."""
    out, skipped = [], {}
    state = reference.state_dict()

    def torchvision_copy(channels_last: bool, cast: bool = True):
        m = copy.deepcopy(reference).to(device=device, dtype=dtype if cast else None).eval()
        return m.to(memory_format=torch.channels_last) if channels_last else m

    for name in names:
        if name == "eager":
            out.append(Candidate(name, torchvision_copy(False), False))
        elif name == "eager_cl":
            out.append(Candidate(name, torchvision_copy(True), True))
        elif name in _COMPILE_MODES:
            mode, freezing = _COMPILE_MODES[name]
            if mode and device.type != "cuda":
                skipped[name] = (f"mode={mode!r} is benchmarked on GPU only"
                                 + (" (CUDA graphs)" if mode == "reduce-overhead" else ""))
                continue
            out.append(Candidate(name, compiled(torchvision_copy(True), mode, freezing), True))
        elif name == "resnet_fast":
            status = available_backends()
            for backend in device_backends(device.type):
                if not status[backend].available:
                    skipped[f"resnet_fast:{backend}"] = status[backend].detail
                    continue
                model = create_model(arch, num_classes=reference.fc.out_features,
                                     backend=backend)
                model.load_state_dict(state)
                out.append(Candidate(f"resnet_fast:{backend}",
                                     model.to(device=device, dtype=dtype).eval(), False))
        elif name == "optimize":
            # resnet_fast.optimize() on the torchvision model: auto backend, CUDA graphs on GPU.
            out.append(Candidate(name, optimize(torchvision_copy(False), dtype=dtype), False))
        elif name == "optimize_winograd":
            if device.type != "cpu" or dtype != torch.float32:
                skipped[name] = (f"winograd=True adds F(4x4,3x3) on CPU in float32 (in bfloat16 "
                                 f"`optimize` measures it already); this run is {device.type} "
                                 f"{str(dtype).split('.')[-1]}")
                continue
            out.append(Candidate(name, optimize(torchvision_copy(False), dtype=dtype,
                                                winograd=True), False))
        elif name == "onnxruntime":
            why = peers.onnxruntime_unsupported(device, dtype)
            if why:
                skipped[name] = why
                continue
            gpu = device.type == "cuda"
            out.append(Candidate(name, peers.OnnxRuntime(torchvision_copy(False, cast=False),
                                                         device, dtype),
                                 False, float32_input=not gpu))
        elif name == "openvino":
            why = peers.openvino_unsupported(device)
            if why:
                skipped[name] = why
                continue
            out.append(Candidate(name, peers.OpenVino(torchvision_copy(False, cast=False), dtype),
                                 False, float32_input=True))
        else:
            raise ValueError(f"unknown candidate {name!r}; expected some of "
                             f"{', '.join(CANDIDATES)}")
    return out, skipped
