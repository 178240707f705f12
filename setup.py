"""Build of the native extension ``resnet_fast._C``; the package metadata is in pyproject.toml.

The C++ CPU kernels are always built. The CUDA kernels are built when a real CUDA toolkit
is found and torch was built with CUDA; otherwise the build says why and builds the CPU
kernels only. Knobs (environment variables):

  CUDA_HOME              the toolkit to use, and the only one looked at when set (it needs
                         bin/nvcc and include/cuda_runtime.h); unset: /usr/local/cuda
  RESNET_FAST_NO_CUDA=1  skip the CUDA sources even when a toolkit is present
  TORCH_CUDA_ARCH_LIST   target archs; default "8.0;9.0" when no GPU is visible
  MAX_JOBS               parallel compile jobs; default bounded by CPU count and RAM
"""

import glob
import os
import platform
import re
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _find_cuda_home():
    """The real CUDA toolkit, or None with the reason.

    torch guesses CUDA_HOME from the `nvcc` on PATH; where that nvcc is a wrapper script
    (as on our dev machines, /usr/local/bin/nvcc) the guess is /usr/local and linking
    fails. So take CUDA_HOME (or CUDA_PATH) when set, else /usr/local/cuda, and accept the
    directory only when it holds bin/nvcc and include/cuda_runtime.h. A CUDA_HOME set to a
    directory without them is honoured (a CPU-only build), not replaced by /usr/local/cuda.
    """
    var = next((v for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)), None)
    candidate = Path(os.environ[var] if var else "/usr/local/cuda")
    missing = [f for f in ("bin/nvcc", "include/cuda_runtime.h") if not (candidate / f).is_file()]
    if not missing:
        return str(candidate.resolve()), None
    where = f"{var}={candidate}" if var else f"no CUDA_HOME set and {candidate}"
    return None, f"{where} has no {' or '.join(missing)}"


def _nvcc_major(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True, check=False).stdout
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


WANT_CUDA = os.environ.get("RESNET_FAST_NO_CUDA", "0") != "1"
CUDA_HOME, NO_TOOLKIT = _find_cuda_home() if WANT_CUDA else (None, None)
if CUDA_HOME:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

build_cuda = False
if not WANT_CUDA:
    print("resnet_fast: RESNET_FAST_NO_CUDA=1, building the CPU kernels only")
elif CUDA_HOME is None:
    warnings.warn(f"resnet_fast: {NO_TOOLKIT}; building the CPU kernels only", stacklevel=1)
elif torch.version.cuda is None:
    warnings.warn("resnet_fast: this torch has no CUDA support; building the CPU kernels only",
                  stacklevel=1)
elif _nvcc_major(CUDA_HOME) != int(torch.version.cuda.split(".")[0]):
    warnings.warn(f"resnet_fast: nvcc in {CUDA_HOME} is CUDA {_nvcc_major(CUDA_HOME)} but torch "
                  f"was built with CUDA {torch.version.cuda}; building the CPU kernels only",
                  stacklevel=1)
else:
    build_cuda = True

if build_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # A100 and H100

if "MAX_JOBS" not in os.environ:
    # nvcc on a torch-including .cu file can use 2-3 GB; keep jobs within RAM.
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram_gb = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(ram_gb // 3))))


def _nvidia_wheel_include(package, header):
    """The include dir of an nvidia-* wheel (installed with the CUDA build of torch) that
    holds ``header``, or None."""
    for entry in sys.path:
        inc = Path(entry, "nvidia", package, "include")
        if (inc / header).is_file():
            return str(inc)
    return None


def _extra_cuda_include_dirs(cuda_home):
    """cuDNN headers come from the nvidia-cudnn wheel. A slim toolkit (as on our dev machines)
    lacks the math-library headers ATen's CUDA headers include (cusparse.h, cublas_v2.h);
    those come from the nvidia/cu13 wheel, searched after the toolkit's own include dir."""
    dirs = [_nvidia_wheel_include("cudnn", "cudnn.h")]
    if not Path(cuda_home, "include", "cusparse.h").is_file():
        major = torch.version.cuda.split(".")[0]
        dirs.append(_nvidia_wheel_include(f"cu{major}", "cusparse.h"))
    return [d for d in dirs if d]


sources = ["csrc/ops.cpp", "csrc/tensor_states.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
# No -std flag: torch's cpp_extension picks the standard its headers need (C++20 from 2.10 on).
# -fopenmp: at::parallel_for is a header template that runs threads only when the including
# code is compiled with OpenMP (as libtorch is); without it our kernels run on one thread.
# Compile with it but do not link libgomp: the GOMP_* symbols then resolve to the OpenMP
# runtime libtorch_cpu already loaded. Linking the system libgomp loads a second runtime whose
# thread pool fights torch's for the cores (measured: eager torch.relu(x + r) 18x slower).
cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
link_flags = []
if build_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    ext = CUDAExtension(
        "resnet_fast._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        extra_link_args=link_flags,
    )
    # Appended after CUDAExtension added torch's and the toolkit's include dirs.
    ext.include_dirs += _extra_cuda_include_dirs(CUDA_HOME)
else:
    ext = CppExtension(
        "resnet_fast._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

_AVX2 = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mpopcnt"]
# Per-file flags by file-name suffix, as PyTorch compiles its capability kernels.
ISA_FLAGS = {
    "_avx2.cpp": _AVX2 + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "_avx512.cpp": _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                            "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "_avx512bf16.cpp": _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                                "-mavx512bf16"],
}


class BuildExt(BuildExtension):
    """torch's BuildExtension, plus per-file flags for the CPU-capability sources.

    ``csrc/cpu/*_avx2.cpp`` and ``*_avx512.cpp`` are compiled on their own with ISA_FLAGS,
    as PyTorch compiles its own capability kernels, and linked in as extra objects; the code
    runs only after ``use_avx2()`` / ``winograd_isa()`` said the CPU has it. (A ``#pragma GCC target`` in the file instead
    worked with GCC 12 but GCC 13 rejects it: libstdc++'s always_inline functions then have
    a target mismatch.) Not x86-64: the file compiles without the flags and aliases the
    portable kernels."""

    def build_extension(self, ext):
        for suffix, flags in ISA_FLAGS.items():
            special = [s for s in ext.sources if s.endswith(suffix)]
            if not special:
                continue
            ext.sources = [s for s in ext.sources if s not in special]
            args = ext.extra_compile_args
            extra = flags if _X86_64 else []
            post = ({k: list(v) + (extra if k == "cxx" else []) for k, v in args.items()}
                    if isinstance(args, dict) else list(args) + extra)
            objects = self.compiler.compile(
                special, output_dir=os.path.join(self.build_temp, suffix[1:-4]),
                macros=ext.define_macros, include_dirs=ext.include_dirs,
                debug=self.debug, extra_postargs=post, depends=ext.depends)
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
