"""Policy sections of the routing file: retries, breakers, latency, sessions, sync, degradation.

Frozen dataclasses with their defaults and the reasoning behind them; each
``__post_init__`` rejects values that cannot work. ``routing.config`` reads the
YAML into them.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ._pool import DEFAULT_METRIC_NAMES, PoolMetricNames


class Strategy(enum.StrEnum):
    """How a route orders its healthy upstreams (string-valued, as written in YAML)."""

    LOWEST_LATENCY = "lowest-latency"
    PRIORITY = "priority"
    WEIGHTED = "weighted"
    LEAST_OUTSTANDING = "least-outstanding"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Backoff between attempts and the retry budget that stops retry storms."""

    backoff_base_s: float = 0.025
    backoff_cap_s: float = 1.0
    #: Retries allowed as a share of requests over ``budget_window_s`` (Envoy's retry budget).
    budget: float = 0.2
    budget_window_s: float = 10.0
    #: Hedged requests allowed as a share of requests (extra upstream calls).
    hedge_budget: float = 0.05
    #: How long an upstream answering 401/402 (bad key, no balance) stays out of rotation.
    bad_key_cooldown_s: float = 600.0
    #: How long a 429/503 without Retry-After keeps an upstream out.
    default_retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.backoff_base_s <= self.backoff_cap_s:
            raise ValueError("backoff_base must be > 0 and not above backoff_cap")
        if not 0 <= self.budget <= 1:
            raise ValueError("budget must be a share between 0% and 100%")


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """Circuit breaking per upstream (Envoy's outlier detection)."""

    consecutive_failures: int = 5
    failure_rate: float = 0.5
    min_requests: int = 10
    window_s: float = 30.0
    cooldown_s: float = 5.0
    max_cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be a share above 0% and at most 100%")
        if self.cooldown_s > self.max_cooldown_s:
            raise ValueError("cooldown must not be above max_cooldown")


#: The slowest of every instance's own (passive) estimate, which each exports as a gauge and
#: keeps after its traffic moved away; for upstreams no instance has one of, the p95 of
#: skyroute's own TTFB histogram across instances.
DEFAULT_PROMETHEUS_QUERY = (
    'max by (upstream) (skyroute_upstream_latency_estimate_seconds{source="passive"}) or '
    "histogram_quantile(0.95, sum by (le, upstream) "
    "(rate(skyroute_upstream_ttfb_seconds_bucket[1m])))"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrometheusSource:
    """Where to read upstream latency (seconds, one series per upstream) from Prometheus."""

    url: str
    query: str = DEFAULT_PROMETHEUS_QUERY
    interval_s: float = 5.0
    timeout_s: float = 2.0
    label: str = "upstream"  # the series label that holds the upstream name

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r} must start with http:// or https://")
        object.__setattr__(self, "url", self.url.rstrip("/"))


#: A pool server's scraped load counts for this many scrape intervals (plus the scrape
#: timeout, as long as a round may take); after that the picker goes back to skyroute's
#: own in-flight counts. One lost or slow scrape is not enough.
STALE_SCRAPES = 3
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_DNS_DISCOVERY = re.compile(r"dns:[^\s:/]+(?::(\d+))?")


def is_metric_name(name: str) -> bool:
    """Whether ``name`` is a valid Prometheus metric name."""
    return _METRIC_NAME.match(name) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolScrape:
    """How skyroute watches the servers of each local GPU pool (``latency.scrape``).

    Paths are relative to each endpoint's origin (``scheme://host:port``): pool
    endpoints usually end in ``/v1`` while vLLM and SGLang serve ``/metrics`` and
    ``/health`` at the root.
    """

    #: The Gateway API Inference Extension scrapes every 1-2 s; queues change that fast.
    interval_s: float = 1.0
    #: A model server answers /health and /metrics in milliseconds even when busy.
    timeout_s: float = 0.5
    metrics_path: str = "/metrics"
    #: ``/v1/models`` works on every OpenAI-compatible server (Ollama has no /health).
    health_path: str = "/health"
    #: Failed checks in a row that take an endpoint out; one passing check brings it back.
    unhealthy_after: int = 2
    metrics: PoolMetricNames = DEFAULT_METRIC_NAMES

    def __post_init__(self) -> None:
        if not 0 < self.interval_s < float("inf"):
            raise ValueError("interval must be above 0 (1s to 2s is usual)")
        if not 0 < self.timeout_s < float("inf"):
            raise ValueError("timeout must be above 0 (e.g. 500ms)")
        for key in ("metrics_path", "health_path"):
            if not getattr(self, key).startswith("/"):
                raise ValueError(f"{key} {getattr(self, key)!r} must start with / "
                                 "(it is taken from each endpoint's scheme://host:port)")
        if self.unhealthy_after < 1:
            raise ValueError("unhealthy_after must be at least 1")
        for names in (self.metrics.waiting, self.metrics.running, self.metrics.kv_cache_usage):
            for name in names:
                if not is_metric_name(name):
                    raise ValueError(f"{name!r} is not a Prometheus metric name")

    @property
    def stale_after_s(self) -> float:
        """Age after which a scraped load no longer counts."""
        return STALE_SCRAPES * self.interval_s + self.timeout_s

    def health_url(self, endpoint: str) -> str:
        """Where to health-check ``endpoint`` (a base URL such as ``http://h:8000/v1``)."""
        return _origin(endpoint) + self.health_path

    def metrics_url(self, endpoint: str) -> str:
        """Where to read ``endpoint``'s Prometheus metrics."""
        return _origin(endpoint) + self.metrics_path


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyPolicy:
    """Latency sources and how a slow upstream is left and taken back."""

    prometheus: PrometheusSource | None = None
    passive_window_s: float = 60.0
    #: How often estimates are re-evaluated (the passive source's "interval").
    interval_s: float = 1.0
    #: Share of requests sent to slow upstreams anyway, so recovery is seen.
    probe_share: float = 0.02
    recover_ratio: float = 0.8
    recover_intervals: int = 3
    #: After recovery, traffic returns linearly over this long (Envoy's slow start).
    ramp_s: float = 10.0
    #: Scraping and health-checking the servers of local GPU pools.
    scrape: PoolScrape = field(default_factory=PoolScrape)

    def __post_init__(self) -> None:
        if not 0 <= self.probe_share <= 1:
            raise ValueError("probe_share must be a share between 0% and 100%")


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionPolicy:
    """Where a request's session id comes from, and how long a session lives."""

    header: str = "X-Session-ID"  # else the OpenAI ``user`` field of the body
    ttl_s: float = 86400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncPolicy:
    """State sync with peer instances (the ``/sync/{doc}`` endpoint and peer links)."""

    token: str = field(repr=False)
    peers: tuple[str, ...] = ()
    discovery: str | None = None  # dns:<headless service name>[:port]
    #: How often the discovery name is resolved again: pods come and go, and a new
    #: one is peered within this long. 10 s is cheap for any resolver.
    discovery_interval_s: float = 10.0
    rotate_every_s: float = 3600.0
    snapshot_path: str | None = None

    def __post_init__(self) -> None:
        for peer in self.peers:
            if not peer.startswith(("ws://", "wss://")):
                raise ValueError(f"peer {peer!r} must start with ws:// or wss://")
        found = _DNS_DISCOVERY.fullmatch(self.discovery or "")
        if self.discovery is not None and not (found and 0 < int(found[1] or 8080) < 65536):
            raise ValueError(f"discovery {self.discovery!r} must look like "
                             "dns:<service name>[:port], e.g. dns:skyroute-headless.ns.svc:8080")
        if not self.discovery_interval_s > 0:
            raise ValueError("discovery_interval must be more than 0s")


@dataclass(frozen=True, slots=True, kw_only=True)
class DegradationPolicy:
    """What each degradation level switches off (the ``degradation`` section)."""

    #: False: no hedged requests while a route is ``reduced`` or worse, since a hedge
    #: doubles the load on the targets that are left.
    reduced_hedging: bool = True
    #: False: never switch a route to its ``fallback_model``.
    fallback_enabled: bool = True
    #: Enter ``minimal`` when fewer than this share of all upstreams is available
    #: (healthy or slow); 0 turns ``minimal`` off. Half means a real outage, not one
    #: region having a bad minute.
    minimal_below: float = 0.5
    #: In ``minimal``, ``max_tokens`` / ``max_completion_tokens`` are capped to this (and
    #: ``max_tokens`` added when the request sets neither): short answers keep more
    #: clients served by the capacity that is left.
    minimal_max_tokens: int = 256
    #: In ``minimal``, requests asking for more choices (``n``) than this are refused.
    minimal_max_n: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.minimal_below <= 1:
            raise ValueError("when_available_below must be a share between 0% and 100%")
        if self.minimal_max_tokens < 1 or self.minimal_max_n < 1:
            raise ValueError("max_tokens and max_n must be at least 1")
