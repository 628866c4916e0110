#!/usr/bin/env bash
# FiRST against its strongest static rival at skip targets 0.15 and 0.35 (docs/results.md): the
# 0.25 run's routers and LoRA, with the threshold recalibrated on the training held-out prompts
# for each target (a copy of the run per target), then full, first and the rival on BoolQ and
# SST-2 (100 items), SAMSum and XSum (50).
# Usage: bash benchmarks/issue4_budgets.sh [RUN] [OUT] [RIVAL]
set -euo pipefail
RUN=${1:-runs/mix25}
OUT=${2:-out/eval/mix25}
RIVAL=${3:-shortgpt}
D=../shared/data
for t in 0.15 0.35; do
  bash benchmarks/recalibrated_copy.sh "$RUN" $t $D/samsum $D/xsum $D/boolq
  firstskip eval --dtype float32 -r "$RUN-t$t" -d $D/boolq -d $D/sst2 --limit 100 --methods full,first,$RIVAL --out "$OUT-t$t-cls"
  firstskip eval --dtype float32 -r "$RUN-t$t" -d $D/samsum -d $D/xsum --limit 50 --methods full,first,$RIVAL --out "$OUT-t$t-sum"
done
