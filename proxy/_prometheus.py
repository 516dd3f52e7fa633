"""The Prometheus latency source: query, parse, feed the router. I/O only.

Theory of operation
-------------------
``prometheus_source`` is a cleanup context. While the served config has a
``latency.prometheus`` section it runs one query per ``interval``
(``GET {url}/api/v1/query?query=...``, bounded by ``timeout``), reads the
instant vector it returns (one series per upstream, the name in the configured
``label``, the value in seconds) and hands each reading for an upstream of the
served config to ``Router.feed_external(..., source="prometheus")``. What to do
with a reading (and when it is too old to use) is ``routing``'s decision:
``Router.tick`` uses it while it is fresh and falls back to passive latency
after ``STALE_INTERVALS`` intervals without one, so a dead Prometheus needs no
special path here and never fails a request.

* The config is read afresh on every round, so a reload that adds, changes or
  removes the section takes effect at the next round (within
  ``DISABLED_RECHECK_S`` when the section is added).
* Rounds keep to a fixed schedule (``next = previous + interval``) instead of
  sleeping ``interval`` after each query, so the query time does not make them
  drift; rounds a slow query overran are skipped, not bunched up.
* Outages are reported on the edge, not every round: one warning when
  Prometheus stops answering, one info line when it answers again.
  ``skyroute_prometheus_source_up`` says which it is now and
  ``skyroute_prometheus_queries_total{result}`` counts every round.
* A series whose value is NaN or infinite (``histogram_quantile`` over an
  upstream with no recent traffic) is skipped; several series for one
  upstream (a query that does not aggregate across instances) count as the
  slowest of them.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from skyroute.routing import PrometheusSource

from ._bounded_read import read_at_most
from ._metrics import Metrics
from ._state import CLOCK, METRICS, SERVING, Runtime
from ._tasks import running

log = structlog.get_logger("skyroute.latency")

#: With no ``latency.prometheus`` section, how often to look whether a reload added one.
DISABLED_RECHECK_S = 1.0
#: Prometheus answers are small (one series per upstream); refuse anything absurd.
MAX_ANSWER_BYTES = 4 * 1024 * 1024


class QueryFailed(Exception):
    """One query got no usable answer; ``result`` is the metric label for it."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result  # "error" (Prometheus said no, or nonsense) or "unreachable"


@dataclass(slots=True)
class SourceStatus:
    """What the latency source last saw, for ``/admin/routing``."""

    url: str | None = None
    up: bool | None = None  # None: not configured, or no round finished yet
    last_ok_at: float | None = None
    last_error: str | None = None
    readings: dict[str, float] = field(default_factory=dict)  # upstream -> seconds, last round

    def describe(self, *, now: float) -> dict[str, Any] | None:
        """A JSON-ready summary; None when no Prometheus is configured."""
        if self.url is None:
            return None
        return {
            "url": self.url, "up": self.up, "last_error": self.last_error,
            "last_ok_s_ago": None if self.last_ok_at is None else round(now - self.last_ok_at, 1),
            "readings_ms": {k: round(v * 1000, 1) for k, v in sorted(self.readings.items())},
        }


PROMETHEUS_STATUS = web.AppKey("prometheus_status", SourceStatus)


def parse_vector(body: bytes, label: str) -> dict[str, float]:
    """Upstream name -> seconds from a ``/api/v1/query`` answer.

    Raises:
        QueryFailed: ``error`` if the answer is not a successful instant vector.
    """
    try:
        answer = json.loads(body)
    except ValueError as exc:
        raise QueryFailed("error", f"answer is not JSON: {exc}") from exc
    if not isinstance(answer, dict) or answer.get("status") != "success":
        what = answer.get("error", answer) if isinstance(answer, dict) else answer
        raise QueryFailed("error", f"query failed: {str(what)[:200]}")
    data = answer.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or \
            not isinstance(data.get("result"), list):
        kind = data.get("resultType") if isinstance(data, dict) else None
        raise QueryFailed("error", f"the query must return an instant vector, got {kind!r}")
    readings: dict[str, float] = {}
    for series in data["result"]:
        try:
            name = series["metric"][label]
            seconds = float(series["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            continue  # a series without the label, or a malformed sample
        if not isinstance(name, str) or not math.isfinite(seconds) or seconds < 0:
            continue
        readings[name] = max(seconds, readings.get(name, 0.0))
    return readings


async def query_latency(session: aiohttp.ClientSession,
                        source: PrometheusSource) -> dict[str, float]:
    """Run the configured query once; see ``parse_vector`` for the answer.

    Raises:
        QueryFailed: ``unreachable`` (connect error, reset, timeout) or ``error``.
    """
    try:
        async with session.get(f"{source.url}/api/v1/query", params={"query": source.query},
                               timeout=aiohttp.ClientTimeout(total=source.timeout_s)) as resp:
            if resp.content_length is not None and resp.content_length > MAX_ANSWER_BYTES:
                raise QueryFailed("error", f"answer of {resp.content_length} bytes is too big")
            # Chunked answers carry no length: read one byte past the cap to tell.
            body = await read_at_most(resp, MAX_ANSWER_BYTES + 1)
            if len(body) > MAX_ANSWER_BYTES:
                raise QueryFailed("error", f"answer is over {MAX_ANSWER_BYTES} bytes")
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        detail = str(exc) or f"no answer within {source.timeout_s:g}s"
        raise QueryFailed("unreachable", f"{type(exc).__name__}: {detail}") from exc
    if status != 200:
        try:
            return parse_vector(body, source.label)  # raises with Prometheus's own message
        except QueryFailed as exc:
            raise QueryFailed("error", f"HTTP {status}: {exc}") from None
    return parse_vector(body, source.label)


def next_round(previous: float, interval: float, now: float) -> float:
    """The next round on the ``previous + k * interval`` grid that is still ahead of ``now``."""
    missed = max(0, math.floor((now - previous) / interval))
    return previous + (missed + 1) * interval


def _feed(runtime: Runtime, readings: dict[str, float], now: float) -> dict[str, float]:
    known = runtime.config.upstream_names
    matched = {name: s for name, s in readings.items() if name in known}
    for name, seconds in matched.items():
        runtime.router.feed_external(name, seconds, source="prometheus", now=now)
    return matched


async def _round(app: web.Application, session: aiohttp.ClientSession,
                 source: PrometheusSource, status: SourceStatus) -> None:
    """One query; feed what it returned, keep the books, log only on edges."""
    metrics: Metrics = app[METRICS]
    status.url = source.url
    try:
        readings = await query_latency(session, source)
    except QueryFailed as exc:
        metrics.prometheus_queries.labels(exc.result).inc()
        metrics.set_prometheus_up(False)
        if status.up is not False:
            # routing uses passive latency from skyroute's own traffic until it answers
            log.warning("latency_prometheus_failed", url=source.url, result=exc.result,
                        reason=str(exc))
        status.up, status.last_error, status.readings = False, str(exc), {}
        return
    now = app[CLOCK]()
    matched = _feed(app[SERVING].runtime, readings, now)  # the config may have changed
    metrics.prometheus_queries.labels("ok" if matched else "empty").inc()
    metrics.set_prometheus_up(True)
    if status.up is False:
        log.info("latency_prometheus_recovered", url=source.url, upstreams=len(matched))
    if not matched and (status.up is None or status.readings):
        log.info("latency_prometheus_unmatched", url=source.url, label=source.label,
                 series=len(readings))
    status.up, status.last_ok_at, status.last_error = True, now, None
    status.readings = matched


async def _poll_forever(app: web.Application, session: aiohttp.ClientSession,
                        status: SourceStatus) -> None:
    loop = asyncio.get_running_loop()
    due = loop.time()
    while True:
        source = app[SERVING].runtime.config.latency.prometheus
        if source is None:
            if status.url is not None:
                log.info("latency_prometheus_removed")
            status.url, status.up, status.readings = None, None, {}
            app[METRICS].set_prometheus_up(None)
            await asyncio.sleep(DISABLED_RECHECK_S)
            due = loop.time()
            continue
        if status.url not in (None, source.url):
            status.up = None  # a new address: report its state afresh
        try:
            await _round(app, session, source, status)
        except Exception:  # a bug here must not stop the source for good
            log.exception("latency_prometheus_crashed", url=source.url)
        due = next_round(due, source.interval_s, loop.time())
        await asyncio.sleep(due - loop.time())


async def prometheus_source(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: poll the latency Prometheus while one is configured."""
    status = app[PROMETHEUS_STATUS] = SourceStatus()
    # Its own small session: a couple of connections, and none taken from the upstreams' pool.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session,
        running(_poll_forever(app, session, status), name="skyroute-prometheus-source"),
    ):
        yield
