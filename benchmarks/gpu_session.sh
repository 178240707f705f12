#!/usr/bin/env bash
# One lent-GPU session in one call (device time is scarce): build the extension for the GPU
# that is there, run the test suite (the gpu tier first), the kernel suites and the model
# benchmark, logging everything under $OUT (default ./gpu-out).
#
#   benchmarks/gpu_session.sh [stage ...]     stages: env build gpu-tests cpu-tests kernels
#                                             diag model train tune
#                                             (default: env build gpu-tests)
# Each stage has its own time limit (seconds, env: T_<STAGE>), so one slow stage cannot eat
# the whole call. Results JSON goes to $OUT; copy it to benchmarks/results/<device>/.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env build gpu-tests)

stage() {  # stage NAME LIMIT CMD...
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 )) s"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  return $rc
}

for s in "${stages[@]}"; do
  case $s in
    env)
      stage env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton, torchvision, sys;
print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__,
torchvision.__version__, torch.cuda.get_device_name(), torch.backends.cudnn.version())'" ;;
    build)
      # Only this GPU's architecture: half the compile time of the default pair.
      arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
      # The image's default g++ is /opt/gcc/bin/g++ (GCC 13): an extension built with it
      # segfaulted in std::ostream::_M_insert (a copy linked into _C.so, not libstdc++'s) on
      # every CPU-op path that formats a message (2026-11-23). Prefer the system compiler.
      cxx=$(command -v /usr/bin/g++ || command -v g++)
      stage build ${T_BUILD:-300} env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 CXX="$cxx" \
        $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
        || { grep -m5 -B2 -A8 "error" "$OUT/build.log"; exit 1; } ;;
    gpu-tests)
      stage gpu-tests ${T_GPU:-360} env RESNET_FAST_REQUIRE_CUDA_BUILD=1 \
        $PY -m pytest ${GPU_TESTS:-tests} -m gpu -v -p no:cacheprovider --timeout 90 --durations=15 \
        --junitxml="$OUT/gpu-tests.xml" ;;
    cpu-tests)
      stage cpu-tests ${T_CPU:-300} $PY -m pytest tests -m "not gpu" -q -p no:cacheprovider \
        --timeout 240 -n 8 --durations=10 ;;
    kernels)
      stage kernels ${T_KERNELS:-240} $PY -m pytest benchmarks -q -p no:cacheprovider \
        --benchmark-json="$OUT/kernels.json" ${KERNEL_ARGS:-} ;;
    diag)  # native backtraces of CPU-op crashes (cuda-gdb debugs host code; no gdb there)
      i=0
      for snippet in "x=torch.randn(2,3,4,4); torch.ops.resnet_fast.add_relu(x, x[:1])" \
          "x=torch.randn(1,64,8,8).to(memory_format=torch.channels_last); w=torch.randn(64,64,3,3); print(torch.ops.resnet_fast.conv_bias_act(x,w,None,[1,1],[1,1],[1,1],1,None,True).sum())"; do
        i=$((i + 1)); stage "diag$i" 60 cuda-gdb -q -batch -ex run -ex bt --args $PY -c "import torch, resnet_fast; $snippet"
      done ;;
    model)  # one process per batch size, so a slow one cannot lose the others' results.
      # All candidates by default, compile_max_autotune included (its autotuning takes
      # minutes per batch size: raise T_MODEL, or leave it out with MODEL_ARGS=--candidates ...).
      for b in ${BATCHES:-256 32 1}; do
        stage "model-b$b" ${T_MODEL:-420} $PY -m resnet_fast.bench --device cuda --dtype bfloat16 \
          --batch "$b" --out "$OUT/model-b$b" --no-progress --no-plot ${MODEL_ARGS:-}
      done ;;
    train)
      stage train ${T_TRAIN:-300} $PY -m resnet_fast.bench --train --device cuda \
        --dtype bfloat16 --batch "${TRAIN_BATCHES:-256}" --out "$OUT/train" --no-progress \
        ${TRAIN_ARGS:-} ;;
    tune)  # Triton conv configs per shape. Both JSON files are merged after every conv, so a
      # stage cut short keeps its rows; bring back conv_configs.json to
      # resnet_fast/kernels/triton/ and triton_conv_tune.json to benchmarks/results/<device>/.
      # Subsets: TUNE_ARGS="--archs resnet50 --batches 256 --dtypes bfloat16".
      cp resnet_fast/kernels/triton/conv_configs.json "$OUT/conv_configs.json"
      stage tune ${T_TUNE:-540} $PY benchmarks/tune_triton_conv.py \
        --table "$OUT/conv_configs.json" --out "$OUT/triton_conv_tune.json" ${TUNE_ARGS:-} ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
# At most 8 files come back from a call: everything in one archive.
if [ "${PACK:-1}" = 1 ]; then
  tar czf /tmp/gpu-session.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/gpu-session.tgz "$OUT/"
fi
