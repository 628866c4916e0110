#!/usr/bin/env bash
# The translation half of docs/results.md: qwen2.5-coder-0.5b trained on iwslt2017 de-en at skip
# target 0.25 (a shorter schedule than the default: 40 router steps, 20 LoRA steps), then every
# method, and FiRST against ULS at targets 0.15 and 0.35.
# Usage: bash benchmarks/issue4_qwen.sh [RUN] [OUT]
set -euo pipefail
RUN=${1:-runs/qwen-iwslt25}
OUT=${2:-out/eval/qwen-iwslt25}
D=../shared/data
# RUN was trained at commit 2334896 (routers pooling every token, no prefixes, no distillation, straight-through
# gates: the defaults then, no longer switches of `firstskip train`) by
#   firstskip train -m qwen2.5-coder-0.5b --data $D/iwslt2017_de_en --out runs/qwen-iwslt25 \
#     --skip-target 0.25 --lora --merge --max-steps 40 --lora-steps 20
# (to train it again: git worktree add ../fs-2334896 2334896, and run that command there).
if [ ! -f "$RUN/model/config.json" ]; then
  echo "$RUN is not a finished run; train it at commit 2334896 as this script's comment says" >&2
  exit 2
fi
firstskip eval --dtype float32 -r "$RUN" -d $D/iwslt2017_de_en --limit 50 --speed-items 4 \
  --methods full,lora-only,first,first-nolora,random,last,shortgpt,uls --out "$OUT"
# FiRST against the strongest static rival at 0.25 (ULS) at skip targets 0.15 and 0.35, as issue4_budgets.sh.
for t in 0.15 0.35; do
  bash benchmarks/recalibrated_copy.sh "$RUN" $t $D/iwslt2017_de_en
  firstskip eval --dtype float32 -r "$RUN-t$t" -d $D/iwslt2017_de_en --limit 50 --speed-items 4 --methods full,first,uls \
    --out "$OUT-t$t"
done
