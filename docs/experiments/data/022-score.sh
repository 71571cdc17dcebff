#!/usr/bin/env bash
# Experiment 022, scoring (after `endoflow sweep -c configs/sweep.yaml`): both arms train on unlabelled seq1-3 with
# no per-epoch validation and are scored once on seq4 after training (--eval-data), seeds 0 and 1.
# Scores: runs/e022/artifacts/e022-<arm>-seed<N>_scores.json; the table: docs/experiments/data/022-table.py.
set -euo pipefail
swept=$(.venv/bin/python -c '
import json
best = json.load(open("runs/sweep/adapt-vocalfolds/summary.json"))["best_params"]
print(" ".join(f"--set {key}={json.dumps(value)}" for key, value in best.items()))')
echo "swept arm: $swept"
for seed in 0 1; do
  for arm in default swept; do
    flags=""
    [ "$arm" = swept ] && flags="$swept"
    # shellcheck disable=SC2086  # $flags holds several --set options
    nice -n 5 .venv/bin/endoflow adapt train -c configs/adapt-vocalfolds-select.yaml --fresh \
      --set 'target.sequences=[seq1,seq2,seq3]' --set val=null --set compute.seed=$seed \
      --set name=e022-$arm-seed$seed --set runs_dir=runs/e022 $flags \
      --eval-data docs/experiments/data/022-seq4.yaml
  done
done
.venv/bin/python docs/experiments/data/022-table.py
