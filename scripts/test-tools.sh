#!/usr/bin/env bash
# Tools the test suite uses beyond Python, into .tools/bin: promtool (alert rule checks and tests)
# and prometheus (a real server scraping a live mesh: tests/e2e/test_observability.py).
#   bash scripts/test-tools.sh
# Both are taken out of Debian's `prometheus` package without installing it (installing would
# start a Prometheus server on hosts with systemd). Idempotent. Where apt is unavailable it says
# so and the tests that need them skip, naming this script.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools/bin
if [ -x .tools/bin/promtool ] && [ -x .tools/bin/prometheus ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "test-tools: no apt-get here; the promtool tests will be skipped" >&2
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null
  else
    echo "test-tools: cannot download Debian's prometheus package (run apt-get update as root)" >&2
    exit 0
  fi
fi
dpkg-deb -x prometheus_*.deb root
cd - >/dev/null
cp "$work/root/usr/bin/promtool" "$work/root/usr/bin/prometheus" .tools/bin/
.tools/bin/promtool --version | head -1
.tools/bin/prometheus --version | head -1
