#!/usr/bin/env bash
# One call on a GPU machine answers every open GPU question: environment, build, GPU tests (with
# either nce_bwd kernel), the Triton backward against the CUDA one, the opt-in forward variants,
# and the sweep. Usage (device tool, from the repo root):
#   AMDIM_COMMIT=<git rev-parse HEAD> bash benchmarks/gpu_check.sh [STEP]...
# Steps: tests triton-bwd-tests bwd fwd-variants sweep (the default set), and bench mixture train
# (only when named; "all" = every step). Every step runs under its own timeout. The device tool
# allows 10 minutes per command, so run the default set as three calls, each under ~9 minutes
# (~25 minutes in all):
#   1. tests                       2. triton-bwd-tests bwd        3. fwd-variants sweep
# The extension build and Triton's kernel cache live under build/ (git-ignored, so kept between
# calls on a warm machine): only the first call compiles the extension.
# Everything lands in $OUT (default benchmarks/results/gpu_<timestamp>/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton_cache}
steps=${*:-tests triton-bwd-tests bwd fwd-variants sweep}
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

{
  # the device machine gets a copy of the tree without .git: pass AMDIM_COMMIT from the caller
  echo "commit: ${AMDIM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

t0=$(date +%s)
python -c "import amdim_kernels.ops as o; print('triton cuda backend:', o.HAS_TRITON_CUDA, o.TRITON_CUDA_MISSING or '', '| nce_bwd on CUDA:', o.CUDA_BWD)" \
  2>&1 | tee "$OUT/build.txt"
echo "build+load: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"

# The fused-loss tests that reach nce_bwd through the registered CUDA kernel.
OP_TESTS="tests/test_nce_fused.py tests/test_estimators.py tests/test_mixture.py tests/test_ops.py"

if has tests; then   # default kernels (nce_bwd: csrc/cuda); includes the Triton nce_bwd's own GPU tests
  stamp tests
  timeout 420 python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -80 > "$OUT/gpu_tests.txt"
  tail -5 "$OUT/gpu_tests.txt"
fi
if has triton-bwd-tests; then   # the same fused losses with the Triton nce_bwd registered instead
  stamp triton-bwd-tests
  AMDIM_KERNELS_CUDA_BWD=triton timeout 200 python -m pytest -q -m gpu $OP_TESTS -p no:cacheprovider \
    2>&1 | tail -60 > "$OUT/gpu_tests_triton_bwd.txt"
  tail -5 "$OUT/gpu_tests_triton_bwd.txt"
fi
if has bwd; then   # is the Triton nce_bwd faster than the CUDA one? op level, then the whole loss
  stamp bwd
  for dt in bfloat16 float32; do
    timeout 80 python benchmarks/profile_gpu.py --bwd-compare --shapes S1 S2 S3 --dtype $dt \
      --out "$OUT/bwd_compare_$dt.json" 2>&1 | tail -5
  done
  BWD_SHAPES="512x512x49x2048 4096x4096x49x1024 2048x2048x49x256 256x256x25x256"
  for k in cuda triton; do
    AMDIM_KERNELS_CUDA_BWD=$k timeout 90 python benchmarks/bench_nce.py --device cuda --shapes $BWD_SHAPES \
      --variants fused products --modes fwd+bwd --tag "bwd_$k" --out "$OUT/bench_nce_bwd_$k.json" 2>&1 | tail -8
  done
fi
if has fwd-variants; then   # the opt-in forward variants against the default
  stamp fwd-variants
  FWD_SHAPES="512x512x49x2048 4096x4096x49x1024 2048x2048x49x256"
  for v in default "AMDIM_KERNELS_FWD_TANH=rational" "AMDIM_KERNELS_FWD_CONFIGS=wide"; do
    tag=${v#*=}
    env ${v/default/AMDIM_KERNELS_FWD_TANH=exp} timeout 50 python benchmarks/bench_nce.py --device cuda \
      --shapes $FWD_SHAPES --variants fused products --modes fwd --tag "fwd_$tag" \
      --out "$OUT/bench_nce_fwd_$tag.json" 2>&1 | tail -5
  done
fi
if has bench; then
  stamp bench
  timeout 300 python benchmarks/bench_nce.py --device cuda --tag h100 --out "$OUT/bench_nce_cuda.json" 2>&1 | tail -40
fi
if has mixture; then
  stamp mixture
  timeout 200 python benchmarks/bench_mixture.py --device cuda --out "$OUT/bench_mixture_cuda.json" 2>&1 | tail -20
fi
if has train; then
  stamp train
  bash benchmarks/train_gpu.sh 2>&1 | tee "$OUT/train_gpu.txt"
fi
if has sweep; then
  # N = B from 128 to 16384, L in {25, 49}, D in {256, 1024, 2048} in bf16 (the production dtype);
  # fp16 and fp32 on N = B <= 4096 at L = 49. N-major, so that a timeout cuts the largest
  # problems rather than a whole D; bench_nce.py rewrites its files after every case.
  grid() {  # grid "NB..." "L..."
    local out=""
    for nb in $1; do for d in 256 1024 2048; do for l in $2; do out="$out ${nb}x${nb}x${l}x${d}"; done; done; done
    echo "$out"
  }
  full=$(grid "128 256 512 1024 2048 4096 8192 16384" "25 49")
  small=$(grid "128 256 512 1024 2048 4096" "49")
  for spec in "bfloat16:240:full" "float16:90:small" "float32:90:small"; do
    IFS=: read -r dt limit set <<< "$spec"
    if [[ $set == full ]]; then shapes=$full; else shapes=$small; fi
    stamp "sweep $dt"
    timeout "$limit" python benchmarks/bench_nce.py --device cuda --sweep --shapes $shapes --dtype "$dt" \
      --variants fused products --modes fwd+bwd --repeats 5 --warmup 1 --tag "sweep_$dt" \
      --out "$OUT/bench_nce_cuda_sweep_$dt.json" 2>&1 | tail -12
  done
fi
stamp done
ls -la "$OUT"
