#!/usr/bin/env bash
# Compiled layer steps (issue 20): firstskip int8, compiled, against llama.cpp at batch 1; FiRST / pruned
# at batch 1 and 8; what compiling costs. Numbers in benchmarks/README.md, "Compiled layer steps".
# Reproduce: bash benchmarks/setup_llamacpp.sh && bash benchmarks/compiled.sh   (about 10 min, nothing else running)
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out"
# 15 repeats: with 5, FiRST / Q8_0 ranged 0.98-1.16 over five runs of this line in one hour.
firstskip bench --model smollm2-135m --skip 10-17 --prompt-len 256 --new-tokens 64 --repeats 15 \
  --dtype int8 --compile --llamacpp Q8_0,Q4_1 --json > "$out/int8_compiled_vs_llamacpp_b1.json"
python3 benchmarks/ratios.py "$out/int8_compiled_vs_llamacpp_b1.json"
firstskip bench --model smollm2-135m --skip 10-17 --batch-size 8 --prompt-len 256 --new-tokens 64 --repeats 5 \
  --dtype int8 --compile --json > "$out/smollm2_skip10-17_b8_int8_compiled.json"
python3 benchmarks/ratios.py "$out/smollm2_skip10-17_b8_int8_compiled.json"
python3 benchmarks/compile_cost.py --dtype int8 --out "$out/compile_cost_int8.json"
# The same with torch's on-disk compile cache empty, as on a fresh machine.
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python3 benchmarks/compile_cost.py --dtype int8 --out "$out/compile_cost_int8_cold.json"
