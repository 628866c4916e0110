#!/usr/bin/env bash
# The smollm2-135m half of docs/results.md: train one run on samsum+xsum+boolq at skip target 0.25
# (issue 3's recipe), then every method at an equal budget on four tasks.
# Usage: bash benchmarks/issue4_smollm2.sh [RUN] [OUT]   (a finished RUN is reused: --resume skips its finished phases)
set -euo pipefail
RUN=${1:-runs/mix25}
OUT=${2:-out/eval/mix25}
D=../shared/data
# The recipe as it was when these numbers were measured: routers pooling every token (--pooling mean-all),
# 60 router steps, no prefixes, no distillation (today's defaults differ, docs/training.md).
/usr/bin/time -v firstskip train -m smollm2-135m --data $D/samsum --data $D/xsum --data $D/boolq \
  --out "$RUN" --resume --skip-target 0.25 --lora --merge --pooling mean-all \
  --max-steps 60 --lora-steps 30 --prefixes 0 --distill 0
M=full,lora-only,first,first-nolora,random,last,shortgpt,uls
firstskip eval -r "$RUN" -d $D/boolq -d $D/sst2 --limit 100 --methods $M --out "$OUT-cls"
firstskip eval -r "$RUN" -d $D/samsum -d $D/xsum --limit 50 --methods $M --out "$OUT-sum"
