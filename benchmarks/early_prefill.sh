#!/usr/bin/env bash
# FiRST with prefill 'early' (the routers decide on the prompt's first quarter, the rest of the prompt skips
# the chosen layers too, and the LoRA is trained so) against the default 'full' prefill (the prompt runs every
# layer): quality on SAMSum and BoolQ (the first 100 test items, int8), then firstskip serve with skipping
# against skipping off for each run, 16 clients for 90 s (benchmarks/README.md, "Prefill that skips").
# Reproduce: bash benchmarks/early_prefill.sh [FULL_RUN] [EARLY_RUN]   (nothing else running; a run that is
# absent is trained first, about 25 min each on 2 cores: the same recipe, seed and data, only --prefill differs)
set -euo pipefail
cd "$(dirname "$0")/.."
D=../shared/data
full=${1:-runs/sec4s0}
early=${2:-runs/sec4s0e}
out=benchmarks/results
train() {  # run prefill
  [ -f "$1/config.json" ] || firstskip train --model smollm2-135m --data $D/samsum --data $D/xsum --data $D/boolq \
    --out "$1" --skip-target 0.25 --lora --merge --prefill "$2"
}
train "$full" full
train "$early" early
for pair in "full:$full" "early:$early"; do
  name=${pair%%:*} run=${pair#*:}
  firstskip eval -r "$run" -d $D/samsum -d $D/boolq --limit 100 --speed-items 0 --methods lora-only,first \
    --dtype int8 --out "out/eval/prefill-$name-int8"
  cp "out/eval/prefill-$name-int8/results.md" "$out/prefill_${name}_int8.md"
done
bash benchmarks/serve_skipping.sh "$full" 16 90 int8 prefill_full
bash benchmarks/serve_skipping.sh "$early" 16 90 int8 prefill_early
