#!/usr/bin/env bash
# firstskip serve with FiRST's skipping against the same server with skipping off (--threshold 0: every layer
# kept), on the mixed workload (SAMSum, XSum, BoolQ), one server at a time (benchmarks/README.md, "Serving:
# skipping against skipping off"). serve_load.py reads the token-weighted decode saving off /metrics.
# Reproduce: bash benchmarks/serve_skipping.sh [RUN] [CLIENTS] [SECONDS] [DTYPE] [TAG]   (nothing else running)
# TAG, when given, ends the result files' names (serve_first_int8_compiled_16x90_TAG.json).
# IGNORE_EOS=1: every request decodes 64 tokens (equal work whatever each server's answers end at).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/sec4s0}
clients=${2:-16}
seconds=${3:-90}
dtype=${4:-int8}
tag=${5:+_$5}
out=benchmarks/results
mkdir -p "$out"
source benchmarks/serve_measure.sh
serve() {  # name port extra-serve-flags...: firstskip serve compiled, measured
  local name=$1 port=$2; shift 2
  firstskip serve --run "$run" --port "$port" --max-batch-size 8 --max-queue 64 --served-model-name m \
    --dtype "$dtype" --compile "$@" &
  measure "${name}_${dtype}_compiled" "$port" $! "$tag"
}
if [ "${ORDER:-}" = off-first ]; then  # ORDER=off-first: skipping off runs first (alternate it between pairs)
  serve skipping_off 8942 --threshold 0
  serve first 8941
else
  serve first 8941
  serve skipping_off 8942 --threshold 0
fi
python3 - "$out/serve_first_${dtype}_compiled_${clients}x${seconds}$tag.json" \
  "$out/serve_skipping_off_${dtype}_compiled_${clients}x${seconds}$tag.json" \
  "$out/serve_ratio_${dtype}_compiled_${clients}x${seconds}$tag.json" <<'PY'
import json, sys
first, off = (json.load(open(p)) for p in sys.argv[1:3])
gain = first["tokens_per_s"] / off["tokens_per_s"]
# the issue's bound is set by the decode saving; with a prefill that skips (prefill 'early'), the saving over
# every token the server ran (prompts and answers) bounds the gain physically as well
bounds = {k: 1 / (1 - s) for k, s in (("decode", first["decode_saving"]), ("all_tokens", first["engine"]["saving"]))}
# and weighted by where the server with skipping off spent its time: a skipped layer can save at most its share
# of the prefill and decode seconds (the rest, waiting and the HTTP side, does not shrink)
share = off["engine"]["share_of_run"]
bounds["time"] = 1 / (1 - share["decode"] * first["decode_saving"] - share["prefill"] * first["engine"]["prompt_saving"])
# decode alone: seconds per row-step (one token of one request) with skipping off over with FiRST
row_s = [r["engine"]["seconds"]["decode"] / (r["engine"]["decode_steps"] * r["engine"]["mean_rows_per_step"])
         for r in (first, off)]
summary = {"decode_saving": first["decode_saving"], "prompt_saving": first["engine"]["prompt_saving"],
                  "saving": first["engine"]["saving"], "bound": {k: round(b, 4) for k, b in bounds.items()},
                  "throughput_ratio": round(gain, 4),
                  "share_of_bound": {k: round(gain / b, 4) for k, b in bounds.items()},
                  "decode_speed_ratio": round(row_s[1] / row_s[0], 4),
                  "requests_ratio": round(first["requests"] / off["requests"], 4),  # the same prompts, in order
                  "tokens_per_request": [round(r["completion_tokens"] / max(1, r["requests"]), 1) for r in (first, off)],
                  "ttft_p99_s": [first["ttft_p99_s"], off["ttft_p99_s"]], "errors": [first["errors"], off["errors"]],
                  "engine_seconds": [r["engine"]["seconds"] for r in (first, off)]}
print(json.dumps(summary))
with open(sys.argv[3], "w") as f:
    json.dump(summary, f, indent=1)
PY
