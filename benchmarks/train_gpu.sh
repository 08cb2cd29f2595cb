#!/usr/bin/env bash
# Training throughput and peak GPU memory, fused vs reference loss, at encoder size 128 on the
# built-in digits (upscaled), bf16 autocast. Each run: 2 epochs of STEPS steps; the second epoch's
# images/s and the peak allocated GPU memory are printed (from amdim.train's epoch record).
#   bash benchmarks/train_gpu.sh [batch sizes...]      (default: 128 512)
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-8}
for bs in ${@:-128 512}; do
  for backend in reference fused; do
    out=$(mktemp -d)
    line=$(timeout 240 python -m amdim.train --device cuda --amp bf16 --image-size 128 --ndf 64 \
        --n-rkhs 512 --n-depth 1 --batch-size "$bs" --epochs 2 --steps-per-epoch "$STEPS" --no-eval \
        --loss-backend "$backend" --out-dir "$out" --log-every 1000 2>&1 | grep '"kind": "epoch"' | tail -1)
    echo "batch $bs $backend: ${line:-failed (see: out of memory or error)}"
  done
done
