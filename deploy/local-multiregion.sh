#!/usr/bin/env bash
# See the whole system on one machine, without Docker or a cluster:
#   three stand-in cloud regions (us-east 40 ms, eu-west 90 ms, ap-south 250 ms to first
#   token) and a stand-in GPU pool, two skyroute instances peered over state sync, and a
#   real Prometheus that scrapes them every second and feeds skyroute's latency routing.
# It prints what to open and try (including how to make a region slow and watch traffic
# move), and stops everything, Prometheus included, on Ctrl-C or SIGTERM.
#
#   deploy/local-multiregion.sh                  # skyroute on 8080 and 8081
#   deploy/local-multiregion.sh --port 0         # free ports
#   deploy/local-multiregion.sh --prometheus-bin /opt/prometheus/prometheus
#
# Needs: skyroute (pip install . from the repository root) and the prometheus binary
# (apt-get install prometheus, or name one with --prometheus-bin / SKYROUTE_PROMETHEUS_BIN).
# Further arguments go to `skyroute demo` (see skyroute demo --help).
set -euo pipefail

if ! command -v skyroute >/dev/null 2>&1; then
    echo "local-multiregion.sh: the skyroute command is not installed;" \
         "run 'pip install .' in the repository root ($(cd "$(dirname "$0")/.." && pwd))" >&2
    exit 1
fi
exec skyroute demo --instances 2 --prometheus "$@"
