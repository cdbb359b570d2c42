#!/usr/bin/env bash
# CIFAR-10: every method on ResNet-20, ResNet-56 and VGG-16 at a MACs reduction of 0.5, same seed,
# budgets and fine-tuning, one comparison per model.
#
# Usage, from anywhere:
#   benchmarks/cifar10.sh DATA_DIR [--quick] [extra `autoprune compare` options]
#     DATA_DIR: CIFAR-10 as python batches, binary batches or a train/ + test/ image folder, e.g. the
#               unzipped ../shared/data/cifar10-jpeg.zip (unzip -q ../shared/data/cifar10-jpeg.zip -d /tmp/cifar10)
#     --quick:  a shorter schedule for a CPU (10,000 training images, 15 training epochs, budget 20,
#               1 fine-tuning epoch); without it, the full schedule meant for a GPU (160 training epochs,
#               each method's default budget, 20 fine-tuning epochs).
#
# The device is CUDA when available (`--device auto`). For each model the base is trained if missing
# (runs/cifar10_<model>[_quick].pt), the comparison runs into runs/bench/cifar10_<model>[_quick] and
# the tables, figures and report.html go to benchmarks/results/cifar10_<model>[_quick]/ under a header
# naming the command, machine, date and versions. Results on the JPEG copy are labelled
# "CIFAR-10 (JPEG q75)": its absolute accuracies are not comparable to published CIFAR-10 numbers.
#
# Environment: MODELS (default "resnet20 resnet56 vgg16"), METHODS (all nine), MACS (0.5), LABEL (the data
# label; default detected), RESUME=1 (continue interrupted comparisons), TRAIN_EPOCHS and LIMIT (override
# the schedule's), RUNS_DIR (runs), RESULTS_DIR (benchmarks/results), AUTOPRUNE, PYTHON.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
DATA_DIR="$(cd "$1" && pwd)"
shift
QUICK=0
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; shift; fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source benchmarks/common.sh

AUTOPRUNE="${AUTOPRUNE:-.venv/bin/autoprune}"
PYTHON="${PYTHON:-.venv/bin/python}"
MODELS="${MODELS:-resnet20 resnet56 vgg16}"
METHODS="${METHODS:-otp,pso,sa,ssa,gdp,l1,global,slim,random}"
MACS="${MACS:-0.5}"
RUNS_DIR="${RUNS_DIR:-runs}"
RESULTS_DIR="${RESULTS_DIR:-benchmarks/results}"

if [[ -z "${LABEL:-}" ]]; then
  if [[ -d "$DATA_DIR/train" ]] && find "$DATA_DIR/train" -name '*.jpg' -print -quit | grep -q .; then
    LABEL="CIFAR-10 (JPEG q75)"  # the shared JPEG export (quality 75); set LABEL for another JPEG copy
  else
    LABEL="CIFAR-10"
  fi
fi

if [[ $QUICK == 1 ]]; then
  suffix="_quick"
  limit="${LIMIT:-10000}"
  train=(--epochs "${TRAIN_EPOCHS:-15}" --lr 0.1 --limit "$limit")
  compare=(--limit "$limit" --budget 20 --finetune-epochs 1 --val-samples 1000 --latency-batch 64)
  schedule="quick CPU schedule: $limit training images, ${train[1]} epochs, budget 20, 1 fine-tuning epoch"
else
  suffix=""
  train=(--epochs "${TRAIN_EPOCHS:-160}" --lr 0.1 ${LIMIT:+--limit "$LIMIT"})
  compare=(--finetune-epochs 20 ${LIMIT:+--limit "$LIMIT"})
  schedule="full schedule: ${train[1]} training epochs, each method's default budget, 20 fine-tuning epochs"
fi

declare -A NAMES=([resnet20]="ResNet-20" [resnet56]="ResNet-56" [vgg16]="VGG-16")
for model in $MODELS; do
  base="$RUNS_DIR/cifar10_${model}${suffix}.pt"
  out="$RUNS_DIR/bench/cifar10_${model}${suffix}"
  results="$RESULTS_DIR/cifar10_${model}${suffix}"
  if [[ ! -f "$base" ]]; then
    echo "== training $model on $LABEL -> $base"
    "$AUTOPRUNE" train --model "$model" --dataset cifar10 --data-dir "$DATA_DIR" "${train[@]}" --out "$base"
  fi
  if [[ "${RESUME:-0}" == 1 && -f "$out/compare_run.json" ]]; then
    cmd=("$AUTOPRUNE" compare --resume "$out")
  else
    cmd=("$AUTOPRUNE" compare "$base" --methods "$METHODS" --macs-reduction "$MACS" --dataset cifar10
         --data-dir "$DATA_DIR" "${compare[@]}" --out "$out" --force
         --title "${NAMES[$model]:-$model} on $LABEL, MACs reduction $MACS ($schedule)" "$@")
  fi
  shown="$(shell_join "${cmd[@]}")"
  echo "== $shown"
  "${cmd[@]}"
  "$PYTHON" benchmarks/collect.py --comparison "$out" --results "$results" --command "$shown" --label "$LABEL"
done
