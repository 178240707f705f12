"""Model benchmark: ``resnet-fast bench`` (also ``python -m resnet_fast.bench``, ``make bench``).

Models x batch sizes x candidates on this machine's device, per BENCHMARKING.md: calibrated
seeded weights (or ``--weights``), warm-up, candidates interleaved in every repeat, median and
p10/p90 latency, per-repeat speedup ratios, first-call (compile) time reported separately,
peak memory (GPU), max abs error vs fp32 torchvision with divergent candidates flagged. Writes
a JSON file (the source of truth), a Markdown table and a PNG plot made from it.

Candidates: ``eager`` (torchvision, NCHW), ``eager_cl`` (channels_last), ``compile``
(torch.compile default), ``compile_freezing`` (inductor freezing, no_grad),
``compile_max_autotune`` (GPU: max-autotune + freezing), ``resnet_fast`` (our model on every
available backend, NCHW input: the drop-in case) and ``optimize`` (``resnet_fast.optimize``
of the torchvision model: auto backend, CUDA graphs on GPU).

``--train`` times a whole training step instead (forward, cross-entropy against fixed random
labels, backward, SGD with momentum; autocast for bfloat16/float16, weights kept in fp32) of
``eager``, ``eager_cl``, ``compile`` (the backward through AOTAutograd) and ``resnet_fast``
(our model in training mode, channels_last), each on its own copy of the same weights with its
own optimizer, restarted for every batch size. A step mutates the weights, so every repeat goes
on training; all candidates take the same steps on the same batch. A candidate whose loss before
its first update (step 1) is off eager's is flagged as diverged; so is ours when its loss after
the update (step 2) is off eager's by more than 3x the spread of torch's own candidates there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torchvision
from torch import nn

from .. import available_backends, create_model, optimize
from ..backends import device_backends, requested_backend
from .calibrate import calibrate_
from .env import device_slug, environment
from .timing import interleaved, median_ratio, quantile

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
CANDIDATES = ("eager", "eager_cl", "compile", "compile_freezing", "compile_max_autotune",
              "resnet_fast", "optimize")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A candidate is flagged as diverged when its logits differ from fp32 torchvision by more than
# twice what eager torchvision in the same dtype does, and by more than this fraction of the
# logits' scale (fp32 differs only by summation order; a 50-layer bf16 network is 10-30% off
# the fp32 logits by its rounding alone: on an H100 eager bf16 itself was 0.34 at scale ~2).
DIVERGENCE = {torch.float32: 1e-3, torch.bfloat16: 0.05, torch.float16: 0.01}


def diverged(err: float, eager_err: float, scale: float, dtype: torch.dtype) -> bool:
    return err > max(2 * eager_err, DIVERGENCE[dtype] * max(scale, 1e-6))


TRAIN_CANDIDATES = ("eager", "eager_cl", "compile", "resnet_fast")
TORCH_TRAIN = ("eager", "eager_cl", "compile")  # torch's own: they define the step-2 noise
# A training candidate is flagged as diverged when a loss differs from eager's at the same step
# by more than this fraction of it. Same weights, batch and labels: in fp32 only the summation
# order differs; under bf16/fp16 autocast every conv rounds its inputs to 8/11 mantissa bits.
TRAIN_DIVERGENCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
SGD_LR, SGD_MOMENTUM = 1e-3, 0.9


def train_diverged(loss: float, eager_loss: float, dtype: torch.dtype) -> bool:
    """Whether a step's loss is too far off eager's (a NaN or inf loss always is)."""
    diff = abs(loss - eager_loss)
    return not math.isfinite(diff) or diff > TRAIN_DIVERGENCE[dtype] * max(abs(eager_loss), 1e-6)


@dataclass
class Candidate:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    channels_last_input: bool


def _compiled(model: torch.nn.Module, mode: Optional[str], freezing: bool):
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

    def torchvision_copy(channels_last: bool):
        m = copy.deepcopy(reference).to(device=device, dtype=dtype).eval()
        return m.to(memory_format=torch.channels_last) if channels_last else m

    for name in names:
        if name == "eager":
            out.append(Candidate(name, torchvision_copy(False), False))
        elif name == "eager_cl":
            out.append(Candidate(name, torchvision_copy(True), True))
        elif name == "compile":
            out.append(Candidate(name, _compiled(torchvision_copy(True), None, False), True))
        elif name == "compile_freezing":
            out.append(Candidate(name, _compiled(torchvision_copy(True), None, True), True))
        elif name == "compile_max_autotune":
            if device.type != "cuda":
                skipped[name] = "max-autotune is benchmarked on GPU only"
                continue
            out.append(Candidate(name, _compiled(torchvision_copy(True), "max-autotune", True), True))
        elif name == "resnet_fast":
            status = available_backends()
            for backend in device_backends(device.type):
                if not status[backend].available:
                    skipped[f"resnet_fast:{backend}"] = status[backend].detail
                    continue
                model = create_model(arch, backend=backend)
                model.load_state_dict(state)
                out.append(Candidate(f"resnet_fast:{backend}",
                                     model.to(device=device, dtype=dtype).eval(), False))
        elif name == "optimize":
            # resnet_fast.optimize() on the torchvision model: auto backend, CUDA graphs on GPU.
            out.append(Candidate(name, optimize(torchvision_copy(False), dtype=dtype), False))
        else:
            raise ValueError(f"unknown candidate {name!r}; expected some of {', '.join(CANDIDATES)}")
    return out, skipped


class TrainStep:
    """One training candidate: its own model (fp32 weights), SGD optimizer and grad scaler.
    Calling it runs one step on ``(x, labels)`` and returns the step's loss, detached (taken
    before the update: the loss of the weights the step started from)."""

    def __init__(self, name: str, model: nn.Module, channels_last: bool, compiled: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.name = name
        self.channels_last_input = channels_last
        self.model = model.to(device).train()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = _compiled(self.model, None, False) if compiled else self.model
        self.autocast = dtype if dtype != torch.float32 else None
        self._new_optimizer()

    def _new_optimizer(self) -> None:
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=SGD_LR, momentum=SGD_MOMENTUM)
        # fp16 gradients underflow without loss scaling: the scaler is part of a real fp16 step
        # (and its inf check costs a device sync per step). bf16 has fp32's range and needs none.
        device = next(self.model.parameters()).device
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)

    def reset(self, state: dict) -> None:
        """Back to ``state``'s weights and BN statistics with a fresh optimizer (no momentum)
        and grad scaler. In place: a compiled forward keeps its graph."""
        self.model.load_state_dict(state)
        self._new_optimizer()

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        amp = (torch.autocast(x.device.type, dtype=self.autocast) if self.autocast
               else nullcontext())
        with amp:
            loss = nn.functional.cross_entropy(self.forward(x), labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


def build_train_steps(names, arch: str, reference: nn.Module, dtype: torch.dtype,
                      device: torch.device) -> list[TrainStep]:
    """The training candidates asked for, each on its own fp32 copy of ``reference``'s weights
    (``dtype`` is the autocast dtype). ``compile`` compiles the channels_last torchvision model,
    as the inference benchmark does; ``resnet_fast`` is our model on the auto backend."""
    out = []
    for name in names:
        if name in ("eager", "eager_cl", "compile"):
            channels_last = name != "eager"
            out.append(TrainStep(name, copy.deepcopy(reference), channels_last,
                                 name == "compile", dtype, device))
        elif name == "resnet_fast":
            model = create_model(arch)
            model.load_state_dict(reference.state_dict())
            out.append(TrainStep(name, model, True, False, dtype, device))
        else:
            raise ValueError(f"unknown training candidate {name!r}; expected some of "
                             f"{', '.join(TRAIN_CANDIDATES)}")
    return out


def _device(device: Optional[str]) -> torch.device:
    """``device``, else cuda when one is visible, else cpu."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a user of eager PyTorch does
    return dev


def _reference(arch: str, weights: Optional[str]) -> nn.Module:
    """The seeded torchvision model every candidate copies: ``weights`` loaded, else calibrated."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)()
    if weights:
        reference.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        reference.eval()
    else:
        calibrate_(reference)
    return reference


def _header(arch: str, image_size: int, dtype: torch.dtype, repeats: int, warmup: int,
            weights: Optional[str], device: torch.device) -> dict:
    """The fields every result file starts with."""
    return {"arch": arch, "image_size": image_size, "dtype": str(dtype).replace("torch.", ""),
            "repeats": repeats, "warmup": warmup, "weights": weights or "calibrated (seeded)",
            "environment": environment(device)}


def _command(command: Optional[str]) -> str:
    """The command recorded in the results: ``command``, else this process's arguments."""
    return command or "resnet-fast bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None  # no per-call allocator statistics for CPU tensors
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _speed(times: dict[str, list[float]], name: str, batch_size: int) -> dict:
    """A candidate's throughput, latency quantiles and per-repeat speedups vs eager and vs the
    fastest torch.compile variant of the same run."""
    ts = times[name]
    compiled = [n for n in times if n.startswith("compile")]
    best_compile = min(compiled, key=lambda n: statistics.median(times[n])) if compiled else None
    return {"img_per_s": batch_size / statistics.median(ts),
            "latency_ms": {"median": 1e3 * statistics.median(ts),
                           "p10": 1e3 * quantile(ts, 0.1), "p90": 1e3 * quantile(ts, 0.9)},
            "speedup_vs_eager": median_ratio(times["eager"], ts),
            "speedup_vs_best_compile": (median_ratio(times[best_compile], ts)
                                        if best_compile else None),
            "best_compile": best_compile}


def run(arch: str = "resnet50", batch_sizes=(1, 16), dtype: torch.dtype = torch.float32,
        candidates=CANDIDATES, repeats: int = 10, warmup: int = 2, device: Optional[str] = None,
        image_size: int = 224, weights: Optional[str] = None, progress: bool = True,
        extra_candidates: Optional[list[Candidate]] = None, command: Optional[str] = None) -> dict:
    """Runs the benchmark and returns the results dict (the JSON's content)."""
    from tqdm import tqdm

    dev = _device(device)
    reference = _reference(arch, weights)
    truth_model = copy.deepcopy(reference).to(dev).eval()  # fp32, NCHW: the yardstick
    cands, skipped = build_candidates(candidates, arch, reference, dtype, dev)
    cands += extra_candidates or []
    if not any(c.name == "eager" for c in cands):
        raise ValueError("the candidates must include 'eager' (the baseline of every ratio)")

    results = {**_header(arch, image_size, dtype, repeats, warmup, weights, dev),
               "skipped_candidates": skipped, "command": _command(command), "runs": []}
    gen = torch.Generator().manual_seed(1)
    total = len(batch_sizes) * len(cands) * (repeats + 2)
    bar = tqdm(total=total, desc=f"{arch} bench", unit="call", file=sys.stderr,
               disable=not progress, mininterval=1.0)
    for bs in batch_sizes:
        x32 = torch.randn(bs, 3, image_size, image_size, generator=gen).to(dev)
        x = x32.to(dtype)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        calls, first_call, errors, memory = {}, {}, {}, {}
        with torch.inference_mode():
            truth = truth_model(x32)
            scale = truth.abs().max().item()
            for c in cands:
                inp = x_cl if c.channels_last_input else x
                calls[c.name] = (lambda fn=c.fn, inp=inp: fn(inp))
                t0 = time.perf_counter()
                out = calls[c.name]()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                first_call[c.name] = time.perf_counter() - t0
                errors[c.name] = (out.float() - truth).abs().max().item()
                bar.update(1)
            for c in cands:
                memory[c.name] = _peak_memory_mb(calls[c.name], dev)
            times = interleaved(calls, dev, repeats, warmup, progress=bar.update)
        for name, ts in times.items():
            results["runs"].append({
                "candidate": name, "batch_size": bs, **_speed(times, name, bs),
                "first_call_s": first_call[name],
                "peak_memory_mb": memory[name],
                "max_abs_err_vs_torchvision": errors[name],
                "logit_scale": scale,
                "diverged": diverged(errors[name], errors["eager"], scale, dtype),
                "times_s": ts,
            })
    bar.close()
    return results


def run_train(arch: str = "resnet50", batch_sizes=(16,), dtype: torch.dtype = torch.float32,
              candidates=TRAIN_CANDIDATES, repeats: int = 10, warmup: int = 2,
              device: Optional[str] = None, image_size: int = 224, weights: Optional[str] = None,
              progress: bool = True, command: Optional[str] = None) -> dict:
    """Runs the training-step benchmark and returns the results dict (the JSON's content).

    Per batch size, every candidate restarts from the reference weights with a fresh optimizer
    (steps on one fixed batch memorize it within a dozen steps: weights trained further at an
    earlier batch size drift apart in the ReLUs they flip, and losses no longer compare) and
    trains on one seeded batch with random labels: a first step (timed on its own:
    compilation, cuDNN autotuning), a second, ``warmup`` steps, then ``repeats`` interleaved
    timed steps. Step 1's loss checks the forward against eager's; step 2's, after one update,
    catches a backward or update gone wrong wholesale (none, wrong sign, NaN) but not a
    gradient a few percent off in one layer: tests/test_bench.py compares the gradients."""
    from tqdm import tqdm

    dev = _device(device)
    reference = _reference(arch, weights)
    steps = build_train_steps(candidates, arch, reference, dtype, dev)
    if not any(s.name == "eager" for s in steps):
        raise ValueError("the candidates must include 'eager' (the baseline of every ratio)")

    header = _header(arch, image_size, dtype, repeats, warmup, weights, dev)
    results = {"mode": "train", **header,
               "step": {"loss": "cross_entropy vs fixed random labels", "optimizer": "SGD",
                        "lr": SGD_LR, "momentum": SGD_MOMENTUM,
                        "autocast": None if dtype == torch.float32 else header["dtype"],
                        "grad_scaler": dtype == torch.float16,
                        "resnet_fast_backend": requested_backend(None)},
               "skipped_candidates": {}, "command": _command(command), "runs": []}
    gen = torch.Generator().manual_seed(1)
    num_classes = reference.fc.out_features
    bar = tqdm(total=len(batch_sizes) * len(steps) * (repeats + 2), desc=f"{arch} train bench",
               unit="step", file=sys.stderr, disable=not progress, mininterval=1.0)
    start = reference.state_dict()
    for bs in batch_sizes:
        x = torch.randn(bs, 3, image_size, image_size, generator=gen).to(dev)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, num_classes, (bs,), generator=gen).to(dev)
        calls, first_call, losses, memory = {}, {}, {}, {}
        for s in steps:
            s.reset(start)
            inp = x_cl if s.channels_last_input else x
            calls[s.name] = (lambda step=s, inp=inp: step(inp, labels))
            t0 = time.perf_counter()
            first = calls[s.name]()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            first_call[s.name] = time.perf_counter() - t0
            losses[s.name] = (first.item(), calls[s.name]().item())
            bar.update(1)
        for s in steps:
            memory[s.name] = _peak_memory_mb(calls[s.name], dev)
        times = interleaved(calls, dev, repeats, warmup, progress=bar.update)
        eager = losses["eager"]
        # Step 2 (after one update) amplifies summation-order differences: torch's own
        # candidates disagree with eager there (seen on CPU: eager_cl 9.7e-3, compile 2.9e-3 at
        # a 7.1 loss). Their spread is the noise floor a step-2 loss is judged against.
        noise = max((abs(losses[n][1] - eager[1]) for n in times if n in TORCH_TRAIN), default=0.0)
        for name in times:
            loss = losses[name]
            results["runs"].append({
                "candidate": name, "batch_size": bs, **_speed(times, name, bs),
                "first_call_s": first_call[name],
                "peak_memory_mb": memory[name],
                "loss_step1": loss[0], "loss_step1_abs_diff_vs_eager": abs(loss[0] - eager[0]),
                "loss_step2": loss[1], "loss_step2_abs_diff_vs_eager": abs(loss[1] - eager[1]),
                "diverged": (train_diverged(loss[0], eager[0], dtype)
                             or not math.isfinite(loss[1])
                             or (name not in TORCH_TRAIN
                                 and abs(loss[1] - eager[1]) > 3 * noise
                                 and train_diverged(loss[1], eager[1], dtype))),
                "times_s": times[name],
            })
    bar.close()
    return results


def write_outputs(results: dict, out_dir: Path, plot: bool = True) -> list[Path]:
    """JSON (atomically), Markdown table and PNG plot, named <arch>_<dtype>.* (inference) or
    <arch>_<dtype>_train.* (training step)."""
    from . import report

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results['arch']}_{results['dtype']}"
    if results.get("mode") == "train":
        stem += "_train"
    written = []
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    written.append(path)
    md = out_dir / f"{stem}.md"
    md.write_text(report.markdown_table(results) + "\n")
    written.append(md)
    if plot:
        png = out_dir / f"{stem}.png"
        report.plot(results, png)
        written.append(png)
    return written


def main(argv: list[str] | None = None) -> int:
    from . import report

    parser = argparse.ArgumentParser(prog="resnet-fast bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", choices=ARCHS)
    parser.add_argument("--train", action="store_true",
                        help="time a training step (forward, loss, backward, SGD) instead of "
                             "inference")
    parser.add_argument("--batch", default=None,
                        help="comma-separated batch sizes (default: 1,16 on CPU and 1,32,256 on "
                             "GPU; with --train 16 on CPU and 256 on GPU)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: float32 on CPU, bfloat16 on GPU (with --train: the "
                             "autocast dtype; weights stay float32)")
    parser.add_argument("--candidates", default=None,
                        help=f"comma-separated, from {', '.join(CANDIDATES)} (default: all); with "
                             f"--train from {', '.join(TRAIN_CANDIDATES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="default: 8 on CPU, 30 on GPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default=None,
                        help="a torchvision state_dict checkpoint (loaded with weights_only=True) "
                             "instead of calibrated random weights")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: bench-results/<device>)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    gpu = device.startswith("cuda")
    default_batch = ("256" if gpu else "16") if args.train else ("1,32,256" if gpu else "1,16")
    try:
        batches = tuple(int(b) for b in (args.batch or default_batch).split(","))
    except ValueError:
        parser.error(f"--batch: expected comma-separated integers, got {args.batch!r}")
    allowed = TRAIN_CANDIDATES if args.train else CANDIDATES
    names = tuple(n.strip() for n in (args.candidates or ",".join(allowed)).split(",") if n.strip())
    unknown = [n for n in names if n not in CANDIDATES + TRAIN_CANDIDATES]
    if unknown:
        parser.error(f"--candidates: unknown {', '.join(unknown)}; expected some of "
                     f"{', '.join(allowed)}")
    inference_only = [n for n in names if n not in allowed]
    if inference_only:
        parser.error(f"--candidates: {', '.join(inference_only)} (inference only) cannot run "
                     f"with --train; expected some of {', '.join(allowed)}")
    if "eager" not in names:
        parser.error("--candidates must include eager (the baseline of every ratio)")
    repeats = args.repeats or (30 if gpu else 8)
    if repeats < 1 or any(b < 1 for b in batches) or args.warmup < 0:
        parser.error("--repeats and every batch size must be >= 1, --warmup >= 0")
    if args.weights and not Path(args.weights).is_file():
        parser.error(f"--weights: no such file {args.weights}")
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]

    # This call's own arguments, not sys.argv: from `resnet-fast bench` sys.argv also holds
    # the subcommand, and a caller may pass argv explicitly.
    command = "resnet-fast bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    bench = run_train if args.train else run
    results = bench(args.arch, batches, dtype, names, repeats, args.warmup, device,
                    args.image_size, args.weights, progress=not args.no_progress, command=command)
    print(report.format_table(results))
    out_dir = args.out or Path("bench-results") / device_slug(results["environment"])
    for path in write_outputs(results, out_dir, plot=not args.no_plot):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
