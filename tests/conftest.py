"""Test tiers: everything runs on CPU except tests marked `gpu`, which are skipped (and
reported) when no CUDA device is visible. The check runs at collection, not at import of
any test module."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu tier: no CUDA device visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_fp32():
    # fp32 comparisons are made with TF32 off (DESIGN.md, tolerances).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
