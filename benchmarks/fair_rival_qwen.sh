#!/usr/bin/env bash
# Issue 21, item 4, translation: FiRST against static skip sets with their own LoRA on Qwen2.5-Coder-0.5B-Instruct
# (24 layers), IWSLT 2017 de-en, seed 0, fp32, at decode savings 4/24 and 7/24 (ShortGPT's and ULS's k layers).
# Every run trains on the same data with the same schedule, shorter than the default as in the earlier Qwen run
# (40 router steps, 20 LoRA steps; the rivals train only the LoRA):
#   runs/qwen25s0               FiRST, the default recipe (skip target 0.25 per prompt)
#   runs/qwen-{shortgpt,uls}Ks0 K = 4 or 7 layers of ShortGPT / ULS with a LoRA trained under them
#   runs/qwen25s0-wK            runs/qwen25s0 calibrated on its held-out training prompts to K/24 (config copied)
#   out/eval/qwen-fair-wK       LoRA-only, FiRST and both rivals on the first 50 test items
# Both rivals are reported: "the best static rival" is whichever scores higher, chosen on these test items
# (a choice in the rivals' favour). One heavy job at a time; resumable.
#
# Usage: bash benchmarks/fair_rival_qwen.sh   (needs the packaged Qwen: `firstskip models` says how to install it)
# Results: docs/results.md ("Translation: FiRST against static sets with their own LoRA"),
# benchmarks/results/fair_rival_qwen.json (FiRST minus each method, paired 95% intervals on sentence-level chrF).
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/fair_rival_lib.sh
D=../shared/data
DATA=(--data $D/iwslt2017_de_en)
TRAIN=(-m qwen2.5-coder-0.5b "${DATA[@]}" --seed 0 --max-steps 40 --lora-steps 20)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # as fair_rival.sh: other jobs may share the 2 cores

train_run runs/qwen25s0 "${TRAIN[@]}" --skip-target 0.25
for K in 4 7; do
  T=$(python -c "print(round($K / 24, 4))")
  for S in shortgpt uls; do
    train_run runs/qwen-$S${K}s0 "${TRAIN[@]}" --skip-target "$T" --static $S
    [ "$(layers_of runs/qwen-$S${K}s0)" = "$K" ] || { echo "runs/qwen-$S${K}s0 does not skip $K layers" >&2; exit 1; }
  done
done
for K in 4 7; do
  calibrated_copy runs/qwen25s0 runs/qwen25s0-w$K runs/qwen-shortgpt${K}s0 "${DATA[@]}"
  O=out/eval/qwen-fair-w$K
  [ "$K" = 7 ] && reuse_lora_only out/eval/qwen-fair-w4 "$O"
  log "eval $O"
  firstskip eval -r runs/qwen25s0-w$K -d $D/iwslt2017_de_en --limit 50 --speed-items 0 --dtype float32 \
    --methods lora-only,first --rival runs/qwen-shortgpt${K}s0 --rival runs/qwen-uls${K}s0 --out "$O"
done
python -m firstskip.evaluate.pareto out/eval/qwen-fair-w4 out/eval/qwen-fair-w7 --out out/fair_rival/pareto-qwen.png
cp out/fair_rival/pareto-qwen.json benchmarks/results/fair_rival_pareto_qwen.json
python benchmarks/fair_rival_table.py --extras out/eval/qwen-fair-w4 out/eval/qwen-fair-w7 \
  --out benchmarks/results/fair_rival_qwen.json
log done
