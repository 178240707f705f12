"""benchmarks/gpu_check.sh's plan and resume logic, without a GPU: its dry mode prints each
stage's commands instead of running them and lets each stage take simulated time, so the order,
the per-call budget, the resume and what comes back under $OUT are checked here. Nothing here
runs a GPU stage."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from resnet_fast.bench.candidates import CANDIDATES
from resnet_fast.bench.training import TRAIN_CANDIDATES

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
ORDER = ["env", "build", "native", "stem", "triton", "bench256", "bench1", "bench32",
         "train256"]


def _call(tmp_path, out, **env):
    result = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_STATE": str(tmp_path / "state"),
             "OUT": str(tmp_path / out), "PY": sys.executable, **env})
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stderr, result.stderr
    return result.stdout


def _summary(tmp_path):
    return json.loads((tmp_path / "state" / "summary.json").read_text())


def _ran(stdout):
    return re.findall(r"=== (\w+) \(limit", stdout)


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_two_calls_resume_where_the_first_stopped(tmp_path):
    # Simulated times: each stage its whole limit (the worst case).
    first = _call(tmp_path, "out1")
    assert _ran(first) == ORDER[:3]  # 30 + 300 + 180 of 530 s: 20 s left, stem needs 30
    assert "stem: 20s left in this call, it needs at least 30s" in first
    second = _call(tmp_path, "out2")
    assert [f"{s}: done in an earlier call" in second for s in ORDER[:3]] == [True] * 3
    assert _ran(second) == ORDER[3:7]
    summary = _summary(tmp_path)
    assert summary["dry"] is True and set(summary["calls"]) == {"1", "2"}
    stages = summary["stages"]
    assert [stages[s]["call"] for s in ORDER[:7]] == [1, 1, 1, 2, 2, 2, 2]
    assert all(stages[s]["status"] == "ok" for s in ORDER[:6])
    # bench1 started with 110 s of its 150: cut by the budget, so not done; the next call
    # runs it again, then the rest.
    assert stages["bench1"]["status"] == "cut by the call's budget"
    assert stages["bench1"]["wall_s"] == 110
    third = _call(tmp_path, "out3")
    assert _ran(third) == ORDER[6:] and "all stages done" in third
    assert [a["status"] for a in _summary(tmp_path)["stages"]["bench1"]["attempts"]] == [
        "cut by the call's budget", "ok"]
    fourth = _call(tmp_path, "out4")
    assert "all stages done" in fourth and not _ran(fourth)


def test_a_stage_past_its_own_limit_is_done_and_the_rest_go_on(tmp_path):
    out = _call(tmp_path, "out", GPU_CHECK_DRY_SECONDS="env=5 build=5 native=999",
                GPU_CHECK_DRY_LOADS="0")
    stages = _summary(tmp_path)["stages"]
    assert stages["native"]["status"] == "timed out" and stages["native"]["wall_s"] == 180
    assert _ran(out)[:4] == ORDER[:4]


def test_the_build_is_skipped_where_the_extension_loads(tmp_path):
    out = _call(tmp_path, "out", GPU_CHECK_DRY_LOADS="1")
    assert "build: skipped, resnet_fast._C loads with its CUDA kernels" in out
    assert _summary(tmp_path)["stages"]["build"]["status"] == "skipped (extension loads)"
    assert _ran(out)[:3] == ["env", "native", "stem"]


def test_the_build_takes_a_probed_compiler_for_this_gpus_arch(tmp_path):
    _call(tmp_path, "out", GPU_CHECK_DRY_ARCH="8.0")
    log = (tmp_path / "state" / "build.log").read_text()
    cc, cxx = re.search(r"building for sm_80 with CC=(\S+) CXX=(\S+)", log).groups()
    assert Path(cc).exists() and Path(cxx).exists()
    assert f"DRY: env CC={cc} CXX={cxx} TORCH_CUDA_ARCH_LIST=8.0 " in log


def test_from_skips_the_stages_before_it_but_not_the_build(tmp_path):
    out = _call(tmp_path, "out", GPU_CHECK_FROM="bench256")
    assert _ran(out)[:2] == ["build", "bench256"]
    assert "native: before GPU_CHECK_FROM=bench256, skipped" in out


def test_the_bench_stages_ask_for_real_candidates(tmp_path):
    _call(tmp_path, "out", GPU_CHECK_BUDGET_S="5000")
    for stage, batch, train in [("bench256", 256, False), ("bench1", 1, False),
                                ("bench32", 32, False), ("train256", 256, True)]:
        log = (tmp_path / "state" / f"{stage}.log").read_text()
        assert log.startswith("DRY: env RESNET_FAST_TRITON_AUTOTUNE=0 ")
        assert f" --batch {batch} " in log and ("--train" in log) == train
        assert "--device cuda --dtype bfloat16 --repeats 20" in log
        assert f"--out {tmp_path / 'state' / stage} " in log
        names = re.search(r"--candidates (\S+)", log).group(1).split(",")
        assert "eager" in names and set(names) <= set(TRAIN_CANDIDATES if train else CANDIDATES)


@pytest.mark.parametrize("calls", [1, 2])
def test_what_comes_back_fits_the_device_tools_limits(tmp_path, calls):
    """At most 8 files, two folders down at most: summary.json, the driver's log and one
    archive of every stage's files, refreshed after each stage."""
    for _ in range(calls):
        _call(tmp_path, "out")
    back = sorted(p.relative_to(tmp_path / "out").as_posix()
                  for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert back == ["gpu_check/gpu_check.log", "gpu_check/gpu_check.tgz",
                    "gpu_check/summary.json"]
    with tarfile.open(tmp_path / "out" / "gpu_check" / "gpu_check.tgz") as tar:
        names = set(tar.getnames())
    assert {"./env.log", "./build.log", "./native.log", "./summary.json"} <= names
