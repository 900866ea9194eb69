#!/usr/bin/env bash
# Builds the guidellm environment tests/e2e/test_guidellm.py runs the vLLM project's load
# generator from, unmodified, as a user would: guidellm pins a web stack of its own, so it lives
# beside .venv, not in it (like scripts/triton-env.sh). torch is pinned to the CPU build this
# fleet's machines carry (guidellm requires torch; a looser pin pulls a multi-GB CUDA build).
#   bash scripts/guidellm-env.sh [DIR]   (.venv-guidellm; ≈ 1 min and 1.5 GB the first time)
# Idempotent: an environment that runs guidellm is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.venv-guidellm}"
if [ -x "$dir/bin/guidellm" ] && "$dir/bin/guidellm" --version >/dev/null 2>&1; then
  exit 0
fi
python3 -m venv "$dir"
"$dir/bin/pip" install -q "guidellm==0.8.1" "torch==2.13.0"
"$dir/bin/guidellm" --version
