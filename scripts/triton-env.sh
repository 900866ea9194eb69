#!/usr/bin/env bash
# Builds the tritonclient environment the KServe v2 tests use as a real client would:
# tritonclient[grpc,http] needs protobuf < 7, meshserve's stubs use protobuf 7, so it lives beside
# .venv, not in it (like scripts/vllm-env.sh).  bash scripts/triton-env.sh [DIR]  (.venv-triton)
# Idempotent: an environment that imports tritonclient.grpc is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.venv-triton}"
if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import tritonclient.grpc, tritonclient.http" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$dir"
"$dir/bin/pip" install -q "tritonclient[grpc,http]==2.73.0" "numpy==2.4.6"
"$dir/bin/python" -c "import tritonclient.grpc, tritonclient.http"
