#!/usr/bin/env bash
# firstskip serve with FiRST's skipping against the same server with skipping off (--threshold 0: every layer
# kept), on the mixed workload (SAMSum, XSum, BoolQ), one server at a time (benchmarks/README.md, "Serving:
# skipping against skipping off"). serve_load.py reads the token-weighted decode saving off /metrics.
# Reproduce: bash benchmarks/serve_skipping.sh [RUN] [CLIENTS] [SECONDS] [DTYPE]   (nothing else running)
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/sec4s0}
clients=${2:-16}
seconds=${3:-90}
dtype=${4:-int8}
out=benchmarks/results
mkdir -p "$out"
source benchmarks/serve_measure.sh
serve() {  # name port extra-serve-flags...: firstskip serve compiled, measured
  local name=$1 port=$2; shift 2
  firstskip serve --run "$run" --port "$port" --max-batch-size 8 --max-queue 64 --served-model-name m \
    --dtype "$dtype" --compile "$@" &
  measure "${name}_${dtype}_compiled" "$port" $!
}
serve first 8941
serve skipping_off 8942 --threshold 0
python3 - "$out/serve_first_${dtype}_compiled_${clients}x${seconds}.json" \
  "$out/serve_skipping_off_${dtype}_compiled_${clients}x${seconds}.json" <<'PY'
import json, sys
first, off = (json.load(open(p)) for p in sys.argv[1:])
s = first["decode_saving"]
gain = first["tokens_per_s"] / off["tokens_per_s"]
print(json.dumps({"decode_saving": s, "bound": round(1 / (1 - s), 4), "throughput_ratio": round(gain, 4),
                  "share_of_bound": round(gain / (1 / (1 - s)), 4),
                  "requests_ratio": round(first["requests"] / off["requests"], 4),  # the same prompts, in order
                  "tokens_per_request": [round(r["completion_tokens"] / max(1, r["requests"]), 1) for r in (first, off)],
                  "ttft_p99_s": [first["ttft_p99_s"], off["ttft_p99_s"]], "errors": [first["errors"], off["errors"]]}))
PY
