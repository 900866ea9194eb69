#!/usr/bin/env bash
# Tools the test suite uses beyond Python:
# - promtool and prometheus into .tools/bin (alert rule checks and tests; a real server scraping a
#   live mesh in tests/e2e/test_observability.py), taken out of Debian's `prometheus` package
#   without installing it (installing would start a Prometheus server on hosts with systemd);
# - node and npm (Debian's nodejs/npm where absent), and examples/node's @grpc/grpc-js, for
#   tests/e2e/test_node_example.py;
# - `ip` (iproute2) and the right to make network namespaces, for tests/e2e/test_partitions.py
#   (each service a host of its own, links cut between them): root, as CI runs.
#   bash scripts/test-tools.sh
# Idempotent. It fails, saying what is missing, when it cannot provide a tool: the suite treats a
# skipped test as a failure (tests/conftest.py ALLOWED_SKIPS), so a missing tool must stop the run
# here, where the reason is plain, rather than hide a feature.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
fail() { echo "test-tools: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_updated=""
apt_update() { [ -n "$apt_updated" ] || { as_root apt-get update -qq >/dev/null && apt_updated=1; }; }

mkdir -p .tools/bin
if ! { [ -x .tools/bin/promtool ] && [ -x .tools/bin/prometheus ]; }; then
  command -v apt-get >/dev/null || fail "no apt-get here: install promtool and prometheus into .tools/bin"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && { apt-get download prometheus >/dev/null 2>&1 \
      || { apt_update && apt-get download prometheus >/dev/null; }; }) \
    || fail "cannot download Debian's prometheus package (apt-get update needs root)"
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  cp "$work/root/usr/bin/promtool" "$work/root/usr/bin/prometheus" .tools/bin/
fi
.tools/bin/promtool --version | head -1
.tools/bin/prometheus --version | head -1

if ! { command -v node >/dev/null && command -v npm >/dev/null; }; then
  { command -v apt-get >/dev/null && apt_update && as_root apt-get install -y -qq nodejs npm >/dev/null; } \
    || fail "node and npm are missing and could not be installed (Debian: apt-get install nodejs npm)"
fi
echo "node $(node --version), npm $(npm --version)"
if [ ! -d examples/node/node_modules/@grpc/grpc-js ]; then
  (cd "$root/examples/node" && npm install --no-audit --no-fund --loglevel=error) \
    || fail "npm could not install examples/node's packages (is the npm registry reachable?)"
fi

if ! command -v ip >/dev/null; then
  { command -v apt-get >/dev/null && apt_update && as_root apt-get install -y -qq iproute2 >/dev/null; } \
    || fail "ip (iproute2) is missing and could not be installed (Debian: apt-get install iproute2)"
fi
probe="mstools$$"
as_root ip netns add "$probe" 2>/dev/null && as_root ip netns del "$probe" \
  || fail "cannot make network namespaces (tests/e2e/test_partitions.py needs root or sudo)"
echo "$(ip -V)"
