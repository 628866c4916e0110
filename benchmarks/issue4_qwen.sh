#!/usr/bin/env bash
# The translation half of docs/results.md: qwen2.5-coder-0.5b trained on iwslt2017 de-en at skip
# target 0.25 (a shorter schedule than the default: 40 router steps, 20 LoRA steps), then every
# method, and FiRST against ULS at targets 0.15 and 0.35.
# Usage: bash benchmarks/issue4_qwen.sh [RUN] [OUT]   (a finished RUN is reused: --resume skips its finished phases)
set -euo pipefail
RUN=${1:-runs/qwen-iwslt25}
OUT=${2:-out/eval/qwen-iwslt25}
D=../shared/data
/usr/bin/time -v firstskip train -m qwen2.5-coder-0.5b --data $D/iwslt2017_de_en --out "$RUN" --resume \
  --skip-target 0.25 --lora --merge --max-steps 40 --lora-steps 20 --pooling mean-all --prefixes 0 --distill 0  # as measured
firstskip eval -r "$RUN" -d $D/iwslt2017_de_en --limit 50 --speed-items 4 \
  --methods full,lora-only,first,first-nolora,random,last,shortgpt,uls --out "$OUT"
# FiRST against the strongest static rival at 0.25 (ULS) at skip targets 0.15 and 0.35, as issue4_budgets.sh.
for t in 0.15 0.35; do
  bash benchmarks/recalibrated_copy.sh "$RUN" $t $D/iwslt2017_de_en
  firstskip eval -r "$RUN-t$t" -d $D/iwslt2017_de_en --limit 50 --speed-items 4 --methods full,first,uls \
    --out "$OUT-t$t"
done
