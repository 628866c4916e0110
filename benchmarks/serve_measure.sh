# Sourced by serve_vs_vllm.sh and serve_skipping.sh: measure NAME PORT PID [SUFFIX] waits for the server on PORT,
# runs serve_load.py's $clients streaming clients for $seconds against it (results in
# $out/serve_NAME_CxS[SUFFIX].json) and stops PID. IGNORE_EOS=1: every request decodes 64 tokens (ignore_eos).
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; sleep 1; done; return 1; }
measure() {  # name port pid [suffix]
  wait_up "$2"
  python3 benchmarks/serve_load.py --url "http://127.0.0.1:$2" --clients "$clients" --seconds "$seconds" \
    --model m --pid "$3" ${IGNORE_EOS:+--ignore-eos} --out "$out/serve_$1_${clients}x${seconds}${4:-}.json"
  kill "$3"; wait "$3" || true
}
