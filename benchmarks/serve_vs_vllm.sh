#!/usr/bin/env bash
# firstskip serve against vLLM's OpenAI server on the same run, float32 weights and 2 cores:
# benchmarks/serve_load.py's streaming clients on the mixed workload (SAMSum, XSum, BoolQ), one
# server at a time (benchmarks/README.md, "Serving against vLLM").
# Reproduce: bash plugins/vllm/ci.sh (builds .venv-vllm) && bash benchmarks/serve_vs_vllm.sh [RUN] [CLIENTS] [SECONDS] [DTYPE] [TAG]
# DTYPE (default float32): the weights of both servers; float32 and bfloat16 run vLLM too, another (int8, int4)
# only firstskip. TAG, when given, ends the result files' names. SERVERS (default "firstskip vllm vllm_plugin"):
# which of the three to run.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/sec4s0}
clients=${2:-16}
seconds=${3:-90}
dtype=${4:-float32}
tag=${5:+_$5}
servers=" ${SERVERS:-firstskip vllm vllm_plugin} "
out=benchmarks/results
mkdir -p out "$out"
[ -d out/serve-vllm ] || firstskip export --run "$run" --format vllm --out out/serve-vllm
[ -d out/serve-vllm-plain ] || .venv-vllm/bin/python -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from vllm_speed import plain_copy; plain_copy(Path('out/serve-vllm'), Path('out/serve-vllm-plain'))"
source benchmarks/serve_measure.sh
# COMPILE=1: firstskip compiles its decode step (--compile).
if [[ $servers == *" firstskip "* ]]; then
  firstskip serve --run "$run" --port 8931 --max-batch-size 8 --max-queue 64 --served-model-name m --dtype "$dtype" \
    ${COMPILE:+--compile} &
  measure "firstskip_$dtype${COMPILE:+_compiled}" 8931 $! "$tag"
fi
case $dtype in float32|bfloat16) ;; *) exit 0 ;; esac
export VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1
# vLLM on the plain model (the run's merged weights) with its own defaults, 8 sequences at a time like firstskip.
if [[ $servers == *" vllm "* ]]; then
  .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model out/serve-vllm-plain --served-model-name m \
    --port 8932 --dtype "$dtype" --max-num-seqs 8 &
  measure "vllm_$dtype" 8932 $! "$tag"
fi
# vLLM with the FiRST plugin (eager, prefix caching off: the plugin's required settings).
if [[ $servers == *" vllm_plugin "* ]]; then
  .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model out/serve-vllm --served-model-name m \
    --port 8933 --dtype "$dtype" --max-num-seqs 8 --enforce-eager --no-enable-prefix-caching &
  measure "vllm_plugin_$dtype" 8933 $! "$tag"
fi
