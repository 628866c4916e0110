#!/usr/bin/env bash
# Installs the llama.cpp anchor (llama-cpp-python) into the venv `firstskip bench` runs from, so
# bench times llama.cpp beside firstskip in the same process. Benchmark-only: it compiles for about
# five minutes on 2 cores, so the test install leaves it out.
# The flags pin the ISA: a native build (the default) dies with SIGILL on CPUs that report AMX to a
# VM that forbids it (../shared/docs/performance-anchors.md).
set -euo pipefail
venv=${1:-.venv}
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" \
  "$venv/bin/pip" install --no-cache-dir "llama-cpp-python==0.3.36"
"$venv/bin/python" -c "import llama_cpp; print('llama.cpp', llama_cpp.__version__, 'installed')"
