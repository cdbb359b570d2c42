#!/usr/bin/env bash
# LeNet-5 on MNIST: every method at a MACs reduction of 0.8, same seed, budgets and fine-tuning.
#
# Trains the base model (runs/lenet5.pt, 10 epochs on the full MNIST) if it is missing, runs
# `autoprune compare` into $OUT and copies the tables, figures and report.html, under a header naming the
# command, machine, date and versions, into $RESULTS.
#
# Usage, from anywhere:
#   benchmarks/lenet5_mnist.sh                      # the benchmark (each method's default budget)
#   benchmarks/lenet5_mnist.sh --budget 100         # extra options go to `autoprune compare`
#   RESUME=1 benchmarks/lenet5_mnist.sh             # continue an interrupted run
#   OUT=/tmp/b RESULTS=/tmp/r benchmarks/lenet5_mnist.sh --limit 2000 --budget 3   # a quick smoke test
#
# Environment (paths relative to the repository root): DATA_DIR (default ../shared/data/mnist),
# BASE (runs/lenet5.pt), OUT (runs/bench/lenet5_mnist), RESULTS (benchmarks/results/lenet5_mnist),
# METHODS (all nine), FINETUNE_EPOCHS (2), AUTOPRUNE (.venv/bin/autoprune), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

source benchmarks/common.sh

AUTOPRUNE="${AUTOPRUNE:-.venv/bin/autoprune}"
PYTHON="${PYTHON:-.venv/bin/python}"
DATA_DIR="${DATA_DIR:-../shared/data/mnist}"
BASE="${BASE:-runs/lenet5.pt}"
OUT="${OUT:-runs/bench/lenet5_mnist}"
RESULTS="${RESULTS:-benchmarks/results/lenet5_mnist}"
METHODS="${METHODS:-otp,pso,sa,ssa,gdp,l1,global,slim,random}"
FINETUNE_EPOCHS="${FINETUNE_EPOCHS:-2}"

if [[ ! -f "$BASE" ]]; then
  echo "== training LeNet-5 on the full MNIST -> $BASE"
  "$AUTOPRUNE" train --model lenet5 --dataset mnist --data-dir "$DATA_DIR" --epochs 10 --lr 0.05 --out "$BASE"
fi

if [[ "${RESUME:-0}" == 1 ]]; then
  cmd=("$AUTOPRUNE" compare --resume "$OUT")
else
  cmd=("$AUTOPRUNE" compare "$BASE" --methods "$METHODS" --macs-reduction 0.8 --finetune-epochs "$FINETUNE_EPOCHS"
       --dataset mnist --data-dir "$DATA_DIR" --title "LeNet-5 on MNIST: 80% of the MACs removed"
       --out "$OUT" --force "$@")
fi
shown="$(shell_join "${cmd[@]}")"
echo "== $shown"
"${cmd[@]}"
"$PYTHON" benchmarks/collect.py --comparison "$OUT" --results "$RESULTS" --command "$shown" --label "MNIST"
