#!/usr/bin/env bash
# Issue 21, item 4: FiRST against ShortGPT + LoRA (a LoRA trained under ShortGPT's fixed set, same data, steps,
# rank and seed) at equal token-weighted decode saving, SmolLM2-135M fp32, SAMSum + XSum + BoolQ, seeds 0-2.
#
#   runs/sec4sK            FiRST, the default recipe (skip target 0.25 per prompt), seed K
#   runs/shortgptNNsK      ShortGPT's round(0.NN x 30) layers with a LoRA trained under them, seed K
#                          (NN = 17: 5 layers, decode saving 0.167; NN = 30: 9 layers, 0.30)
#   runs/sec4sK-wNN        a copy of runs/sec4sK (config copied, weights linked) calibrated on its held-out
#                          training prompts to the rival's token-weighted saving (len(set) / 30), --snap 8
#   out/eval/fair-sK-wNN   eval of LoRA-only, FiRST (the copy) and the rival of that budget, 100 test items
#                          per task (LoRA-only's predictions of wNN=17 are reused for wNN=30: same weights)
#
# Stage `extras` (seed 0, budget 0.30): the oracle per-task set and snapped FiRST, then ULS + LoRA, then plain
# LoRA (--static none), added to out/eval/fair-s0-w30.
# Finished runs, calibrations and evaluations are reused, so it can be stopped and started again. One heavy job
# at a time. Train flags are limited to -m --data --out --skip-target --lora --merge --seed --static --resume;
# evaluations pin --dtype float32.
#
# VARIANT=tw: method change 1 (docs/experiments/2026-12-06-token-weighted-routers.md), FiRST trained at a
# token-weighted decode saving of 0.25 (train --saving-target 0.25) instead of a per-prompt skip target, against
# the same rivals: runs/sec4twsK, runs/sec4twsK-wNN, out/eval/fair-tw-sK-wNN, tables *_tw*.
#
# Usage: [VARIANT=tw] [SEEDS="0 1 2"] bash benchmarks/fair_rival.sh [verdict|extras|tables] ...   (default: all three, in order)
# Results: docs/results.md, docs/experiments/2026-12-06-fair-rival-seeds.md (seeds 0-2 ran, both variants; tables
# write benchmarks/results/fair_rival_smollm2[_tw].json and fair_rival_pareto[_tw]_sK.json).
set -euo pipefail
D=../shared/data
DATA=(--data $D/samsum --data $D/xsum --data $D/boolq)
EVAL_DATA=(-d $D/samsum -d $D/xsum -d $D/boolq)
SEEDS=${SEEDS:-"0 1 2"}
V=${VARIANT:-}
FIRST=runs/sec4${V}s  # + seed
EV=out/eval/fair${V:+-$V}-s  # + seed-wNN
TARGET=(--skip-target 0.25); [ "$V" = tw ] && TARGET=(--saving-target 0.25)
cd "$(dirname "$0")/.."
# One torch thread: on the 2-core machine other jobs ran beside this one, and torch's two threads then waited
# on each other at every parallel region (a ShortGPT + LoRA step took 75 s instead of about 9 s).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

source benchmarks/fair_rival_lib.sh

train() {  # train OUT FLAG...: SmolLM2-135M on the three tasks (resumes an interrupted run)
  train_run "$1" -m smollm2-135m "${DATA[@]}" "${@:2}"
}

static_rival() {  # static_rival SPEC NN TARGET K EXPECTED_LAYERS
  local R=runs/$1$2s$4
  train "$R" --skip-target "$3" --static "$1" --seed "$4"
  local n; n=$(layers_of "$R")
  [ "$n" = "$5" ] || { echo "$R skips $n layers, expected $5" >&2; exit 1; }
}

has_methods() {  # has_methods EVAL m1,m2,...: its results.json holds every one of them on every dataset
  python - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
p = Path(sys.argv[1]) / "results.json"
if not p.is_file():
    sys.exit(1)
r = json.loads(p.read_text())
want = sys.argv[2].split(",")
ok = len(r["datasets"]) == 3 and all(any(m == w or m.startswith(w + ":") for m in ds["methods"])
                                     for ds in r["datasets"].values() for w in want)
sys.exit(0 if ok else 1)
EOF
}

evaluate() {  # evaluate K NN METHODS CHECK RIVAL...
  local K=$1 NN=$2 M=$3 CHECK=$4; shift 4
  local O=$EV$K-w$NN
  has_methods "$O" "$CHECK" && return 0
  if [ "$NN" != 17 ]; then reuse_lora_only $EV$K-w17 "$O"; fi  # same weights: LoRA-only
  local RIVALS=(); for r in "$@"; do RIVALS+=(--rival "$r"); done
  log "eval $O $M ${RIVALS[*]}"
  firstskip eval -r $FIRST$K-w$NN "${EVAL_DATA[@]}" --limit 100 --speed-items 0 --dtype float32 --methods "$M" \
    "${RIVALS[@]}" --out "$O"
}

verdict() {
  for K in $SEEDS; do
    train $FIRST$K "${TARGET[@]}" --seed "$K"
    static_rival shortgpt 17 0.167 "$K" 5
    static_rival shortgpt 30 0.30 "$K" 9
    calibrated_copy $FIRST$K $FIRST$K-w17 runs/shortgpt17s$K "${DATA[@]}"
    calibrated_copy $FIRST$K $FIRST$K-w30 runs/shortgpt30s$K "${DATA[@]}"
    evaluate "$K" 17 lora-only,first lora-only,first,shortgpt+lora runs/shortgpt17s$K
    evaluate "$K" 30 lora-only,first lora-only,first,shortgpt+lora runs/shortgpt30s$K
  done
}

extras() {  # seed 0, budget 0.30: the oracle and snapped FiRST (no training), then ULS + LoRA, then plain LoRA
  local R=runs/shortgpt30s0 M=lora-only,first,oracle,first-snapped
  evaluate 0 30 $M lora-only,first,shortgpt+lora,oracle,first-snapped $R
  static_rival uls 30 0.30 0 9
  evaluate 0 30 $M lora-only,first,shortgpt+lora,oracle,first-snapped,uls+lora $R runs/uls30s0
  train runs/plain0s0 --static none --seed 0
  evaluate 0 30 $M lora-only,first,shortgpt+lora,oracle,first-snapped,uls+lora,plain-lora $R runs/uls30s0 runs/plain0s0
}

tables() {
  mkdir -p out/fair_rival
  for K in $SEEDS; do
    if has_methods $EV$K-w17 first && has_methods $EV$K-w30 first; then
      python -m firstskip.evaluate.pareto $EV$K-w17 $EV$K-w30 --out out/fair_rival/pareto${V:+-$V}-s$K.png
      cp out/fair_rival/pareto${V:+-$V}-s$K.json benchmarks/results/fair_rival_pareto${V:+_$V}_s$K.json
    fi
  done
  python benchmarks/fair_rival_table.py --prefix "fair${V:+-$V}" --seeds $SEEDS \
    --out benchmarks/results/fair_rival_smollm2${V:+_$V}.json
}

STAGES=("$@"); [ ${#STAGES[@]} -gt 0 ] || STAGES=(verdict extras tables)
for s in "${STAGES[@]}"; do log "stage $s"; "$s"; done
log done
