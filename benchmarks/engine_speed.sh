#!/usr/bin/env bash
# Decode speed of FiRST against the full model and a physically pruned copy, one process each.
# Reproduce: bash benchmarks/engine_speed.sh   (writes benchmarks/results/*.json, prints ratios)
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
for bs in 1 8; do
  firstskip bench --model smollm2-135m --skip 10-17 --batch-size "$bs" --prompt-len 256 \
    --new-tokens 64 --repeats 5 --json > "$out/smollm2_skip10-17_b$bs.json"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], 'first/full', r['first_over_full'], 'first/pruned', r['first_over_pruned'])" "$out/smollm2_skip10-17_b$bs.json"
done
