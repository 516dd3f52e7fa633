"""Prometheus metrics of one skyroute instance.

Each application owns its ``CollectorRegistry`` (several instances can live in one
process, as in tests and ``skyroute demo --instances``). Histogram buckets are
chosen around the 200 ms slow threshold so ``histogram_quantile`` is precise where
routing decisions are made.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from skyroute.routing import EndpointView

from ._worker_metrics import write_changed

M = TypeVar("M", Counter, Histogram)

#: Pool upstream name -> its endpoints as routing sees them now.
PoolViews = Callable[[], Mapping[str, Sequence[EndpointView]]]

#: Upstream name -> its lean-client connections now, as (busy, idle).
ConnectionCounts = Callable[[], Mapping[str, tuple[int, int]]]

#: Dense around 50-400 ms, where "is this region slow?" is decided.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                   0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class CounterChild:
    """One child of a labelled ``Counter``, incremented straight on its value.

    ``Counter.inc`` checks on every call that the metric is a child (it is: made by
    ``labels``) and handles exemplars (never given here); this keeps only what
    increments: the non-negative check and the value's own ``inc`` (a lock; under
    ``--workers`` the buffered value of ``_worker_metrics``). Same value, same exposition.
    """

    __slots__ = ("_value",)

    def __init__(self, child: Counter) -> None:
        self._value = child._value

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (not negative), as ``Counter.inc``."""
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._value.inc(amount)


class HistogramChild:
    """One child of a labelled ``Histogram``, observed straight on its values.

    Does what ``Histogram.observe`` does without an exemplar: the sum grows by the
    amount, and the first bucket whose upper bound is at least the amount by one (found
    by bisection instead of a loop over the 21 bounds; NaN, above no bound, counts in
    none, as there).
    """

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._sum = child._sum
        self._bounds = tuple(child._upper_bounds)
        self._buckets = tuple(child._buckets)

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the sum and its bucket, as ``Histogram.observe``."""
        self._sum.inc(amount)
        i = bisect_left(self._bounds, amount)
        if amount <= self._bounds[i]:  # the last bound is +Inf; False for NaN
            self._buckets[i].inc(1)


C = TypeVar("C", CounterChild, HistogramChild)


class Children(Generic[M, C]):
    """A labelled metric whose children are kept by their label values.

    prometheus_client's ``labels()`` checks and converts every value and takes a lock
    on each call; on the per-request path (requests, attempts, time to first byte,
    latency) the child is looked up in a dict instead, made once per label values
    (names from the routing file and status codes: a small, closed set), and updated
    through ``CounterChild``/``HistogramChild``. Only for metrics that are never
    cleared, or the dict would keep children no longer exported.
    """

    __slots__ = ("_children", "_make", "metric")

    def __init__(self, metric: M, make: Callable[[M], C]) -> None:
        self.metric = metric
        self._make = make
        self._children: dict[tuple[str, ...], C] = {}

    def labels(self, *values: str) -> C:
        """The child for ``values`` (positional, in the metric's label order)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._make(self.metric.labels(*values))
        return child

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metric, name)


class Metrics:
    """Every metric the data plane reports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, instance: str) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Set by the ``--workers`` supervisor: every worker's values live in files
        # there (prometheus_client's multiprocess mode), and a scrape sums them all.
        self._multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self._scrape_collectors: list[Collector] = []
        self._exported: dict[Gauge, set[tuple[str, ...]]] = {}  # see replace_series
        info = Gauge("skyroute_instance_info", "This skyroute instance (value is always 1).",
                     ["instance_id"], multiprocess_mode="livemax", registry=r)
        info.labels(instance).set(1)
        self.requests = Children(Counter(
            "skyroute_requests", "Client requests by route, serving upstream and status.",
            ["route", "upstream", "status"], registry=r), CounterChild)
        self.attempts = Children(Counter(
            "skyroute_attempts", "Upstream attempts by upstream and outcome.",
            ["upstream", "outcome"], registry=r), CounterChild)
        self.failovers = Counter(
            "skyroute_failovers", "Requests that moved on to another upstream after a failure.",
            ["route"], registry=r)
        self.job_targets = Counter(
            "skyroute_jobs_targets", "Job calls answered on a route with jobs.targets, by "
            "choice: preferred (one of its jobs.targets) or fallback (the route's own targets).",
            ["route", "choice"], registry=r)
        self.hedges = Counter(
            "skyroute_hedges", "Hedged requests by result: won (the hedge answered first) "
            "or lost (the first attempt did).", ["route", "result"], registry=r)
        self.stream_resumes = Counter(
            "skyroute_stream_resumes",
            "Streams cut part-way on a route with resume: on, by result: resumed (the "
            "client got one whole answer) or cut (no upstream could continue it).",
            ["route", "result"], registry=r)
        self.ttfb = Children(Histogram(
            "skyroute_upstream_ttfb_seconds",
            "Upstream time to first content byte (keep-alives excluded).",
            ["upstream", "region"], buckets=LATENCY_BUCKETS, registry=r), HistogramChild)
        self.latency = Children(Histogram(
            "skyroute_upstream_latency_seconds", "Upstream total time of successful attempts.",
            ["upstream", "region"], buckets=LATENCY_BUCKETS, registry=r), HistogramChild)
        self.in_flight = Gauge(
            "skyroute_in_flight_requests", "Client requests being served now.",
            multiprocess_mode="livesum", registry=r)
        # One process, one event loop: the count is a plain int the gauge reads when
        # scraped (no lock per request). Under --workers a scrape sums the workers'
        # files, which only inc/dec write.
        self._in_flight_now = 0
        if self._multiprocess_dir is None:
            self.in_flight.set_function(lambda: self._in_flight_now)
        self.client_connections = Gauge(
            "skyroute_client_connections", "Client connections open now.",
            multiprocess_mode="livesum", registry=r)
        self.client_connections_closed = Counter(
            "skyroute_client_connections_closed",
            "Client connections closed by skyroute's limits, by reason: head_timeout, "
            "keepalive_timeout, send_timeout, evicted (room made at max_client_connections) or "
            "refused (at the cap with every connection busy).", ["reason"], registry=r)
        self.config_reloads = Counter(
            "skyroute_config_reloads", "Routing file reloads by result (success or error).",
            ["result"], registry=r)
        self.retry_budget_exhausted = Counter(
            "skyroute_retry_budget_exhausted",
            "Requests given up because the route's retry budget was spent.", ["route"],
            registry=r)
        self.retries_paid = Counter(
            "skyroute_retries_paid",
            "Retries paid from the route's retry budget: back to upstreams already failing "
            "(failover to an untried healthy upstream is free and not counted here).",
            ["route"], registry=r)
        self.panic_attempts = Counter(
            "skyroute_panic_attempts",
            "Attempts the panic rule made: an upstream tried although it is out, because "
            "nothing else of the route could take the request.", ["route", "upstream"],
            registry=r)
        self.upstream_state = Gauge(
            "skyroute_upstream_state",
            "1 for each upstream's current state (healthy, slow, open, bad_key, down).",
            ["upstream", "state"], multiprocess_mode="livemostrecent", registry=r)
        self.health_changes = Counter(
            "skyroute_upstream_state_changes", "Upstream state changes, by new state.",
            ["upstream", "state"], registry=r)
        self.degradation_level = Gauge(
            "skyroute_degradation_level",
            "Per route: 0 normal, 1 reduced, 2 fallback, 3 minimal, 4 unavailable.",
            ["route"], multiprocess_mode="livemostrecent", registry=r)
        self.latency_estimate = Gauge(
            "skyroute_upstream_latency_estimate_seconds",
            "Latency estimates per upstream, by source: passive (this instance's own p95 "
            "time to first token, kept for 10 passive windows after its traffic there "
            "stops; the default latency query takes the max over instances) and prometheus "
            "(what that query returned, while fresh). /health says which one routing uses.",
            ["upstream", "source"], multiprocess_mode="livemostrecent", registry=r)
        self.object_affinity = Counter(
            "skyroute_object_affinity",
            "Stateful objects (files, batches, responses, ...): remembered (an upstream "
            "created one), routed (a request naming one went to its upstream), unavailable "
            "(its upstream was out: 503).", ["result"], registry=r)
        self.client_errors = Counter(
            "skyroute_client_errors", "Requests refused before routing, by reason.",
            ["reason"], registry=r)
        self.rate_limited = Counter(
            "skyroute_rate_limited",
            "Requests refused (429) by a client key's limit, by key name and limit: "
            "requests (rpm) or tokens (tpm).", ["key", "limit"], registry=r)
        self.rate_share = Gauge(
            "skyroute_rate_limit_share",
            "This instance's share of a client key's rpm, by key name: it admits while its "
            "own count in the last minute is under it; the live instances' shares add up "
            "to the rpm (README: Client rate limits across instances).",
            ["key"], multiprocess_mode="liveall", registry=r)
        self.rate_share_given = Counter(
            "skyroute_rate_limit_share_given",
            "Units of a client key's rpm this instance gave to others (unused here, "
            "wanted there), by key name.", ["key"], registry=r)
        self.degradation_changes = Counter(
            "skyroute_degradation_level_changes",
            "Route degradation level changes, by new level.", ["route", "level"], registry=r)
        self.minimal_mode = Gauge(
            "skyroute_minimal_mode",
            "1 while the instance is in minimal mode (too few upstreams available), else 0.",
            multiprocess_mode="livemax", registry=r)
        self.fallback_served = Counter(
            "skyroute_fallback_served",
            "Requests for a route answered by its fallback_model's route.",
            ["route", "fallback"], registry=r)
        self.degraded_refusals = Counter(
            "skyroute_degraded_refusals",
            "Requests refused in minimal mode, by reason: not_essential (the route is not "
            "essential) or n_above_max (more choices than degradation.minimal.max_n).",
            ["route", "reason"], registry=r)
        self.max_tokens_capped = Counter(
            "skyroute_max_tokens_capped",
            "Requests whose max_tokens was capped (or added) in minimal mode.", ["route"],
            registry=r)
        self.routing_share = Gauge(
            "skyroute_routing_share",
            "Share (0..1) of each route's recent requests served by each upstream.",
            ["route", "upstream"], multiprocess_mode="livemostrecent", registry=r)
        # Registered only while a latency Prometheus is configured (see set_prometheus_up):
        # a constant 0 on instances that use none would fire SkyrouteLatencySourceDown.
        self.prometheus_up = Gauge(
            "skyroute_prometheus_source_up",
            "1 while the latency Prometheus answers queries, 0 while it does not "
            "(routing then uses passive latency); absent when none is configured.",
            multiprocess_mode="livemostrecent", registry=None)
        self._prometheus_up_registered = False
        self.prometheus_queries = Counter(
            "skyroute_prometheus_queries",
            "Latency queries to Prometheus by result: ok, empty (no series matched an "
            "upstream), error (bad answer) or unreachable (connect error or timeout).",
            ["result"], registry=r)
        self.pool_scrape_errors = Counter(
            "skyroute_pool_scrape_errors",
            "Failed checks of local GPU pool servers, by check: health (no 2xx from "
            "health_path in time) or metrics (metrics_path unreachable or unreadable).",
            ["upstream", "endpoint", "check"], registry=r)

    def request_started(self) -> None:
        """One more client request in flight (``skyroute_in_flight_requests``)."""
        if self._multiprocess_dir is None:
            self._in_flight_now += 1
        else:
            self.in_flight.inc()

    def request_finished(self) -> None:
        """One client request fewer in flight."""
        if self._multiprocess_dir is None:
            self._in_flight_now -= 1
        else:
            self.in_flight.dec()

    def watch_pools(self, views: PoolViews) -> Callable[[], None]:
        """Report every pool endpoint from ``views()`` at each ``/metrics`` scrape.

        Returns:
            a function that stops the reporting (for the scraper's shutdown).
        """
        return self._read_when_scraped(_PoolCollector(views))

    def watch_upstream_connections(self, counts: ConnectionCounts) -> Callable[[], None]:
        """Report ``skyroute_upstream_connections{upstream,state}`` from ``counts()`` (each
        upstream's busy and idle lean-client connections) at each ``/metrics`` scrape:
        nothing on the request path.

        Returns:
            a function that stops the reporting (for the pools' shutdown).
        """
        return self._read_when_scraped(_ConnectionsCollector(counts))

    def _read_when_scraped(self, collector: Collector) -> Callable[[], None]:
        """Register ``collector``, also in the registry a ``--workers`` scrape builds (there it
        shows the scraped worker's own view); returns the function that unregisters it."""
        self.registry.register(collector)
        self._scrape_collectors.append(collector)

        def stop() -> None:
            self.registry.unregister(collector)
            self._scrape_collectors.remove(collector)

        return stop

    def drop_series(self, gauge: Gauge, *labels: str) -> None:
        """Take the series ``labels`` of ``gauge`` out of /metrics (its key, route or
        source is gone).

        prometheus_client cannot delete a series from its multiprocess files
        (``--workers``: ``remove``/``clear`` only warn "not implemented in multi-process
        mode" and leave the last value there); the series then reads NaN, "no value",
        until the workers restart.
        """
        if self._multiprocess_dir is None:
            gauge.remove(*labels)
        else:
            gauge.labels(*labels).set(math.nan)

    def replace_series(self, gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
        """Set ``gauge`` to exactly ``values`` (label values -> value): every series in
        ``values`` set, every other one set here before dropped (``drop_series``)."""
        for labels, value in values.items():
            gauge.labels(*labels).set(value)
        for labels in self._exported.get(gauge, set()) - values.keys():
            self.drop_series(gauge, *labels)
        self._exported[gauge] = set(values)

    def set_prometheus_up(self, up: bool | None) -> None:
        """Set ``skyroute_prometheus_source_up``; None removes it (no source configured)."""
        if up is None:
            if self._prometheus_up_registered:
                self.registry.unregister(self.prometheus_up)
                self._prometheus_up_registered = False
            return
        if not self._prometheus_up_registered:
            self.registry.register(self.prometheus_up)
            self._prometheus_up_registered = True
        self.prometheus_up.set(1 if up else 0)

    def render(self) -> web.Response:
        """The ``/metrics`` response (every worker's, under ``--workers``)."""
        registry = self.registry
        if self._multiprocess_dir is not None:
            write_changed()  # this worker's latest values, not its last tick's
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._multiprocess_dir)
            # Read at scrape time from this worker's router: this worker's view.
            for collector in self._scrape_collectors:
                registry.register(collector)
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp


_ENDPOINT_LABELS = ["upstream", "endpoint"]


class _PoolCollector(Collector):
    """Pool endpoint gauges read from routing when scraped, so reloads leave no stale series."""

    def __init__(self, views: PoolViews) -> None:
        self._views = views

    def describe(self) -> list[Metric]:
        return []  # no fixed series: registering must not call the router yet

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "skyroute_pool_endpoint_up",
            "1 while a local GPU pool server passes its health checks, 0 while it is out.",
            labels=_ENDPOINT_LABELS)
        waiting = GaugeMetricFamily(
            "skyroute_pool_endpoint_queue_depth",
            "Requests waiting in a pool server's queue, as it last reported (absent "
            "without a fresh scrape).", labels=_ENDPOINT_LABELS)
        running = GaugeMetricFamily(
            "skyroute_pool_endpoint_running",
            "Requests a pool server runs, as it last reported (absent without a fresh "
            "scrape).", labels=_ENDPOINT_LABELS)
        kv_cache = GaugeMetricFamily(
            "skyroute_pool_endpoint_kv_cache_usage",
            "KV-cache share (0..1) a pool server uses, as it last reported.",
            labels=_ENDPOINT_LABELS)
        in_flight = GaugeMetricFamily(
            "skyroute_pool_endpoint_in_flight",
            "Requests skyroute has in flight at a pool server.", labels=_ENDPOINT_LABELS)
        picks = CounterMetricFamily(
            "skyroute_pool_endpoint_picks",
            "Attempts sent to each pool server by its endpoint picker.", labels=_ENDPOINT_LABELS)
        for upstream, endpoints in self._views().items():
            for view in endpoints:
                labels = [upstream, view.endpoint]
                up.add_metric(labels, 1 if view.healthy else 0)
                in_flight.add_metric(labels, view.in_flight)
                picks.add_metric(labels, view.picks)
                if view.fresh and view.load is not None:
                    waiting.add_metric(labels, view.load.waiting)
                    running.add_metric(labels, view.load.running)
                    if view.load.kv_cache_usage is not None:
                        kv_cache.add_metric(labels, view.load.kv_cache_usage)
        yield from (up, waiting, running, kv_cache, in_flight, picks)


class _ConnectionsCollector(Collector):
    """Upstream connection gauges read from the pools when scraped (the pools count anyway)."""

    def __init__(self, counts: ConnectionCounts) -> None:
        self._counts = counts

    def describe(self) -> list[Metric]:
        return []  # read only when scraped

    def collect(self) -> Iterator[Metric]:
        connections = GaugeMetricFamily(
            "skyroute_upstream_connections",
            "Connections of skyroute's lean HTTP client to each upstream, by state: busy "
            "(carrying a request, or connecting) or idle (kept alive for reuse). Cloud "
            "upstreams, uploads and HEAD go through aiohttp and are not counted.",
            labels=["upstream", "state"])
        for upstream, (busy, idle) in self._counts().items():
            connections.add_metric([upstream, "busy"], busy)
            connections.add_metric([upstream, "idle"], idle)
        yield connections
