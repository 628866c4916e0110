#!/usr/bin/env bash
# int4 weights (4-bit layers, int8 head, the run's LoRA beside the 4-bit weights) against llama.cpp, then int4's
# quality check (benchmarks/README.md, "int4").
# Reproduce: bash benchmarks/setup_llamacpp.sh && bash benchmarks/int4.sh [RUN]   (writes benchmarks/results/)
# RUN (default runs/sec4s0): the default recipe's run. Speed first (about 3 min, nothing else running), then
# quality (about 15 min).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/sec4s0}
out=benchmarks/results
mkdir -p "$out"
# Batch 1, prompt 256, 64 new tokens, compiled: the base model (issue 20's criterion), then the run with its LoRA.
firstskip bench --model smollm2-135m --skip 10-17 --prompt-len 256 --new-tokens 64 --repeats 5 \
  --dtype int4 --compile --llamacpp Q8_0,Q4_1 --json > "$out/int4_compiled_vs_llamacpp_b1.json"
python3 benchmarks/ratios.py "$out/int4_compiled_vs_llamacpp_b1.json"
firstskip bench --run "$run" --skip 10-17 --prompt-len 256 --new-tokens 64 --repeats 5 \
  --dtype int4 --compile --llamacpp Q4_1 --json > "$out/int4_lora_compiled_vs_llamacpp_b1.json"
python3 benchmarks/ratios.py "$out/int4_lora_compiled_vs_llamacpp_b1.json"
firstskip bench --model smollm2-135m --skip 10-17 --batch-size 8 --prompt-len 256 --new-tokens 64 --repeats 5 \
  --dtype int4 --compile --json > "$out/smollm2_skip10-17_b8_int4_compiled.json"
python3 benchmarks/ratios.py "$out/smollm2_skip10-17_b8_int4_compiled.json"
# Quality: the same run in float32 and int4, 100 test items of SAMSum and BoolQ.
bash benchmarks/format_quality.sh int4 "$run"
