#!/usr/bin/env bash
# Training throughput and peak GPU memory, fused vs reference loss, at encoder size 128 on the
# built-in digits (upscaled), bf16 autocast. Each run: 2 epochs of STEPS steps; the second epoch's
# record (images/s, peak allocated GPU memory) is read from the run's metrics.jsonl, where the
# trainer writes it.
#   bash benchmarks/train_gpu.sh [batch sizes...]      (default: 128 512)
#   bash benchmarks/train_gpu.sh --last-epoch FILE      (the record this script prints, from FILE)
set -uo pipefail
cd "$(dirname "$0")/.."

last_epoch() {   # the last {"kind": "epoch"} record of a metrics.jsonl, or nothing
  python - "$1" <<'PY'
import json, sys
try:
    lines = open(sys.argv[1]).read().splitlines()
except OSError:
    sys.exit(0)
records = [json.loads(x) for x in lines if x.strip()]
epochs = [r for r in records if r.get("kind") == "epoch"]
if epochs:
    print(json.dumps(epochs[-1]))
PY
}
if [[ "${1:-}" == "--last-epoch" ]]; then last_epoch "$2"; exit 0; fi

STEPS=${STEPS:-8}
for bs in ${@:-128 512}; do
  for backend in reference fused; do
    out=$(mktemp -d)
    timeout 240 python -m amdim.train --device cuda --amp bf16 --image-size 128 --ndf 64 \
        --n-rkhs 512 --n-depth 1 --batch-size "$bs" --epochs 2 --steps-per-epoch "$STEPS" --no-eval \
        --no-progress --loss-backend "$backend" --out-dir "$out" --log-every 1000 > "$out/stdout.txt" 2>&1
    rc=$?
    line=$(last_epoch "$out/metrics.jsonl")
    echo "batch $bs $backend: ${line:-failed (exit $rc): $(tail -3 "$out/stdout.txt" | tr '\n' ' ')}"
  done
done
