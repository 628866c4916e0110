#!/usr/bin/env bash
# int8 weights against float32 and against llama.cpp, then int8's quality check (benchmarks/README.md, "int8").
# Reproduce: bash benchmarks/setup_llamacpp.sh && bash benchmarks/int8.sh [RUN]   (writes benchmarks/results/)
# RUN (default runs/sec4s0): the default recipe's run, as in engine_speed.sh. Speed first (about
# 8 min, nothing else running), then quality (about 15 min).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/sec4s0}
out=benchmarks/results
mkdir -p "$out"
# Batch 1, prompt 256, 64 new tokens: firstskip int8 beside llama.cpp's Q8_0 and Q4_1, then float32 beside F32.
firstskip bench --model smollm2-135m --skip 10-17 --prompt-len 256 --new-tokens 64 --repeats 5 \
  --dtype int8 --llamacpp Q8_0,Q4_1 --json > "$out/int8_vs_llamacpp_b1.json"
python3 benchmarks/ratios.py "$out/int8_vs_llamacpp_b1.json"
firstskip bench --model smollm2-135m --skip 10-17 --prompt-len 256 --new-tokens 64 --repeats 5 \
  --dtype float32 --llamacpp F32 --json > "$out/fp32_vs_llamacpp_b1.json"
python3 benchmarks/ratios.py "$out/fp32_vs_llamacpp_b1.json"
firstskip bench --model smollm2-135m --skip 10-17 --batch-size 8 --prompt-len 256 --new-tokens 64 --repeats 5 \
  --dtype int8 --json > "$out/smollm2_skip10-17_b8_int8.json"
python3 benchmarks/ratios.py "$out/smollm2_skip10-17_b8_int8.json"
firstskip bench --run "$run" --data ../shared/data/samsum --batch-size 8 --new-tokens 64 --repeats 5 \
  --dtype int8 --json > "$out/smollm2_samsum8_routed_int8.json"
python3 benchmarks/ratios.py "$out/smollm2_samsum8_routed_int8.json"
# Quality: the same run in float32 and int8, 100 test items of SAMSum and BoolQ.
bash benchmarks/format_quality.sh int8 "$run"
