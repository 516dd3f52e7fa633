#!/usr/bin/env bash
# mypy in strict mode (settings in pyproject.toml) on skyroute.routing and
# skyroute.statesync. The folders routing/ and statesync/ install as skyroute.*
# through setuptools' package-dir mapping, which mypy cannot follow: it checks them
# through a temporary tree of links laid out as the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/skyroute"
for package in proxy routing statesync; do
    ln -s "$PWD/$package" "$tree/skyroute/$package"
done
MYPYPATH="$tree" python3 -m mypy --config-file pyproject.toml \
    -p skyroute.routing -p skyroute.statesync
