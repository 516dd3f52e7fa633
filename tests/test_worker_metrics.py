"""A ``--workers`` worker's metric values reach the shared files on a tick, not per change.

prometheus_client picks its value class when it is imported, from the environment: each
check runs in a fresh Python with ``PROMETHEUS_MULTIPROC_DIR`` set, as a worker does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import json
    import os
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    from skyroute.proxy import _worker_metrics as worker_metrics

    def scrape():
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return {}
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        samples = {}
        for line in generate_latest(registry).decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    installed = worker_metrics.install()
    r = CollectorRegistry()
    requests = Counter("t_requests", "", ["route"], registry=r).labels("chat")
    latency = Histogram("t_latency", "", buckets=(0.1, 1.0), registry=r)
    share = Gauge("t_share", "", multiprocess_mode="livemostrecent", registry=r)
    requests.inc()
    requests.inc(2)
    latency.observe(0.5)
    share.set(0.25)
    before = scrape()
    in_memory = requests._value.get()
    written = worker_metrics.write_changed()
    after = scrape()
    again = worker_metrics.write_changed()
    print(json.dumps({"installed": installed, "before": before, "in_memory": in_memory,
                      "written": written, "after": after, "again": again}))
""")


def _run(tmp_path: Path, *, multiprocess: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if multiprocess:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_values_change_in_memory_and_reach_the_file_when_written(tmp_path):
    """Counts are exact in the worker at once, in the shared file (what other workers'
    scrapes read) only once written; each changed value is written once per tick."""
    result = _run(tmp_path, multiprocess=True)
    assert result["installed"] is True
    assert result["in_memory"] == 3.0
    assert result["before"]["t_requests_total{route=\"chat\"}"] == 0.0  # not written yet
    after = result["after"]
    assert after["t_requests_total{route=\"chat\"}"] == 3.0
    assert after["t_latency_count"] == 1.0
    assert after["t_latency_sum"] == 0.5
    assert after["t_latency_bucket{le=\"1.0\"}"] == 1.0
    assert after["t_latency_bucket{le=\"0.1\"}"] == 0.0
    assert after["t_share"] == 0.25
    # counter, histogram sum + its one bucket, gauge: what changed, nothing else
    assert result["written"] == 4
    assert result["again"] == 0


def test_outside_multiprocess_mode_nothing_changes(tmp_path):
    """One process (no ``--workers``): prometheus_client's own values stay."""
    result = _run(tmp_path, multiprocess=False)
    assert result["installed"] is False
    assert result["written"] == 0
    assert result["in_memory"] == 3.0
