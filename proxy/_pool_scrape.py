"""Watching the servers of local GPU pools: scrape, health-check, feed the router. I/O only.

Theory of operation
-------------------
``pool_scraper`` is a cleanup context. Every ``latency.scrape.interval`` it
takes ``Router.scraped_pools`` (pool upstreams whose ``scrape`` is on) and, for
every endpoint of each, GETs ``metrics_path`` and ``health_path`` (relative to
the endpoint's ``scheme://host:port``) at the same time, each bounded by
``timeout``. What the readings mean is ``routing``'s decision; here:

* **health**: the check passes when ``health_path`` answers 2xx and
  ``metrics_path`` did not fail to connect or time out; either way the result
  is fed with ``Router.feed_pool_health``. Each failing GET is counted in
  ``skyroute_pool_scrape_errors_total{check="health"|"metrics"}``.
* **metrics**: a 200 is read with ``parse_server_load`` (the configured metric
  names); a 404 means the server has no metrics (Ollama). Both are fed with
  ``Router.feed_pool_load``, ``None`` for "no load", and the picker then uses
  skyroute's own in-flight counts. Any other answer, or text that is not
  Prometheus exposition, feeds ``None`` and counts as a ``metrics`` error; a
  connect error or timeout feeds nothing (the last load stays until stale).
* Log lines mark edges, not rounds: one warning when an endpoint leaves its
  pool, one info line when it is back, one info line when an endpoint's load
  metrics appear or disappear.
* The config is read afresh every round, so a reload takes effect at the next
  one; rounds keep to a fixed schedule (``next_round``, as the latency
  Prometheus source does) and a slow round skips the rounds it overran.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web
from skyroute.routing import (
    EndpointView,
    PoolScrape,
    Router,
    ServerLoad,
    Upstream,
    parse_server_load,
)

from ._bounded_read import read_at_most
from ._metrics import Metrics
from ._prometheus import next_round
from ._state import CLOCK, METRICS, SERVING, SESSION
from ._tasks import running

log = structlog.get_logger("skyroute.pool")

#: vLLM's exposition is ~100 KiB of histograms; anything near this is not a model server.
MAX_METRICS_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """What one round found at one endpoint."""

    ok: bool
    load: ServerLoad | None
    fed_load: bool  # False: the metrics fetch failed in transit, keep the last load
    health_error: str | None = None
    metrics_error: str | None = None


async def _get(session: aiohttp.ClientSession, url: str, upstream: Upstream,
               scrape: PoolScrape) -> tuple[int, bytes | None] | str:
    """One GET bounded by the scrape timeout.

    Returns:
        the status and body (None: too big to read), or what went wrong in transit.
    """
    headers = {"Accept-Encoding": "identity"}  # the app session does not decompress
    if upstream.api_key:  # vLLM --api-key guards /v1/models (a common health_path)
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    try:
        async with session.get(url, headers=headers, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=scrape.timeout_s)) as resp:
            if resp.content_length is not None and resp.content_length > MAX_METRICS_BYTES:
                return resp.status, None
            # Chunked answers carry no length: read one byte past the cap to tell.
            body = await read_at_most(resp, MAX_METRICS_BYTES + 1)
            return resp.status, body if len(body) <= MAX_METRICS_BYTES else None
    except TimeoutError:
        return f"{url}: no answer within {scrape.timeout_s:g}s"
    except (aiohttp.ClientError, OSError) as exc:
        return f"{url}: {type(exc).__name__}: {exc}"


async def check_endpoint(session: aiohttp.ClientSession, upstream: Upstream, endpoint: str,
                         scrape: PoolScrape) -> Check:
    """Health-check and scrape one pool endpoint (both requests at once)."""
    health_url, metrics_url = scrape.health_url(endpoint), scrape.metrics_url(endpoint)
    health, metrics = await asyncio.gather(_get(session, health_url, upstream, scrape),
                                           _get(session, metrics_url, upstream, scrape))
    health_error = health if isinstance(health, str) else None
    if not isinstance(health, str) and not 200 <= health[0] < 300:
        health_error = f"{health_url} answered HTTP {health[0]}"
    if isinstance(metrics, str):
        return Check(ok=False, load=None, fed_load=False, health_error=health_error,
                     metrics_error=metrics)
    status, body = metrics
    load, metrics_error = None, None
    if status == 200 and body is None:
        metrics_error = f"{metrics_url}: the answer is over {MAX_METRICS_BYTES} bytes"
    elif status == 200 and body is not None:
        try:
            load = parse_server_load(body.decode("utf-8", "replace"), scrape.metrics)
        except ValueError as exc:
            metrics_error = f"{metrics_url}: not Prometheus text ({exc})"
    elif status != 404:  # 404: a server without metrics (Ollama)
        metrics_error = f"{metrics_url} answered HTTP {status}"
    return Check(ok=health_error is None, load=load, fed_load=True, health_error=health_error,
                 metrics_error=metrics_error)


class _Books:
    """What the scraper last reported per endpoint, so it logs edges only."""

    def __init__(self) -> None:
        self.has_metrics: dict[tuple[str, str], bool] = {}

    def metrics_edge(self, upstream: str, endpoint: str, check: Check) -> None:
        if not check.fed_load:
            return
        key, has = (upstream, endpoint), check.load is not None
        if self.has_metrics.get(key) == has:
            return
        self.has_metrics[key] = has
        if has:  # picked by queue depth, KV-cache use and running requests
            log.info("pool_load_source_changed", upstream=upstream, endpoint=endpoint,
                     source="metrics")
        else:
            log.info("pool_load_source_changed", upstream=upstream, endpoint=endpoint,
                     source="in_flight", reason=check.metrics_error or "none found",
                     hint="set latency.scrape.metrics if the server uses other metric names")

    def forget_except(self, keep: set[tuple[str, str]]) -> None:
        self.has_metrics = {k: v for k, v in self.has_metrics.items() if k in keep}


def _feed(router: Router, metrics: Metrics, books: _Books, upstream: Upstream, endpoint: str,
          check: Check, now: float) -> None:
    name = upstream.name
    if check.health_error is not None:
        metrics.pool_scrape_errors.labels(name, endpoint, "health").inc()
    if check.metrics_error is not None:
        metrics.pool_scrape_errors.labels(name, endpoint, "metrics").inc()
    if check.fed_load:
        router.feed_pool_load(name, endpoint, check.load, now=now)
    books.metrics_edge(name, endpoint, check)
    change = router.feed_pool_health(name, endpoint, check.ok, now=now)
    if change is None:
        return
    if change.healthy:
        log.info("pool_endpoint_health_changed", upstream=name, endpoint=endpoint, healthy=True)
    else:  # it gets no requests until a check passes
        log.warning("pool_endpoint_health_changed", upstream=name, endpoint=endpoint,
                    healthy=False, failed_checks=change.failed_checks,
                    reason=check.health_error or check.metrics_error)


async def scrape_round(app: web.Application, books: _Books) -> None:
    """Check every endpoint of every scraped pool once and feed the router."""
    runtime = app[SERVING].runtime
    router, scrape = runtime.router, runtime.config.latency.scrape
    work = [(upstream, endpoint) for upstream in router.scraped_pools
            for endpoint in upstream.endpoints]
    books.forget_except({(u.name, e) for u, e in work})
    if not work:
        return
    session = app[SESSION]
    checks = await asyncio.gather(*(check_endpoint(session, u, e, scrape) for u, e in work))
    now = app[CLOCK]()
    for (upstream, endpoint), check in zip(work, checks, strict=True):
        _feed(router, app[METRICS], books, upstream, endpoint, check, now)


async def _scrape_forever(app: web.Application) -> None:
    loop = asyncio.get_running_loop()
    books = _Books()
    due = loop.time()
    while True:
        try:
            await scrape_round(app, books)
        except Exception:  # a bug here must not stop pool scraping for good
            log.exception("pool_scrape_crashed")
        interval = app[SERVING].runtime.config.latency.scrape.interval_s
        due = next_round(due, interval, loop.time())
        await asyncio.sleep(due - loop.time())


async def pool_scraper(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: scrape and health-check local GPU pools; report them in /metrics."""

    def views() -> dict[str, tuple[EndpointView, ...]]:
        return app[SERVING].runtime.router.pool_snapshot(now=app[CLOCK]())

    stop_reporting = app[METRICS].watch_pools(views)
    try:
        async with running(_scrape_forever(app), name="skyroute-pool-scraper"):
            yield
    finally:
        stop_reporting()
