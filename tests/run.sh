#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs it.
# Used as-is by .ci/run and quoted in the README.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q -e '.[test]'

# Real servers the integration tests drive: Prometheus (and promtool) from Debian.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# Node yjs client for the Yjs interop test.
if [ -f tests/interop/package.json ]; then
    (cd tests/interop && npm install --no-audit --no-fund --silent)
fi

python3 -m ruff check .
bash tests/typecheck.sh
# pytest exits 5 when it collected no tests: that must fail the run, and it does here.
python3 -m pytest "$@"
