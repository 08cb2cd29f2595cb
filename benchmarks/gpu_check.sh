#!/usr/bin/env bash
# One call on a GPU machine answers every GPU question: environment, build, GPU tests, benchmarks.
# Usage (device tool, from the repo root):
#   AMDIM_COMMIT=<git rev-parse HEAD> bash benchmarks/gpu_check.sh [tests|bench|mixture|train|sweep|all]...
# Everything lands in $OUT (default benchmarks/results/gpu_<timestamp>/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
steps=${*:-all}
has() { [[ " $steps " == *" $1 "* || " $steps " == *" all "* ]]; }

{
  # the device machine gets a copy of the tree without .git: pass AMDIM_COMMIT from the caller
  echo "commit: ${AMDIM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

t0=$(date +%s)
python -c "import amdim_kernels.ops as o; print('triton cuda backend:', o.HAS_TRITON_CUDA, o.TRITON_CUDA_MISSING or '')" \
  2>&1 | tee "$OUT/build.txt"
echo "build+load: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.txt"

if has tests; then
  timeout 420 python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -80 > "$OUT/gpu_tests.txt"
  tail -5 "$OUT/gpu_tests.txt"
fi
if has bench; then
  timeout 300 python benchmarks/bench_nce.py --device cuda --tag h100 --out "$OUT/bench_nce_cuda.json" 2>&1 | tail -40
fi
if has mixture; then
  timeout 200 python benchmarks/bench_mixture.py --device cuda --out "$OUT/bench_mixture_cuda.json" 2>&1 | tail -20
fi
if has train; then
  bash benchmarks/train_gpu.sh 2>&1 | tee "$OUT/train_gpu.txt"
fi
if has sweep; then
  timeout 420 python benchmarks/bench_nce.py --device cuda --sweep --tag sweep --out "$OUT/bench_nce_cuda_sweep.json" 2>&1 | tail -30
fi
ls -la "$OUT"
