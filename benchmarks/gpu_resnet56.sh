#!/usr/bin/env bash
# Search quality on ResNet-56 / CIFAR-10 on one GPU: the base is trained on all 45,000 training images, then
# every (seed, method) of `benchmarks/search_quality.py resnet56` runs, several processes side by side (the
# networks are small for a datacentre GPU: one process leaves it mostly idle, waiting on kernel launches).
#
# Usage, from anywhere:
#   benchmarks/gpu_resnet56.sh DATA_DIR
#     DATA_DIR: CIFAR-10 as `autoprune --dataset cifar10` reads it, e.g. the unzipped JPEG copy (then the
#               results are "CIFAR-10 (JPEG q75)").
#
# Environment: PYTHON (default .venv/bin/python), DEVICE (cuda), PROCESSES (8 side by side), THREADS (torch
# threads per process, 1), TRAIN_EPOCHS (15 epochs of the base, cosine schedule at peak lr 0.2, batch 256), SEEDS
# ("0 1 2"), METHODS (every paper method, the baselines and two Torch-Pruning recipes, in the order they start),
# DEADLINE (seconds after the start past which no new (seed, method) starts; default none), LIMIT (training
# and test images of the base, for a trial), EXTRA (more search_quality.py options, e.g. "--limit 500
# --budget 3" for a trial).
# The base goes to runs/gpu/resnet56_c10q.pt (trained once, reused), the runs to
# benchmarks/results/search_quality/resnet56/runs/ and the tables to its summary.md.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
DATA_DIR="$(cd "$1" && pwd)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
DEVICE="${DEVICE:-cuda}"
PROCESSES="${PROCESSES:-8}"
SEEDS="${SEEDS:-0 1 2}"
METHODS="${METHODS:-l1 random pso ssa otp gdp sa tp-l1 tp-taylor}"
BASE=runs/gpu/resnet56_c10q.pt
START=$(date +%s)

if [[ ! -f "$BASE" ]]; then
  mkdir -p "$(dirname "$BASE")"
  # shellcheck disable=SC2086
  "$PYTHON" -m autoprune train --model resnet56 --dataset cifar10 --data-dir "$DATA_DIR" \
    --epochs "${TRAIN_EPOCHS:-15}" --lr 0.2 --batch-size 256 --device "$DEVICE" --seed 0 --out "$BASE" --quiet \
    ${LIMIT:+--limit "$LIMIT"}
fi

one() {  # one (seed, method) unless the deadline has passed
  if [[ -n "${DEADLINE:-}" && $(( $(date +%s) - START )) -gt $DEADLINE ]]; then
    echo "deadline: seed $1 $2 not started"
    return 0
  fi
  # shellcheck disable=SC2086
  SEARCH_QUALITY_PROCESSES="$PROCESSES" OMP_NUM_THREADS="${THREADS:-1}" "$PYTHON" benchmarks/search_quality.py resnet56 \
    --seeds "$1" --methods "$2" --device "$DEVICE" --data-dir "$DATA_DIR" --model-path "$BASE" ${EXTRA:-} \
    > "runs/gpu/seed$1_$2.log" 2>&1 || echo "seed $1 $2 failed (runs/gpu/seed$1_$2.log)"
}
export -f one
export PYTHON DEVICE PROCESSES DATA_DIR BASE START DEADLINE EXTRA

for method in $METHODS; do for seed in $SEEDS; do echo "$seed $method"; done; done \
  | xargs -P "$PROCESSES" -L 1 bash -c 'one "$0" "$1"'
"$PYTHON" benchmarks/search_quality.py resnet56 --summarise-only --model-path "$BASE"
