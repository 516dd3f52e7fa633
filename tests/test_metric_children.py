"""The per-request metric children (``Children``: ``CounterChild``, ``HistogramChild``)
change exactly what prometheus_client's own ``inc``/``observe`` change.

Each check runs the same updates once through the children and once through the
ordinary API, each in a fresh Python (prometheus_client picks its value class when
imported: in one process, and with ``PROMETHEUS_MULTIPROC_DIR`` set as a ``--workers``
worker does), and compares the two ``/metrics`` texts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import json
    import math
    import os
    import sys
    from skyroute.proxy import _worker_metrics as worker_metrics

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        assert worker_metrics.install()
    from skyroute.proxy._metrics import Metrics

    fast = sys.argv[1] == "fast"
    metrics = Metrics(instance="i-1")

    def counter(children, *labels):
        return children.labels(*labels) if fast else children.metric.labels(*labels)

    histogram = counter
    refused = []
    for route, status, amount in [("chat", "200", 1), ("chat", "200", 2), ("chat", "502", 0.5),
                                  ("embed", "200", 0), ("embed", "200", -1)]:
        try:
            counter(metrics.requests, route, "up-a", status).inc(amount)
        except ValueError as e:
            refused.append(str(e))
    counter(metrics.attempts, "up-a", "ok").inc()
    counter(metrics.attempts, "up-b", "error").inc()
    counter(metrics.attempts, "up-a", "ok").inc()
    amounts = [0, 3, -1.5, 0.005, 0.0049999, 0.2, 0.20000001, 0.19999999, 0.15, 119.99,
               120.0, 120.5, 1e9, math.inf, -math.inf, 0.041]
    for amount in amounts:
        histogram(metrics.ttfb, "up-a", "eu").observe(amount)
        if math.isfinite(amount):  # +-Inf would make the sum NaN
            histogram(metrics.latency, "up-a", "eu").observe(amount)
    histogram(metrics.latency, "up-b", "us").observe(math.nan)  # in the sum, in no bucket
    histogram(metrics.ttfb, "up-c", "us")  # made (as health checks do), never observed
    text = metrics.render().body.decode()
    lines = [line for line in text.splitlines() if "_created" not in line]  # made at a time
    print(json.dumps({"lines": lines, "refused": refused}))
""")


def _exposition(tmp_path: Path, way: str, *, multiprocess: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if multiprocess:
        files = tmp_path / way
        files.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(files)
    out = subprocess.run([sys.executable, "-c", SCRIPT, way], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("multiprocess", [False, True], ids=["one-process", "workers"])
def test_children_expose_what_the_ordinary_api_does(tmp_path, multiprocess):
    """Same counts, sums and buckets (bounds, NaN, +-Inf, negatives), same refusal of a
    negative counter increment, in one process and under ``--workers``."""
    fast = _exposition(tmp_path, "fast", multiprocess=multiprocess)
    ordinary = _exposition(tmp_path, "ordinary", multiprocess=multiprocess)
    # the multiprocess collector lists families in the order it reads the files
    assert sorted(fast["lines"]) == sorted(ordinary["lines"])
    assert fast["refused"] == ordinary["refused"] != []
    lines = fast["lines"]
    assert 'skyroute_requests_total{route="chat",status="200",upstream="up-a"} 3.0' in lines
    assert 'skyroute_upstream_latency_seconds_sum{region="us",upstream="up-b"} NaN' in lines
    assert 'skyroute_upstream_latency_seconds_count{region="us",upstream="up-b"} 0.0' in lines
    assert 'skyroute_upstream_ttfb_seconds_count{region="us",upstream="up-c"} 0.0' in lines
