"""Prometheus metrics of one skyroute instance.

Each application owns its ``CollectorRegistry`` (several instances can live in one
process, as in tests and ``skyroute demo --instances``). Histogram buckets are
chosen around the 200 ms slow threshold so ``histogram_quantile`` is precise where
routing decisions are made.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: Dense around 50-400 ms, where "is this region slow?" is decided.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
                   0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Every metric the data plane reports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, instance: str) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        info = Gauge("skyroute_instance_info", "This skyroute instance (value is always 1).",
                     ["instance_id"], registry=r)
        info.labels(instance).set(1)
        self.requests = Counter(
            "skyroute_requests", "Client requests by route, serving upstream and status.",
            ["route", "upstream", "status"], registry=r)
        self.attempts = Counter(
            "skyroute_attempts", "Upstream attempts by upstream and outcome.",
            ["upstream", "outcome"], registry=r)
        self.failovers = Counter(
            "skyroute_failovers", "Requests that moved on to another upstream after a failure.",
            ["route"], registry=r)
        self.hedges = Counter(
            "skyroute_hedges", "Hedged requests by result: won (the hedge answered first) "
            "or lost (the first attempt did).", ["route", "result"], registry=r)
        self.ttfb = Histogram(
            "skyroute_upstream_ttfb_seconds",
            "Upstream time to first content byte (keep-alives excluded).",
            ["upstream", "region"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram(
            "skyroute_upstream_latency_seconds", "Upstream total time of successful attempts.",
            ["upstream", "region"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "skyroute_in_flight_requests", "Client requests being served now.", registry=r)
        self.config_reloads = Counter(
            "skyroute_config_reloads", "Routing file reloads by result (success or error).",
            ["result"], registry=r)
        self.retry_budget_exhausted = Counter(
            "skyroute_retry_budget_exhausted",
            "Requests given up because the route's retry budget was spent.", ["route"],
            registry=r)
        self.upstream_state = Gauge(
            "skyroute_upstream_state",
            "1 for each upstream's current state (healthy, slow, open, bad_key, down).",
            ["upstream", "state"], registry=r)
        self.health_changes = Counter(
            "skyroute_upstream_state_changes", "Upstream state changes, by new state.",
            ["upstream", "state"], registry=r)
        self.degradation_level = Gauge(
            "skyroute_degradation_level",
            "Per route: 0 normal, 1 reduced, 2 fallback, 3 minimal, 4 unavailable.",
            ["route"], registry=r)
        self.latency_estimate = Gauge(
            "skyroute_upstream_latency_estimate_seconds",
            "The latency estimate routing uses, by upstream and source.",
            ["upstream", "source"], registry=r)
        self.client_errors = Counter(
            "skyroute_client_errors", "Requests refused before routing, by reason.",
            ["reason"], registry=r)

    def render(self) -> web.Response:
        """The ``/metrics`` response."""
        resp = web.Response(body=generate_latest(self.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp
