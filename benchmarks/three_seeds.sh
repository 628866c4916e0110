#!/usr/bin/env bash
# A training recipe on seeds 0, 1 and 2: train each (issue 3's command plus FLAGS) into runs/NAMEsK, evaluate
# LoRA-only and FiRST on 100 SAMSum test items into out/eval/NAMEsK, and print the table of
# docs/experiments' recipe comparisons (per seed and summed over seeds). Finished runs and evaluations are
# reused, so it can be stopped and started again.
# Usage: bash benchmarks/three_seeds.sh NAME [FLAG ...]      e.g. bash benchmarks/three_seeds.sh sec4
# (today's default recipe; runs/sec4sK were trained with it, docs/experiments/2026-11-30-on-policy-leave-one-out-secant.md)
set -euo pipefail
NAME=$1; shift
D=../shared/data
for K in 0 1 2; do
  R=runs/${NAME}s$K
  if [ ! -f "$R/model/config.json" ]; then
    firstskip train -m smollm2-135m --data $D/samsum --data $D/xsum --data $D/boolq --out "$R" --skip-target 0.25 \
      --lora --merge --seed "$K" "$@" $( [ -d "$R" ] && echo --resume )
  fi
  [ -f "out/eval/${NAME}s$K/results.json" ] || firstskip eval --dtype float32 -r "$R" -d $D/samsum --limit 100 --speed-items 0 \
    --methods lora-only,first --out "out/eval/${NAME}s$K"
done
python "$(dirname "$0")/seed_table.py" out/eval/${NAME}s0 out/eval/${NAME}s1 out/eval/${NAME}s2
