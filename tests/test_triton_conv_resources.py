"""Every Triton conv config the code can pick fits the GPUs it targets, checked on the CPU.

A config past a GPU's limits fails at launch with ``OutOfResources`` (shared memory) or
spills registers; the interpreter runs any config, and the tests turn TF32 off, so neither
shows on the CPU tier. Here the resources are computed from the config instead:

- shared memory: the software pipeline keeps ``num_stages`` copies of the A tile
  (BLOCK_M x BLOCK_K) and the B tile (BLOCK_K x BLOCK_N) in the input's element size (float32
  with or without TF32: 4 bytes; float16, bfloat16: 2), against the per-block opt-in limit:
  163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100/H200). The epilogue's layout-conversion
  scratch is left out: it is live only after the loop, when the pipeline buffers are free.
- registers: the float32 accumulator, BLOCK_M * BLOCK_N values spread over 32 * num_warps
  threads, plus a margin for the operand fragments, addresses and masks, against 255 per
  thread and 64 Ki per SM (one block resident at least).

Configs the code can pick: the heuristic's (over the distinct convs of the ResNet family at
batch 1, 32 and 256 and a grid that reaches every branch), the autotune search list, and every
entry of ``conv_configs.json``, each for every dtype path.
"""

import itertools
import json
import re

import pytest
import torch

from resnet_fast.bench.conv_shapes import distinct_convs
from resnet_fast.kernels.triton import conv as tconv

KIB = 1024
SMEM_LIMIT = {"sm_80": 163 * KIB, "sm_90": 227 * KIB}
REGS_PER_THREAD, REGS_PER_SM = 255, 64 * KIB
REG_MARGIN = 64
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMS = 132


def shared_memory(config: dict, dtype: torch.dtype) -> int:
    m, n, k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    return config["num_stages"] * (m * k + k * n) * dtype.itemsize


def registers_per_thread(config: dict) -> int:
    return config["BLOCK_M"] * config["BLOCK_N"] // (32 * config["num_warps"]) + REG_MARGIN


def over_limits(config: dict, dtype: torch.dtype) -> list[str]:
    """What in ``config`` does not fit, for each target; empty when it fits everywhere."""
    smem = shared_memory(config, dtype)
    regs = registers_per_thread(config)
    why = [f"{arch}: {smem / KIB:.0f} KiB shared > {limit // KIB}"
           for arch, limit in SMEM_LIMIT.items() if smem > limit]
    if regs > REGS_PER_THREAD:
        why.append(f"~{regs} registers/thread > {REGS_PER_THREAD}")
    if regs * 32 * config["num_warps"] > REGS_PER_SM:
        why.append(f"~{regs * 32 * config['num_warps']} registers/block > {REGS_PER_SM}")
    return why


def _assert_fit(bad: dict) -> None:
    over = {where: why for where, why in bad.items() if why}
    assert not over, "configs past the limits:\n" + "\n".join(
        f"  {where}: {'; '.join(why)}" for where, why in over.items())


def _tile(config: dict) -> tuple:
    return tuple(config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"))


def _gemm_shapes():
    """(gemm_m, gemm_n, c_g, r, s, groups): the family's convs at the batches the bench runs,
    and a grid over every threshold of the heuristic."""
    for arch in ("resnet18", "resnet50", "resnext50_32x4d"):
        for c_in, c_out, k, stride, pad, dil, groups, h in distinct_convs(arch, 224):
            p = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
            for batch in (1, 32, 256):
                yield batch * p * p, c_out // groups, c_in // groups, k, k, groups
    for m, n, c, rs in itertools.product((1, 4095, 4096, 16383, 16384, 10**6),
                                         (1, 16, 31, 32, 64, 128, 255, 256, 2048),
                                         (1, 3, 4, 8, 15, 16, 32, 63, 64, 1024), (1, 3, 7)):
        yield m, n, c, rs, rs, 1


def heuristic_configs(dtype: torch.dtype, monkeypatch) -> dict[tuple, dict]:
    """Every distinct config the heuristic gives on a GPU (not the interpreter's)."""
    monkeypatch.setattr(tconv, "INTERPRET", False)
    configs = {}
    for m, n, c, r, s, groups in _gemm_shapes():
        config = tconv.heuristic_config(m, n, c, r, s, groups, SMS, dtype)
        configs[_tile(config)] = config
    return configs


def search_configs(dtype: torch.dtype) -> dict[tuple, dict]:
    """The tiles the autotuner times for ``dtype``: what its early prune keeps of its list
    (the tuner script times the same list)."""
    x = torch.empty(0, dtype=dtype)
    kept = tconv._prune_for_dtype(tconv._conv_tuned.configs, {"x_ptr": x})
    assert sorted(tconv._tile_of(c) for c in kept) == sorted(tconv.search_tiles(dtype))
    return {tconv._tile_of(c): dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in kept}


def table_configs() -> list[tuple[str, dict, torch.dtype]]:
    """(where, config, dtype) of every entry of the shipped table; the dtype is the shape
    key's last field."""
    entries = json.loads(tconv.TABLE_PATH.read_text())["entries"]
    return [(f"{device} / {version} / {key}", config,
             getattr(torch, re.fullmatch(r".*-(\w+)", key).group(1)))
            for device, versions in entries.items() for version, shapes in versions.items()
            for key, config in shapes.items()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heuristic_configs_fit(dtype, monkeypatch):
    _assert_fit({tile: over_limits(c, dtype)
                 for tile, c in heuristic_configs(dtype, monkeypatch).items()})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_search_configs_fit(dtype):
    _assert_fit({tile: over_limits(c, dtype) for tile, c in search_configs(dtype).items()})


def test_table_configs_fit():
    _assert_fit({where: over_limits(c, dtype) for where, c, dtype in table_configs()})


def test_the_model_flags_what_does_not_fit():
    """The arithmetic itself, on configs whose fate is known: 128x128x64 in 4 stages needs
    256 KiB in float32 (OutOfResources on an H100) and 128 KiB in bfloat16."""
    big = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
    assert shared_memory(big, torch.float32) == 256 * KIB
    assert over_limits(big, torch.float32) == ["sm_80: 256 KiB shared > 163",
                                               "sm_90: 256 KiB shared > 227"]
    assert over_limits(big, torch.bfloat16) == []
    assert over_limits(dict(big, num_warps=2), torch.bfloat16) == ["~320 registers/thread > 255"]
