"""benchmarks/tune_triton_conv.py's choice of a config, on fake timings and errors: the fastest
config within the tolerance rule, never a faster one past it. (The whole script runs under the
interpreter in test_conv_bias_act's smoke test.)"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from _numerics import assert_within_reference_error

spec = importlib.util.spec_from_file_location(
    "tune_triton_conv", Path(__file__).parents[1] / "benchmarks" / "tune_triton_conv.py")
tune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune)

FAST, MID, SLOW = ({"BLOCK_M": m} for m in (128, 64, 32))


def test_the_fastest_config_within_the_limit_is_chosen():
    best, rejected = tune.select([(2.0, SLOW, 0.01), (1.0, FAST, 0.5), (1.5, MID, 0.02)],
                                 limit=0.05)
    assert best == (1.5, MID, 0.02)
    assert rejected == [(1.0, FAST, 0.5)]


def test_an_error_at_the_limit_is_kept_and_nan_is_rejected():
    best, rejected = tune.select([(1.0, FAST, math.nan), (2.0, MID, 0.05)], limit=0.05)
    assert best == (2.0, MID, 0.05)
    assert [config for _, config, _ in rejected] == [FAST]


def test_no_config_within_the_limit_gives_none():
    best, rejected = tune.select([(1.0, FAST, 0.2), (2.0, MID, 0.3)], limit=0.1)
    assert best is None and len(rejected) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reference_err, magnitude", [(0.0, 0.5), (3e-3, 40.0)])
def test_the_limit_is_the_tests_rule(dtype, reference_err, magnitude):
    """An error just within error_limit passes tests/_numerics.py's check of the same rule,
    one just past it fails."""
    truth = torch.zeros(4, dtype=torch.float64)
    reference = torch.tensor([reference_err, 0, 0, 0], dtype=torch.float64).to(dtype)
    reference_err = reference.double().abs().max().item()  # as rounded to the dtype
    limit = tune.error_limit(reference_err, magnitude, dtype)
    within = torch.tensor([0, 0, 0, limit * 0.98], dtype=torch.float64)
    past = torch.tensor([0, 0, 0, limit * 1.03], dtype=torch.float64)
    within, past = within.to(dtype), past.to(dtype)
    # The dtype rounds the error; the cases must still sit on their side of the limit.
    assert within.double().max() <= limit < past.double().max()
    assert_within_reference_error(within, reference, truth, magnitude)
    with pytest.raises(AssertionError, match="exceeds 2x the reference"):
        assert_within_reference_error(past, reference, truth, magnitude)
