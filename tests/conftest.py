"""Test tiers: everything runs on CPU except tests marked `gpu`, which are skipped (and
reported) when no CUDA device is visible. The check runs here, not at import of any test
module.

Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which reads
TRITON_INTERPRET when triton is first imported: it is set here, before any test imports it
(importing torch does not import triton)."""

import os
import tempfile

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not be flaky); run with
# --hypothesis-profile=explore to search afresh.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile("ci")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU the Triton conv takes its one heuristic config per shape: a full autotune search
# per test shape made the gpu tier take 5 s a test. test_conv_bias_act checks every config of
# the search list and the autotuned path on their own.
os.environ.setdefault("RESNET_FAST_TRITON_AUTOTUNE", "0")
# Layer choices measured by tests (the CPU plans' oneDNN or Winograd) go to a table of this
# session's own, never the user's.
os.environ.setdefault("RESNET_FAST_CACHE_DIR", tempfile.mkdtemp(prefix="resnet_fast_tests_"))
# Inductor's FX graph cache does not key its entries on the vector ISA it compiled for: a
# cache filled under ATEN_CPU_CAPABILITY=avx2 (or on an AVX2-only host) and read on AVX-512
# (or the reverse) corrupted the heap or returned NaN (torchvision's resnet18 alone, torch
# 2.14.1, 2026-12-06; docs/design.md). Each capability gets a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "torchinductor_resnet_fast_tests",
    torch.backends.cpu.get_cpu_capability()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu tier: no CUDA device visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_fp32():
    # fp32 comparisons are made with TF32 off (docs/design.md, Tolerances).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield


class _PreferOurs:
    """A CPU tuner timer under which our kernels (the 1x1 GEMM, Winograd; forward and
    gradients) beat oneDNN: a candidate is a partial whose third argument names its kernel.
    It records the kernels it was asked about."""

    def __init__(self):
        self.kernels = []

    def __call__(self, fn):
        self.kernels.append(fn.args[2])
        return 0.0 if fn.args[2] != "onednn" else 1.0


@pytest.fixture
def prefer_ours(tmp_path, monkeypatch):
    """The CPU tuner, with a table of this test's own, preferring our kernels; yields its
    timer."""
    from resnet_fast import autotune

    timer = _PreferOurs()
    monkeypatch.setattr(autotune, "_default_cpu", autotune.Tuner(
        str(tmp_path / "t.json"), environment=autotune.cpu_environment, timer=timer,
        measure=True))
    return timer
