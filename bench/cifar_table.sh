#!/bin/sh
# Reproduces the CIFAR-10 results table in README.md: every strategy with
# 3 participants, the same model (cnn), 5 rounds and 1 local epoch. Runs one
# after the other (each uses both cores); about 2 hours on a 2-core machine.
#   sh bench/cifar_table.sh [DATA_ROOT]     (default ../shared/datasets/cifar10)
# A results file that exists already is not run again.
set -eu
cd "$(dirname "$0")/.."
ROOT=${1:-../shared/datasets/cifar10}
G=".venv/bin/grbfl"
COMMON="--data $ROOT/train --test-data $ROOT/test --participants 3 --rounds 5 --local-epochs 1"
OUT=results
mkdir -p $OUT

run() { name=$1; shift; [ -f "$OUT/$name.json" ] || $G simulate $COMMON "$@" --json "$OUT/$name.json"; }

# All 50,000 training images, default local batch (16).
run cifar-centralized        --strategy centralized
run cifar-fedavg-iid         --strategy fedavg
run cifar-grbfl-iid          --strategy grbfl
# Label skew, on a random 15,000 of the training images to fit one session.
run cifar15k-fedavg-dir0.5   --strategy fedavg --partition dirichlet:0.5 --limit 15000
run cifar15k-grbfl-dir0.5    --strategy grbfl --partition dirichlet:0.5 --limit 15000
# The same with local batch 64, the default before FedAvg was measured at both.
run cifar-b64-centralized    --strategy centralized --batch-size 64
run cifar-b64-fedavg-iid     --strategy fedavg --batch-size 64
run cifar-b64-grbfl-iid      --strategy grbfl --batch-size 64
run cifar15k-b64-fedavg-dir0.5 --strategy fedavg --partition dirichlet:0.5 \
  --limit 15000 --batch-size 64
run cifar15k-b64-grbfl-dir0.5  --strategy grbfl --partition dirichlet:0.5 \
  --limit 15000 --batch-size 64
# Pixel-space balls: participants cluster once; the aggregator trains on 20,000
# samples drawn from the merged balls for 2 epochs per round.
for t in 0.01 0.03 0.1; do
  run cifar-balls-iid-t$t    --strategy balls --variance-threshold $t --server-epochs 2
done
# Many small balls (about 6 images each): more detail leaves the device, and the
# model learns far more from it.
run cifar-balls3000-iid-t0.01 --strategy balls --variance-threshold 0.01 \
  --n-clusters 3000 --server-epochs 2
# Plots of the default-batch runs (the batch-64 ones would repeat every label).
$G plot $(ls $OUT/cifar*.json | grep -v b64) --out $OUT/plots
