#!/usr/bin/env bash
# The prepared GPU check (issue 27): what only a GPU can show, the never-run kernels first, in
# calls of the device tool that each end inside their limit and resume where the last stopped.
#
#   bash benchmarks/gpu_check.sh     # device tool: timeout_s 560; then the same call at once
#
# Stages, in order: name, time limit (s), least time worth starting it with (s).
#   env        nvidia-smi, torch / triton / CUDA / cuDNN versions, commit, compilers
#   build      the extension for this GPU's arch only, with a C/C++ compiler that passed a probe;
#              skipped when resnet_fast._C already loads with its CUDA kernels
#   native     tests/test_gpu_native_ops.py: CUDA and Triton training BN, the CUDA conv op;
#              tests/test_detection.py: the fused FPN on CUDA
#   stem       the padded stem on cuda and triton (tests/test_plans.py)
#   triton     the Triton conv on every ResNet-50 conv in bfloat16 (tests/test_conv_bias_act.py)
#   bench256   resnet-fast bench, ResNet-50 bf16 batch 256 (Triton autotune off, 20 repeats)
#   bench1     the same at batch 1
#   bench32    the same at batch 32
#   train256   a batch-256 bf16 training step
# Each stage runs under `timeout -s TERM` (the bench writes its partial JSON on SIGTERM) with
# the smaller of its limit and what is left of this call's budget. A stage that finished, failed
# or ran out its own limit is done; one cut short by the call's budget runs again in the next
# call; one that the budget left too little time for starts the next call.
#
# Everything goes to $STATE (default build/gpu_check: ignored build output, which stays on the
# machine while it is warm, 30 s after a call) and, after every stage, to $OUT/gpu_check/:
# summary.json (stage, status, wall time, call), gpu_check.log, and gpu_check.tgz holding
# every stage's log, JUnit XML and bench JSON (the tool brings back at most 8 files).
#
# Environment: OUT (default gpu-out), PY (python3), GPU_CHECK_BUDGET_S (this call's seconds,
# default 530: under timeout_s 560 with room for the archive), GPU_CHECK_STATE,
# GPU_CHECK_FROM=<stage> (take the stages before it as done, as on a fresh machine after a
# lost one; the build still runs unless the extension loads), GPU_CHECK_TEST_TIMEOUT (seconds
# per test, default 120, where pytest-timeout is installed; else each stage bounds its file).
# GPU_CHECK_DRY=1: no GPU; prints each stage's commands instead of running them (the compiler
# probe runs), each stage taking simulated time (its limit, or GPU_CHECK_DRY_SECONDS
# "name=s name=s ..."), the extension taken as loading when GPU_CHECK_DRY_LOADS=1; tests use it.
set -u
SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
cd "$(dirname "$SELF")/.."
OUT=${OUT:-gpu-out}
PY=${PY:-python3}
STATE=${GPU_CHECK_STATE:-build/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-530}
DRY=${GPU_CHECK_DRY:-0}
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$STATE"

STAGES=(
  "env 30 10"
  "build 300 120"
  "native 180 60"
  "stem 60 30"
  "triton 120 60"
  "bench256 240 120"
  "bench1 150 90"
  "bench32 150 90"
  "train256 180 120"
)
BENCH="-m resnet_fast.bench --device cuda --dtype bfloat16 --repeats 20 --no-progress --no-plot"
INFER=eager,eager_cl,compile,compile_reduce_overhead,resnet_fast,optimize
TRAIN=eager,eager_cl,compile,resnet_fast

run() {  # the command, or in dry mode its line
  if [ "$DRY" = 1 ]; then echo "DRY: $*"; else "$@"; fi
}

extension_ok() {  # resnet_fast._C loads and registered its CUDA kernels
  if [ "$DRY" = 1 ]; then [ "${GPU_CHECK_DRY_LOADS:-0}" = 1 ]; return; fi
  "$PY" -c "import sys, resnet_fast._extension as e
sys.exit(0 if e.loaded() and e.has_kernel('bn_act_fwd', 'CUDA') else 1)" 2>/dev/null
}

probe() {  # probe CC CXX: C++20 with stream formatting (where an extension built by the
  # image's /opt/gcc g++ crashed, 2026-11-23) compiles and runs, and nvcc takes CC as its host
  # compiler (torch's builder passes CC to nvcc as -ccbin)
  local dir rc
  dir=$(mktemp -d)
  printf '%s\n' '#include <sstream>' \
    'int main() { std::ostringstream s; s << "x" << 1.5 << 2; return s.str() != "x1.52"; }' \
    >"$dir/probe.cpp"
  printf '%s\n' '__global__ void k() {}' 'int main() { k<<<1, 1>>>(); return 0; }' >"$dir/probe.cu"
  "$2" -std=c++20 -O2 "$dir/probe.cpp" -o "$dir/probe" && "$dir/probe" \
    && { [ ! -x "$NVCC" ] || "$NVCC" -ccbin "$1" -c "$dir/probe.cu" -o "$dir/probe.o"; }
  rc=$?
  rm -rf "$dir"
  return $rc
}

smoke() {  # the built extension has CUDA kernels and formats an error message without crashing
  run "$PY" -c "import torch, resnet_fast._extension as e
assert e.has_kernel('bn_act_fwd', 'CUDA'), 'resnet_fast._C has no CUDA kernels'
try:
    torch.ops.resnet_fast.add_relu(torch.randn(2, 3), torch.randn(3, 3))
except (RuntimeError, ValueError) as exc:
    print('error message formatted:', str(exc).splitlines()[0][:120])
else:
    raise SystemExit('expected a shape error from add_relu')"
}

stage_env() {
  run nvidia-smi
  run "$PY" -c "import sys, torch, triton, torchvision
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version(), '| triton', triton.__version__,
      '| torchvision', torchvision.__version__)
p = torch.cuda.get_device_properties(0)
print(p.name, 'sm_%d%d' % (p.major, p.minor), p.multi_processor_count, 'SMs',
      p.total_memory // 2**20, 'MiB')"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${GPU_CHECK_COMMIT:-unknown (no .git)}")"
  git status --short 2>/dev/null | head -20
  "$PY" -c "import pytest_timeout" 2>/dev/null && echo "pytest-timeout: yes" \
    || echo "pytest-timeout: no (each test stage is bounded per file only)"
  for c in /usr/bin/gcc /usr/bin/g++ clang clang++ gcc g++ "$NVCC"; do
    command -v "$c" >/dev/null && echo "$c: $("$c" --version 2>&1 | grep -m1 .)"
  done
}

stage_build() {
  local arch cc cxx pair
  if [ "$DRY" = 1 ]; then
    arch=${GPU_CHECK_DRY_ARCH:-9.0}
  else
    arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return
  fi
  # Torch's builder hands CC to nvcc as the host compiler, so CC and CXX are set together.
  for pair in "/usr/bin/gcc /usr/bin/g++" "clang clang++" "gcc g++"; do
    set -- $pair
    cc=$(command -v "$1") && cxx=$(command -v "$2") || { echo "no $1 / $2"; continue; }
    if ! probe "$cc" "$cxx"; then
      echo "compiler probe failed: CC=$cc CXX=$cxx"
      continue
    fi
    echo "building for sm_${arch/./} with CC=$cc CXX=$cxx"
    if run env CC="$cc" CXX="$cxx" TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . && smoke; then
      return 0
    fi
    echo "the build or its smoke test failed with CC=$cc CXX=$cxx; trying the next compiler"
  done
  echo "FALLBACK: no probed compiler built a working extension; building with the defaults"
  run env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . && smoke
}

pytest_stage() {  # pytest_stage NAME ARGS...: the gpu tier's tests among ARGS
  local name=$1 bound=()
  shift
  "$PY" -c "import pytest_timeout" 2>/dev/null && bound=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-120}")
  run env RESNET_FAST_REQUIRE_CUDA_BUILD=1 "$PY" -m pytest "$@" -m gpu -v -rA \
    -p no:cacheprovider --durations=10 --junitxml="$STATE/$name.xml" "${bound[@]}"
}

bench() {  # bench NAME ARGS...
  local name=$1
  shift
  run env RESNET_FAST_TRITON_AUTOTUNE=0 "$PY" $BENCH --out "$STATE/$name" "$@"
}

stage_body() {
  case $1 in
    env) stage_env ;;
    build) stage_build ;;
    native) pytest_stage native tests/test_gpu_native_ops.py tests/test_detection.py ;;
    stem) pytest_stage stem tests/test_plans.py -k padded_stem ;;
    triton) pytest_stage triton tests/test_conv_bias_act.py \
              -k "gpu_every_resnet50_conv_full_size and triton and bfloat16" ;;
    bench256) bench bench256 --batch 256 --candidates "$INFER" ;;
    bench1) bench bench1 --batch 1 --candidates "$INFER" ;;
    bench32) bench bench32 --batch 32 --candidates "$INFER" ;;
    train256) bench train256 --train --batch 256 --candidates "$TRAIN" ;;
    *) echo "unknown stage $1"; return 2 ;;
  esac
}

if [ "${1:-}" = --stage ]; then
  stage_body "$2"
  exit
fi

# --- the driver ---------------------------------------------------------------------------
CALL=$(( $(cat "$STATE/calls" 2>/dev/null || echo 0) + 1 ))
echo "$CALL" >"$STATE/calls"
START=$(date +%s)
SIMULATED=0  # dry mode's clock

elapsed() {
  if [ "$DRY" = 1 ]; then echo "$SIMULATED"; else echo $(( $(date +%s) - START )); fi
}

log() {
  echo "[gpu_check call $CALL +$(elapsed)s] $*" | tee -a "$STATE/gpu_check.log"
}

dry_seconds() {  # the simulated run time of stage $1: GPU_CHECK_DRY_SECONDS, else its limit
  local pair
  for pair in ${GPU_CHECK_DRY_SECONDS:-}; do  # "name=seconds ...": split on spaces
    [ "${pair%%=*}" = "$1" ] && { echo "${pair#*=}"; return; }
  done
  echo "$2"
}

record() {  # record STAGE STATUS RC WALL LIMIT: into summary.json, rewritten whole
  "$PY" - "$STATE/summary.json" "$CALL" "$BUDGET" "$(elapsed)" "$DRY" "$@" <<'EOF'
import json, os, sys
path, call, budget, used, dry, stage, status, rc, wall, limit = sys.argv[1:]
try:
    with open(path) as f:
        summary = json.load(f)
except (OSError, ValueError):
    summary = {"script": "benchmarks/gpu_check.sh", "calls": {}, "stages": {}}
summary["dry"] = dry == "1"
summary["calls"][call] = {"budget_s": int(budget), "used_s": int(used)}
if stage:
    entry = summary["stages"].setdefault(stage, {"attempts": []})
    entry.update(status=status, rc=None if rc == "" else int(rc), wall_s=int(wall),
                 limit_s=int(limit), call=int(call))
    entry["attempts"].append({"call": int(call), "status": status, "wall_s": int(wall)})
with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1)
os.replace(path + ".tmp", path)
EOF
}

sync_out() {  # $STATE into $OUT/gpu_check: the summary, the driver's log, one archive
  mkdir -p "$OUT/gpu_check"
  cp "$STATE/summary.json" "$STATE/gpu_check.log" "$OUT/gpu_check/" 2>/dev/null
  tar czf "$OUT/gpu_check/gpu_check.tgz.tmp" -C "$STATE" . \
    && mv "$OUT/gpu_check/gpu_check.tgz.tmp" "$OUT/gpu_check/gpu_check.tgz"
}

log "start: budget ${BUDGET}s, state $STATE, out $OUT/gpu_check$([ "$DRY" = 1 ] && echo ', DRY')"
record "" "" "" 0 0
before_from=${GPU_CHECK_FROM:+1}
stopped=""
for entry in "${STAGES[@]}"; do
  read -r name limit least <<<"$entry"
  [ "$name" = "${GPU_CHECK_FROM:-}" ] && before_from=""
  if [ -f "$STATE/$name.done" ]; then
    log "$name: done in an earlier call ($(cat "$STATE/$name.done")), skipped"
    continue
  fi
  if [ -n "$before_from" ] && [ "$name" != build ]; then
    log "$name: before GPU_CHECK_FROM=$GPU_CHECK_FROM, skipped"
    continue
  fi
  if [ "$name" = build ] && extension_ok; then
    log "build: skipped, resnet_fast._C loads with its CUDA kernels"
    echo "skipped (extension loads)" >"$STATE/build.done"
    record build "skipped (extension loads)" "" 0 "$limit"
    sync_out
    continue
  fi
  left=$(( BUDGET - $(elapsed) ))
  bound=$(( limit < left ? limit : left ))
  if [ "$bound" -lt "$least" ]; then
    stopped="$name: ${left}s left in this call, it needs at least ${least}s; call again to resume"
    break
  fi
  log "=== $name (limit ${bound}s of its ${limit}s)"
  [ -f "$STATE/$name.log" ] && mv "$STATE/$name.log" "$STATE/$name.cut.log"
  t0=$(date +%s)
  timeout -s TERM -k 15 "$bound" bash "$SELF" --stage "$name" >"$STATE/$name.log" 2>&1
  rc=$?
  wall=$(( $(date +%s) - t0 ))
  if [ "$DRY" = 1 ]; then
    wall=$(dry_seconds "$name" "$limit")
    [ "$wall" -gt "$bound" ] && { wall=$bound; rc=124; }
    SIMULATED=$(( SIMULATED + wall ))
  fi
  if [ "$rc" = 0 ]; then
    status=ok
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    [ "$bound" -lt "$limit" ] && status="cut by the call's budget" || status="timed out"
  else
    status="failed (rc $rc)"
  fi
  [ "$status" = "cut by the call's budget" ] || echo "$status, ${wall}s, call $CALL" >"$STATE/$name.done"
  record "$name" "$status" "$rc" "$wall" "$limit"
  sync_out
  log "=== $name: $status in ${wall}s"
  tail -n "${TAIL:-15}" "$STATE/$name.log"
  if [ "$status" = "cut by the call's budget" ]; then
    stopped="$name: cut by this call's budget; it runs again in the next call"
    break
  fi
done
log "${stopped:-all stages done}"
record "" "" "" 0 0
sync_out
