#!/usr/bin/env bash
# Decode speed of FiRST against the full model and a physically pruned copy (benchmarks/README.md).
# Reproduce: bash benchmarks/engine_speed.sh [RUN]   (writes benchmarks/results/*.json, prints ratios)
# RUN (default runs/sec4s0) is trained by the default recipe when missing (about 15 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/sec4s0}
out=benchmarks/results
mkdir -p "$out"
for bs in 1 8; do
  firstskip bench --model smollm2-135m --skip 10-17 --batch-size "$bs" --prompt-len 256 \
    --new-tokens 64 --repeats 5 --memory --dtype float32 --json > "$out/smollm2_skip10-17_b$bs.json"
  python3 benchmarks/ratios.py "$out/smollm2_skip10-17_b$bs.json"
done
if [ ! -f "$run/config.json" ]; then
  firstskip train --model smollm2-135m --data ../shared/data/samsum --data ../shared/data/xsum \
    --data ../shared/data/boolq --out "$run" --skip-target 0.25 --lora --merge
fi
# The skip sets the run's routers choose for the first 8 SAMSum test prompts, decoded as one batch.
firstskip bench --run "$run" --data ../shared/data/samsum --batch-size 8 --new-tokens 64 --repeats 5 --dtype float32 \
  --json > "$out/smollm2_samsum8_routed.json"
python3 benchmarks/ratios.py "$out/smollm2_samsum8_routed.json"
python3 benchmarks/decode_overhead.py --out "$out/decode_overhead.json"
# The same in bfloat16 (weights and activations; routers stay float32), and how far it decodes from float32.
for bs in 1 8; do
  firstskip bench --model smollm2-135m --skip 10-17 --batch-size "$bs" --prompt-len 256 \
    --new-tokens 64 --repeats 5 --dtype bfloat16 --json > "$out/smollm2_skip10-17_b${bs}_bf16.json"
  python3 benchmarks/ratios.py "$out/smollm2_skip10-17_b${bs}_bf16.json"
done
firstskip bench --run "$run" --data ../shared/data/samsum --batch-size 8 --new-tokens 64 --repeats 5 \
  --dtype bfloat16 --json > "$out/smollm2_samsum8_routed_bf16.json"
python3 benchmarks/ratios.py "$out/smollm2_samsum8_routed_bf16.json"
python3 benchmarks/dtype_agreement.py --run "$run" --data ../shared/data/samsum --data ../shared/data/boolq \
  --limit 30 --out "$out/bf16_agreement.json"
