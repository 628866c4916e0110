#!/usr/bin/env bash
# The smollm2-135m half of docs/results.md: train one run on samsum+xsum+boolq at skip target 0.25
# (issue 3's recipe), then every method at an equal budget on four tasks.
# Usage: bash benchmarks/issue4_smollm2.sh [RUN] [OUT]
set -euo pipefail
RUN=${1:-runs/mix25}
OUT=${2:-out/eval/mix25}
D=../shared/data
# RUN is issue 3's recipe as it was when these numbers were measured: routers pooling every token, 60 router
# steps, no prefixes, no distillation, straight-through gates. `firstskip train` no longer has those switches;
# runs/mix25 was trained at commit 91899c0, where they were the defaults, by
#   firstskip train -m smollm2-135m --data $D/samsum --data $D/xsum --data $D/boolq --out runs/mix25 \
#     --skip-target 0.25 --lora --merge
# (to train it again: git worktree add ../fs-91899c0 91899c0, and run that command there).
if [ ! -f "$RUN/model/config.json" ]; then
  echo "$RUN is not a finished run; train it at commit 91899c0 as this script's comment says" >&2
  exit 2
fi
M=full,lora-only,first,first-nolora,random,last,shortgpt,uls
firstskip eval --dtype float32 -r "$RUN" -d $D/boolq -d $D/sst2 --limit 100 --methods $M --out "$OUT-cls"
firstskip eval --dtype float32 -r "$RUN" -d $D/samsum -d $D/xsum --limit 50 --methods $M --out "$OUT-sum"
