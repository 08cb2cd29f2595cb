#!/usr/bin/env bash
# One call on a GPU machine answers every GPU question, in priority order, and ends by itself
# within 480 s of wall time (the device tool: run it with timeout_s 540):
#   bash benchmarks/gpu_check.sh --plan        # here: the steps, their limits, and the command
#                                              # to give the device (with this checkout's commit)
#   AMDIM_COMMIT=<hash> bash benchmarks/gpu_check.sh      # on the device: everything
#   bash benchmarks/gpu_check.sh STEP...                  # some steps only
#   bash benchmarks/gpu_check.sh --dry-run [STEP...]      # here, without a GPU: every step's
#       commands on the CPU at tiny sizes, the benchmarks' arguments checked by their own parsers
# The device gets the tree without .git, so the commit must be typed into the command
# (`$(git rev-parse HEAD)` would run there, and fail); env.json also records a digest of the
# sources (tree_digest), which --plan prints for this checkout, so results stay attributable.
# Each step runs under its own limit (SIGINT at the limit, so pytest and the benchmarks still write
# what they have; SIGKILL GRACE seconds later) and writes its files to $OUT as soon as they exist:
# a call cut short returns everything before the cut. $OUT defaults to
# benchmarks/results/gpu_<UTC time>/ (build/gpu_check_dry with --dry-run); env.json names the GPU,
# driver, torch / triton / CUDA versions and the commit. GPU_CHECK_BUDGET=S shrinks the call to S
# seconds (the steps' limits are cut to what is left). Build products and Triton's cache live
# under build/ (git-ignored).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

BUDGET=${GPU_CHECK_BUDGET:-480}   # seconds for the whole call, grace included (tests/test_gpu_check_plan.py)
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

# sha256 of the sources that decide the results, as the device's copy of the tree has them
tree_digest() {
  python - <<'PY'
import hashlib, pathlib
h = hashlib.sha256()
files = [p for pattern in ("amdim_kernels/**/*.py", "csrc/**/*", "tests/**/*.py", "benchmarks/*.py",
                           "benchmarks/*.sh", "setup.py", "pyproject.toml")
         for p in pathlib.Path(".").glob(pattern) if p.is_file() and "__pycache__" not in p.parts]
for p in sorted(set(files)):
    h.update(str(p).encode() + b"\0" + p.read_bytes() + b"\0")
print(h.hexdigest()[:16])
PY
}

plan() {
  local total=0
  printf "%-8s %6s  %s\n" step limit_s what
  for s in "${STEPS[@]}"; do
    printf "%-8s %6d  %s\n" "$s" "${LIMIT[$s]}" "${WHAT[$s]}"
    total=$((total + LIMIT[$s] + GRACE))
  done
  printf "total %d s of %d (limits + %d s grace per step)\n" "$total" "$BUDGET" "$GRACE"
}
if [[ "${1:-}" == "--plan" ]]; then
  plan
  commit=$(git rev-parse HEAD 2>/dev/null)
  if [[ -n "$commit" ]]; then
    dirty=$(git status --porcelain -- amdim_kernels csrc tests benchmarks 2>/dev/null)
    echo "checkout: commit $commit${dirty:+ plus uncommitted changes}, tree_digest $(tree_digest)"
    echo "device command (timeout_s 540): AMDIM_COMMIT=$commit bash benchmarks/gpu_check.sh"
  fi
  exit 0
fi
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
for s in "$@"; do
  [[ -n "${LIMIT[$s]:-}" ]] || { echo "unknown step '$s' (steps: ${STEPS[*]})" >&2; exit 2; }
done
selected=" ${*:-${STEPS[*]}} "

DEVICE=cuda
if (( DRY )); then
  DEVICE=cpu
  if [[ -z "${OUT:-}" ]]; then OUT=build/gpu_check_dry; rm -rf "$OUT"; fi
fi
OUT=${OUT:-benchmarks/results/gpu_$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests:$PWD/benchmarks
export PYTHONUNBUFFERED=1   # a step killed at its limit keeps every line it printed in its log
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton_cache}
export AMDIM_COMMIT=${AMDIM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export DRY DEVICE
start=$(date +%s)
plan > "$OUT/plan.txt"
# appended to, not replaced: a step rerun into the same $OUT keeps the record of the others
[[ -s "$OUT/steps.tsv" ]] || printf "step\tstatus\tseconds\tlimit\n" > "$OUT/steps.tsv"

# run_step NAME CMD...: CMD under the step's limit (cut to what is left of the budget), its output
# in $OUT/NAME.log, one line in steps.tsv as soon as it ends ("ok" only if every command succeeded).
run_step() {
  local name=$1; shift
  [[ "$selected" == *" $name "* ]] || return 0
  local left=$((BUDGET - ($(date +%s) - start) - GRACE))
  local limit=$(( LIMIT[$name] < left ? LIMIT[$name] : left ))
  if (( limit < 1 )); then printf "%s\tskipped (no time left)\t0\t%s\n" "$name" "${LIMIT[$name]}" >> "$OUT/steps.tsv"; return 0; fi
  echo "[$(date -u +%H:%M:%S)] $name (limit ${limit} s): ${WHAT[$name]}"
  local t0
  t0=$(date +%s)
  # timeout signals its whole process group: the python under bash -c gets the SIGINT too. A step
  # runs all its commands; any that fails (the ERR trap, inherited by the functions) fails the step
  # shellcheck disable=SC2016   # expanded by the inner bash
  timeout -s INT -k "$GRACE" "$limit" bash -Ec 'trap "failed=1" ERR; "$@"; exit "${failed:-0}"' \
    "$name" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  if (( rc == 124 || rc == 137 )); then status="cut at the limit"; elif (( rc != 0 )); then status="exit $rc"; fi
  printf "%s\t%s\t%d\t%d\n" "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" >> "$OUT/steps.tsv"
  tail -4 "$OUT/$name.log"
}

env_record() {   # what needs no torch first (a cold import of CUDA torch takes seconds)
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python - "$OUT/env.json" "$(tree_digest)" <<'PY'
import json, os, shutil, subprocess, sys
def run(cmd):
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip() or None
env = dict(commit=os.environ.get("AMDIM_COMMIT"), tree_digest=sys.argv[2],
           nvidia_smi=run("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader")
           if shutil.which("nvidia-smi") else None,
           nvcc=run("nvcc --version | tail -1") if shutil.which("nvcc") else None)
json.dump(env, open(sys.argv[1], "w"), indent=1)
import torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = None
cuda = torch.cuda.is_available()
env.update(gpu=torch.cuda.get_device_name() if cuda else None,
           capability=list(torch.cuda.get_device_capability()) if cuda else None,
           torch=torch.__version__, cuda=torch.version.cuda, triton=tv,
           memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None)
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(env)
PY
}

build() {   # the two builds in parallel (each cached under build/), then what registered
  python -c "from amdim_kernels import _extension as e; e.load()" &
  local cpu=$!
  python -c "
from amdim_kernels import _extension as e; import torch
src, why = e.cuda_bwd_status([torch.cuda.get_device_capability()] if torch.cuda.is_available() else [])
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

# py SCRIPT ARGS...: run a benchmark script; in a dry run only its own parser sees the arguments,
# and the variant choices in the environment are checked as the CUDA registration checks them
py() {
  if (( DRY )); then
    python - "$@" <<'PY'
import os, runpy, sys
from amdim_kernels import variants
for env, allowed in ((variants.FWD_ENV, variants.FWD_VARIANTS), (variants.BWD_ENV, variants.BWD_VARIANTS),
                     (variants.EPILOGUE_ENV, variants.EPILOGUES)):
    variants.env_choice(env, allowed)
script, argv = sys.argv[1], sys.argv[2:]
module = runpy.run_path(script, run_name="gpu_check_dry_run")
args = module["parse_args"](argv)
if "build_cases" in module:
    cases = module["build_cases"](args.setups, args.dtype, args.variants, args.modes, args.interleave)
    print(len(cases), "cases:", argv)
else:
    print("arguments:", vars(args))
PY
  else
    python "$@"
  fi
}

bwd_ops() {
  py benchmarks/profile_gpu.py --bwd-compare --shapes S1 S2 S3 --dtype bfloat16 --out "$OUT/bwd_ops_bf16.json"
  py benchmarks/profile_gpu.py --bwd-compare --shapes S1 S3 --dtype float32 --out "$OUT/bwd_ops_fp32.json"
}

bench() {   # bench TAG [ENV=VALUE...] -- bench_nce.py arguments
  local tag=$1; shift
  local envs=()
  while [[ "$1" != "--" ]]; do envs+=("$1"); shift; done
  shift
  env ${envs[@]+"${envs[@]}"} bash -c 'py "$@"' py benchmarks/bench_nce.py --device "$DEVICE" --tag "$tag" \
    --out "$OUT/bench_$tag.json" "$@"
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

amdim() {   # the fused variants first (the table's comparison), torch.compile (slow to compile) last
  local shapes="" few="--repeats 10 --warmup 2"
  for nb in 128 480 256; do for d in 1024 2560 1536; do shapes="$shapes ${nb}x${nb}x49x${d}"; done; done
  bench amdim_tiled AMDIM_KERNELS_CUDA_FWD=tiled -- --shapes $shapes --variants fused products --modes fwd+bwd $few
  bench amdim_dense AMDIM_KERNELS_CUDA_FWD=dense AMDIM_KERNELS_CUDA_BWD=triton_cublas -- --shapes $shapes \
    --variants fused --modes fwd+bwd $few
  bench amdim_compiled -- --shapes $shapes --variants compiled --modes fwd+bwd $few
}

largest() {   # (a dry run: tiny N = B on the CPU)
  local sizes="32768 49152 65536" l=49 d=1024
  if (( DRY )); then sizes="5 9"; l=3; d=8; fi
  python - "$OUT/largest.json" "$DEVICE" "$l" "$d" $sizes <<'PY'
import json, sys, time, torch
import amdim_kernels as ak
from gpu_one_config import first_configs_only
out, device, l, d, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
cuda = device == "cuda"
sync = torch.cuda.synchronize if cuda else lambda: None
first_configs_only()   # does it run, not how fast: autotuning here would time every config
rows = []
for nb in map(int, sizes):
    src = trg = None
    try:
        src = torch.randn(nb, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        trg = torch.randn(nb, l, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        sync(); t0 = time.perf_counter()
        loss, reg = ak.fused_nce_loss(src, trg)
        (loss + reg).backward()
        sync()
        rows.append(dict(n_b=nb, status="ok", seconds=time.perf_counter() - t0, loss=loss.item(),
                         peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None))
    except Exception as err:   # an OOM ends the search; any other error is recorded too
        status = "OOM" if isinstance(err, torch.OutOfMemoryError) else "error"
        rows.append(dict(n_b=nb, status=status, error=f"{type(err).__name__}: {str(err)[:300]}"))
    print(rows[-1], flush=True)
    json.dump(dict(device=device, l=l, d=d, rows=rows,
                   memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None),
              open(out, "w"), indent=1)
    del src, trg
    if cuda:
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
export -f tree_digest env_record build gpu_tests py bwd_ops bench targets amdim largest table sweep
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
