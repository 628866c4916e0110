#!/usr/bin/env bash
# The quality check of a weight format against float32 on one run (issue 20, item 2): greedy agreement and
# KL on the first 100 test prompts of SAMSum and BoolQ, then both formats' task scores on the same 100
# items with paired intervals. Called by int8.sh and int4.sh.
# Usage: bash benchmarks/format_quality.sh FORMAT RUN   (writes benchmarks/results/FORMAT_{agreement.json,scores.md})
set -euo pipefail
cd "$(dirname "$0")/.."
fmt=$1
run=$2
out=benchmarks/results
python3 benchmarks/dtype_agreement.py --run "$run" --dtype "$fmt" --data ../shared/data/samsum \
  --data ../shared/data/boolq --limit 100 --out "$out/${fmt}_agreement.json"
for d in float32 "$fmt"; do
  [ -f "out/eval/$(basename "$run")-$d/results.json" ] || firstskip eval -r "$run" -d ../shared/data/samsum \
    -d ../shared/data/boolq --limit 100 --speed-items 0 --methods lora-only,first --dtype "$d" \
    --out "out/eval/$(basename "$run")-$d"
done
python3 benchmarks/dtype_scores.py "out/eval/$(basename "$run")-float32" "out/eval/$(basename "$run")-$fmt" \
  --data ../shared/data/samsum --data ../shared/data/boolq | tee "$out/${fmt}_scores.md"
