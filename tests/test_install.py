"""The package as a user gets it: an sdist that carries every file the build reads, and a wheel
built from it, against the torch installed here, on a machine without a CUDA toolkit.

"Without a toolkit" is an explicit CUDA_HOME that has no bin/nvcc: setup.py must honour it
(warn, build the CPU kernels only) rather than fall back to /usr/local/cuda. That build
compiles the same sources as RESNET_FAST_NO_CUDA=1, so one build covers both; the switch
itself is checked on setup.py's decision, which needs no compiler. The build is about 6.5
CPU-minutes (10.5 minutes on two cores shared with other builds).
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import resnet_fast

ROOT = Path(__file__).resolve().parents[1]

_CHECK_INSTALLED = """
import sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, resnet_fast
assert resnet_fast.__file__.startswith(sys.argv[1]), resnet_fast.__file__
ours = [str(w.message) for w in caught if w.category is resnet_fast.ExtensionWarning]
assert not ours, ours
status = resnet_fast.available_backends()
assert status["cpu"].available, status["cpu"]
assert "built without CUDA kernels" in status["cuda"].detail, status["cuda"]
x = torch.randn(2, 3, 5, 7)
assert torch.equal(resnet_fast.ops.add_relu(x, x, backend="cpu"), torch.relu(x + x))
print("ok")
"""


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout + result.stderr


def _env(**changes):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "CUDA_PATH", "RESNET_FAST_NO_CUDA", "PYTHONPATH")}
    return {**env, **changes}


def _sdist(out: Path, env: dict) -> tuple[Path, str]:
    """Make the sdist in ``out`` (egg-info there too, not in the source tree); return its path
    and setup.py's output."""
    log = _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out),
                "sdist", "--dist-dir", str(out)], cwd=ROOT, env=env)
    return next(out.glob("resnet_fast-*.tar.gz")), log


@pytest.fixture(scope="module")
def cpu_only_wheel(tmp_path_factory):
    """The wheel built from the sdist with CUDA_HOME pointing at a folder without nvcc, the
    build's output, and the folder the wheel was unpacked into."""
    tmp = tmp_path_factory.mktemp("install")
    no_toolkit = tmp / "no-cuda-toolkit"
    no_toolkit.mkdir()
    env = _env(CUDA_HOME=str(no_toolkit), MAX_JOBS="2")
    sdist, _ = _sdist(tmp, env)
    log = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                "--no-index", "-w", str(tmp / "dist"), str(sdist)], cwd=tmp, env=env)
    wheel = next((tmp / "dist").glob("resnet_fast-*.whl"))
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return wheel, log, site


@pytest.mark.slow
def test_cuda_home_without_nvcc_is_honoured(cpu_only_wheel):
    _, log, _ = cpu_only_wheel
    assert "no-cuda-toolkit has no bin/nvcc" in log and "building the CPU kernels only" in log


@pytest.mark.slow
def test_wheel_contents(cpu_only_wheel):
    wheel, _, _ = cpu_only_wheel
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"resnet_fast-{resnet_fast.__version__}.dist-info"
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert "resnet_fast/py.typed" in names and "resnet_fast/_version.py" in names
    assert "resnet_fast/kernels/triton/conv_configs.json" in names  # package-data
    assert any(n.startswith("resnet_fast/_C.") and n.endswith(".so") for n in names), names
    assert not any(n.startswith(("tests/", "csrc/")) for n in names)
    assert f"\nVersion: {resnet_fast.__version__}\n" in metadata
    assert "\nLicense-Expression: BSD-3-Clause\n" in metadata
    assert "resnet-fast = resnet_fast.cli:main" in entry_points


@pytest.mark.slow
def test_cpu_only_extension_loads(cpu_only_wheel):
    _, _, site = cpu_only_wheel
    out = _run([sys.executable, "-c", _CHECK_INSTALLED, str(site)], cwd=site.parent,
               env=_env(PYTHONPATH=str(site)))
    assert out.strip().endswith("ok")


def test_no_cuda_switch_skips_the_toolkit(tmp_path):
    _, log = _sdist(tmp_path, _env(RESNET_FAST_NO_CUDA="1", CUDA_HOME="/usr/local/cuda"))
    assert "RESNET_FAST_NO_CUDA=1, building the CPU kernels only" in log
