#!/usr/bin/env bash
# One call on a GPU machine answers every GPU question, in priority order, and ends by itself
# within 480 s of wall time (the device tool: run it with timeout_s 540):
#   AMDIM_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh     # everything
#   bash benchmarks/gpu_check.sh --plan                                  # the steps, no GPU needed
#   bash benchmarks/gpu_check.sh STEP...                                 # some steps only
# Each step runs under its own limit (SIGINT at the limit, so pytest and the benchmarks still write
# what they have; SIGKILL GRACE seconds later) and writes its files to $OUT as soon as they exist:
# a call cut short returns everything before the cut. $OUT defaults to
# benchmarks/results/gpu_<UTC time>/; env.json names the GPU, driver, torch / triton / CUDA versions
# and the commit (the device machine gets the tree without .git: pass AMDIM_COMMIT).
# Build products and Triton's cache live under build/ (git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=480   # seconds for the whole call, grace periods included (tests/test_gpu_check_plan.py)
GRACE=3
STEPS=(env build tests bwd-ops targets amdim largest table sweep)
declare -A LIMIT=([env]=10 [build]=60 [tests]=170 [bwd-ops]=35 [targets]=95 [amdim]=40
                  [largest]=25 [table]=5 [sweep]=13)
declare -A WHAT=(
  [env]="GPU, driver, torch/triton/CUDA versions, commit -> env.json"
  [build]="the CPU extension and the CUDA C++ backward, in parallel; which variants exist"
  [tests]="GPU tests that decide correctness (every dtype, estimator, variant; sync-free, graphs, compile, strict) -> tests.log, gpu_tests.xml"
  [bwd-ops]="nce_bwd op: the three backward variants on the same inputs, S1 S2 S3 bf16, S1 S3 fp32 -> bwd_ops_*.json"
  [targets]="S2, S1, N=B=8192 D=256: fused with each backward variant, products; eager and compiled reference at S1 -> bench_targets_*.json"
  [amdim]="N=B in {128,256,480}, D in {1024,1536,2560}: fused (tiled and dense forward) vs torch.compile -> bench_amdim_*.json"
  [largest]="largest N=B at L=49, D=1024 that runs forward+backward (one config per kernel, no autotuning) -> largest.json"
  [table]="the backend='auto' table these results imply -> auto_table.py (commit it after reading)"
  [sweep]="N=B 128..16384, L 25/49, D 256/1024/2048, bf16, as far as time allows -> bench_sweep.json"
)

plan() {
  local total=0
  printf "%-8s %6s  %s\n" step limit_s what
  for s in "${STEPS[@]}"; do
    printf "%-8s %6d  %s\n" "$s" "${LIMIT[$s]}" "${WHAT[$s]}"
    total=$((total + LIMIT[$s] + GRACE))
  done
  printf "total %d s of %d (limits + %d s grace per step)\n" "$total" "$BUDGET" "$GRACE"
}
if [[ "${1:-}" == "--plan" ]]; then plan; exit 0; fi
for s in "$@"; do
  [[ -n "${LIMIT[$s]:-}" ]] || { echo "unknown step '$s' (steps: ${STEPS[*]})" >&2; exit 2; }
done
selected=" ${*:-${STEPS[*]}} "

OUT=${OUT:-benchmarks/results/gpu_$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests:$PWD/benchmarks
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton_cache}
export AMDIM_COMMIT=${AMDIM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
start=$(date +%s)
plan > "$OUT/plan.txt"
printf "step\tstatus\tseconds\tlimit\n" > "$OUT/steps.tsv"

# run_step NAME CMD...: CMD under the step's limit (cut to what is left of the budget), its output
# in $OUT/NAME.log, one line in steps.tsv as soon as it ends.
run_step() {
  local name=$1; shift
  [[ "$selected" == *" $name "* ]] || return 0
  local left=$((BUDGET - ($(date +%s) - start) - GRACE))
  local limit=$(( LIMIT[$name] < left ? LIMIT[$name] : left ))
  if (( limit < 1 )); then printf "%s\tskipped (no time left)\t0\t%s\n" "$name" "${LIMIT[$name]}" >> "$OUT/steps.tsv"; return 0; fi
  echo "[$(date -u +%H:%M:%S)] $name (limit ${limit} s): ${WHAT[$name]}"
  local t0=$(date +%s)
  # timeout signals its whole process group: the python under bash -c gets the SIGINT too
  timeout -s INT -k "$GRACE" "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  if (( rc == 124 || rc == 137 )); then status="cut at the limit"; elif (( rc != 0 )); then status="exit $rc"; fi
  printf "%s\t%s\t%d\t%d\n" "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" >> "$OUT/steps.tsv"
  tail -4 "$OUT/$name.log"
}

env_record() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python - "$OUT/env.json" <<'PY'
import json, os, subprocess, sys, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
nvcc = subprocess.run("nvcc --version | tail -1", shell=True, capture_output=True, text=True).stdout.strip()
env = dict(commit=os.environ.get("AMDIM_COMMIT"), gpu=torch.cuda.get_device_name(), nvidia_smi=smi,
           capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
           cuda=torch.version.cuda, triton=tv, nvcc=nvcc or None,
           memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(env)
PY
}

build() {   # the two builds in parallel (each cached under build/), then what registered
  python -c "from amdim_kernels import _extension as e; e.load()" &
  local cpu=$!
  python -c "
from amdim_kernels import _extension as e; import torch
src, why = e.cuda_bwd_status([torch.cuda.get_device_capability()])
print('CUDA C++ backward:', src or why)
if src == 'build': e.load_cuda_bwd()" &
  local cuda=$!
  wait $cpu; wait $cuda
  python -c "
import amdim_kernels.ops as o
print('CUDA kernels registered:', o.HAS_TRITON_CUDA, o.TRITON_CUDA_MISSING or '')
print('variants:', o.SELECTION.describe() if o.SELECTION else '-')"
}

gpu_tests() {   # the decisive files first; one config per autotuned kernel (tests/gpu_one_config.py)
  python -m pytest -v -rA -m gpu -p gpu_one_config -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" \
    tests/test_gpu_losses.py tests/test_cuda_nce_bwd.py tests/test_triton_nce_bwd_cublas.py \
    tests/test_triton_nce_fwd.py tests/test_triton_nce_bwd.py tests/test_kernels_reliability.py \
    tests/test_estimators.py tests/test_mixture.py
}

bwd_ops() {
  python benchmarks/profile_gpu.py --bwd-compare --shapes S1 S2 S3 --dtype bfloat16 --out "$OUT/bwd_ops_bf16.json"
  python benchmarks/profile_gpu.py --bwd-compare --shapes S1 S3 --dtype float32 --out "$OUT/bwd_ops_fp32.json"
}

bench() {   # bench TAG [ENV=VALUE...] -- bench_nce.py arguments
  local tag=$1; shift
  local envs=()
  while [[ "$1" != "--" ]]; do envs+=("$1"); shift; done
  shift
  env ${envs[@]+"${envs[@]}"} python benchmarks/bench_nce.py --device cuda --tag "$tag" --out "$OUT/bench_$tag.json" "$@"
}

targets() {   # S2 first (the forward and memory targets), then S1 against eager and compiled
  local few="--repeats 10 --warmup 2"
  bench targets_default -- --shapes 4096x4096x49x1024 --variants fused products $few
  bench targets_default_s1 -- --shapes 512x512x49x2048 --variants fused products reference compiled $few
  for v in triton_cublas triton cuda; do
    bench "targets_$v" AMDIM_KERNELS_CUDA_BWD=$v -- \
      --shapes 4096x4096x49x1024 512x512x49x2048 8192x8192x49x256 --variants fused $few
  done
  bench targets_default_d256 -- --shapes 8192x8192x49x256 --variants products $few
  bench targets_torch_epilogue AMDIM_KERNELS_CUDA_EPILOGUE=torch -- --shapes 512x512x49x2048 \
    --variants fused $few     # what the fused epilogue saves, at the shape the host bounds
}

amdim() {
  local shapes="" few="--repeats 10 --warmup 2"
  for nb in 128 480 256; do for d in 1024 2560 1536; do shapes="$shapes ${nb}x${nb}x49x${d}"; done; done
  bench amdim_tiled AMDIM_KERNELS_CUDA_FWD=tiled -- --shapes $shapes --variants fused products compiled --modes fwd+bwd $few
  bench amdim_dense AMDIM_KERNELS_CUDA_FWD=dense AMDIM_KERNELS_CUDA_BWD=triton_cublas -- --shapes $shapes \
    --variants fused --modes fwd+bwd $few
}

largest() {
  python - "$OUT/largest.json" <<'PY'
import json, sys, time, torch
import amdim_kernels as ak
from gpu_one_config import first_configs_only
first_configs_only()   # does it run, not how fast: autotuning here would time every config
rows = []
for nb in (32768, 49152, 65536):
    try:
        src = torch.randn(nb, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        trg = torch.randn(nb, 49, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        loss, reg = ak.fused_nce_loss(src, trg)
        (loss + reg).backward()
        torch.cuda.synchronize()
        rows.append(dict(n_b=nb, status="ok", seconds=time.perf_counter() - t0, loss=loss.item(),
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30))
    except torch.OutOfMemoryError as err:
        rows.append(dict(n_b=nb, status="OOM", error=str(err)[:300]))
    print(rows[-1], flush=True)
    json.dump(dict(memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30, rows=rows),
              open(sys.argv[1], "w"), indent=1)
    del src, trg
    torch.cuda.empty_cache()
    if rows[-1]["status"] != "ok":
        break
PY
}

table() { python benchmarks/auto_table.py "$OUT" --out "$OUT/auto_table.py"; }

sweep() {
  local shapes=""
  for nb in 128 512 2048 8192 256 1024 4096 16384; do for d in 256 1024 2048; do for l in 49 25; do
    shapes="$shapes ${nb}x${nb}x${l}x${d}"; done; done; done
  bench sweep -- --sweep --shapes $shapes --dtype bfloat16 --variants fused products --modes fwd+bwd \
    --repeats 5 --warmup 1
}

export OUT
export -f env_record build gpu_tests bwd_ops bench targets amdim largest table sweep
run_step env env_record
run_step build build
run_step tests gpu_tests
run_step bwd-ops bwd_ops
run_step targets targets
run_step amdim amdim
run_step largest largest
run_step table table
run_step sweep sweep
echo "[$(date -u +%H:%M:%S)] done in $(( $(date +%s) - start )) s"
cat "$OUT/steps.tsv"
