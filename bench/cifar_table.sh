#!/bin/sh
# Reproduces the CIFAR-10 results table in README.md: every strategy with
# 3 participants, the same model, rounds and local epochs. Runs one after the
# other (each uses both cores); about an hour on a 2-core machine.
#   sh bench/cifar_table.sh [DATA_ROOT]     (default ../shared/datasets/cifar10)
set -eu
cd "$(dirname "$0")/.."
ROOT=${1:-../shared/datasets/cifar10}
G=".venv/bin/grbfl"
COMMON="--data $ROOT/train --test-data $ROOT/test --participants 3 --rounds 5 --local-epochs 1"
OUT=results
mkdir -p $OUT

run() { name=$1; shift; [ -f "$OUT/$name.json" ] || $G simulate $COMMON "$@" --json "$OUT/$name.json"; }

run cifar-centralized        --strategy centralized
run cifar-fedavg-iid         --strategy fedavg
run cifar-grbfl-iid-t0.03    --strategy grbfl --variance-threshold 0.03
run cifar-fedavg-dir0.5      --strategy fedavg --partition dirichlet:0.5
run cifar-grbfl-dir0.5-t0.03 --strategy grbfl --partition dirichlet:0.5 --variance-threshold 0.03
for t in 0.01 0.03 0.1; do
  run cifar-balls-iid-t$t    --strategy balls --variance-threshold $t --server-epochs 2
done
for t in 0.01 0.1; do
  run cifar-grbfl-iid-t$t    --strategy grbfl --variance-threshold $t
done
$G plot $OUT/cifar-*.json --out $OUT/plots
