"""Model benchmark: the library behind ``resnet-fast bench`` (also ``python -m
resnet_fast.bench``, ``make bench``), whose arguments :mod:`resnet_fast.cli.bench` parses
before it calls :func:`run_and_write` with :func:`run` or :func:`run_train`.

Models x batch sizes x candidates on this machine's device: calibrated seeded weights (or
``--weights``), each candidate timed in warm blocks rotated across rounds with the garbage
collector off, median and p10/p90 latency with outliers counted, per-round speedup ratios vs
eager, vs channels_last eager and vs the best peer (torch.compile variants, ONNX Runtime, OpenVINO),
first-call (compile, export) time reported separately, peak memory (GPU), max abs error vs fp32
torchvision with divergent candidates flagged. Writes a JSON file (the source of truth), a
Markdown table and a PNG plot made from it, after every batch size; a candidate that fails
is a row saying why, and an interrupted run keeps the batch sizes it finished.

Where to read on: :mod:`.candidates` (what runs) and :mod:`.peers` (ONNX Runtime, OpenVINO),
:mod:`.runner` (the run loop both modes share), :mod:`.inference` and :mod:`.training` (the
two modes), :mod:`.outputs` (the files, written as the run goes), :mod:`.report` (tables,
plot, the results block of benchmarks/results/README.md), :mod:`.timing`, :mod:`.overhead`
(host overhead per conv), :mod:`.conv_shapes` (the conv shapes of a ResNet).
"""

from .inference import run
from .outputs import run_and_write, write_outputs
from .training import run_train

__all__ = ["run", "run_and_write", "run_train", "write_outputs"]
