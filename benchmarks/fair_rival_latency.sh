#!/usr/bin/env bash
# Issue 21, items 2 and 4, beside benchmarks/fair_rival.sh: the full model, and the latency per request of
# every method (time to first token + the item's real decode steps at the method's batch-1 decode speed, 8
# prompts per task timed alone, interleaved), for seed 0 at decode saving 0.30: out/eval/fair-s0-w30.
# The stored predictions are reused; only `full` and the timings are new. Timings: run it alone on the machine.
#
# Usage: bash benchmarks/fair_rival_latency.sh   (after `fair_rival.sh verdict extras`), then
#        SEEDS="0 1 2" bash benchmarks/fair_rival.sh tables
set -euo pipefail
cd "$(dirname "$0")/.."
D=../shared/data
firstskip eval -r runs/sec4s0-w30 -d $D/samsum -d $D/xsum -d $D/boolq --limit 100 --speed-items 8 --dtype float32 \
  --methods full,lora-only,first,oracle,first-snapped --rival runs/shortgpt30s0 --rival runs/uls30s0 \
  --rival runs/plain0s0 --out out/eval/fair-s0-w30
