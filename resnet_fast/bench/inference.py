"""The inference benchmark (``resnet-fast bench``): the candidates of :mod:`.candidates` on the
same weights and the same seeded input, each judged against fp32 NCHW torchvision (max abs
error of the logits, divergent candidates flagged, never hidden; and top-1 agreement, the
fraction of images whose arg-max class is fp32 torchvision's, which is what a bf16 user
trades)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..calibrate import reference_model
from .candidates import CANDIDATES, GRAD_CANDIDATES, Candidate, build_candidates
from .runner import Batch, Schedule, header, pick_device, run_batches

# A candidate is flagged as diverged when its logits differ from fp32 torchvision by more than
# twice what eager torchvision in the same dtype does, and by more than this fraction of the
# logits' scale (fp32 differs only by summation order; a 50-layer bf16 network is 10-30% off
# the fp32 logits by its rounding alone: on an H100 eager bf16 itself was 0.34 at scale ~2).
DIVERGENCE = {torch.float32: 1e-3, torch.bfloat16: 0.05, torch.float16: 0.01}


def diverged(err: float, eager_err: float, scale: float, dtype: torch.dtype) -> bool:
    return err > max(2 * eager_err, DIVERGENCE[dtype] * max(scale, 1e-6))


def run(arch: str = "resnet50", batch_sizes=(1, 16), dtype: torch.dtype = torch.float32,
        candidates=CANDIDATES, repeats: int = 9, block: int = 3, warmup: int = 1,
        device: Optional[str] = None, image_size: int = 224, weights: Optional[str] = None,
        progress: bool = True, extra_candidates: Optional[list[Candidate]] = None,
        command: Optional[str] = None, on_batch: Optional[Callable[[dict], None]] = None,
        grad: bool = False) -> dict:
    """Runs the benchmark and returns the results dict (the JSON's content); ``on_batch`` gets
    the results so far after every batch size (see :class:`.runner.Schedule` for ``repeats``,
    ``block`` and ``warmup``). ``grad``: every call runs with autograd on (an eval model
    called without ``torch.no_grad()``: the forward records its graph, as its parameters
    require grad; nothing calls backward), for the module candidates (``GRAD_CANDIDATES``)."""
    if grad and set(candidates) - set(GRAD_CANDIDATES):
        raise ValueError(f"grad mode times {', '.join(GRAD_CANDIDATES)} only (modules autograd "
                         f"runs through), got {', '.join(candidates)}")
    dev = pick_device(device)
    reference = reference_model(arch, weights)
    truth_model = reference.to(dev).eval()  # fp32, NCHW: the yardstick (candidates copy it)
    cands, skipped = build_candidates(candidates, arch, reference, dtype, dev)
    cands += extra_candidates or []
    gen = torch.Generator().manual_seed(1)

    def setup(bs: int) -> Batch:
        x32 = torch.randn(bs, 3, image_size, image_size, generator=gen).to(dev)
        inputs = {(False, False): x32.to(dtype), (False, True): x32}
        inputs[True, False] = inputs[False, False].contiguous(memory_format=torch.channels_last)
        truth = truth_model(x32)
        scale = truth.abs().max().item()
        classes = truth.argmax(1)

        def judge(outputs: dict) -> dict:
            errors = {n: (out.float() - truth).abs().max().item()
                      for n, (out,) in outputs.items()}
            top1 = {n: (out.float().argmax(1) == classes).float().mean().item()
                    for n, (out,) in outputs.items()}
            return {c.name: {"precision": c.precision or str(dtype)[6:],
                             "max_abs_err_vs_torchvision": errors[c.name], "logit_scale": scale,
                             "top1_agreement_vs_torchvision": top1[c.name],
                             "diverged": diverged(errors[c.name], errors["eager"], scale, dtype)}
                    for c in cands if c.name in outputs}

        calls = {c.name: (lambda fn=c.fn, x=inputs[c.channels_last_input, c.float32_input]: fn(x))
                 for c in cands}
        return Batch(calls, judge)

    schedule = Schedule(repeats, block, warmup)
    results = {**header(arch, image_size, dtype, schedule, weights, dev, command),
               "skipped_candidates": skipped,
               "peer_settings": {c.name: c.settings for c in cands if c.settings}}
    if grad:
        results["mode"] = "grad"
    with torch.enable_grad() if grad else torch.inference_mode():
        return run_batches(setup, batch_sizes, dev, schedule, results, on_batch, progress,
                           f"{arch} bench")
