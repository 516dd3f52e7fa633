"""Policy sections of the routing file: retries, breakers, latency, sessions, sync, degradation.

Each section is declared once, here, as a frozen pydantic dataclass: its fields with
their kinds (``_values``), defaults, limits and a description. The field name is what
the code reads (``cooldown_s``); the ``validation_alias`` is the YAML key a user
writes (``cooldown``). Validation, the JSON Schema (``skyroute schema``), the Helm
chart's schema and the README's settings table all come from these declarations.
Checks that span two fields are ``model_validator``s. Per-route overrides are made
with ``dataclasses.replace``, which validates again.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, model_validator
from pydantic.dataclasses import dataclass

from ._pool import DEFAULT_METRIC_NAMES, PoolMetricNames
from ._values import (
    SECTION,
    Count,
    Duration,
    Flag,
    HttpUrl,
    Kind,
    Name,
    RedisUrl,
    Share,
    Size,
    Text,
    UrlPath,
    WsUrl,
    invalid,
    is_metric_name,
)

__all__ = [
    "DEFAULT_PROMETHEUS_QUERY",
    "STALE_SCRAPES",
    "BreakerPolicy",
    "CacheMode",
    "CachePolicy",
    "CacheScope",
    "DegradationPolicy",
    "FallbackLevel",
    "LatencyPolicy",
    "MinimalLevel",
    "PoolScrape",
    "PrometheusSource",
    "ReducedLevel",
    "RetryPolicy",
    "SessionPolicy",
    "Strategy",
    "SyncPolicy",
    "SyncRelay",
    "WireCompression",
    "is_metric_name",
]


class Strategy(enum.StrEnum):
    """How a route orders its healthy upstreams (string-valued, as written in YAML)."""

    LOWEST_LATENCY = "lowest-latency"
    PRIORITY = "priority"
    WEIGHTED = "weighted"
    LEAST_OUTSTANDING = "least-outstanding"


class CacheMode(enum.StrEnum):
    """Whether a route's answers are cached (``routes[].cache``)."""

    OFF = "off"
    #: Deterministic requests only (``temperature: 0`` or a ``seed``).
    EXACT = "exact"
    #: Every cacheable request, sampled ones too (the first answer is replayed).
    ALWAYS = "always"
    #: ``exact``, plus near-identical prompts answered from the cache under degradation.
    APPROXIMATE = "approximate"


def _cache_mode(value: object) -> object:
    # YAML 1.1 reads a bare ``off`` as false; the user wrote ``off``.
    return "off" if value is False else value


#: ``routes[].cache``: off, exact, always or approximate (a bare YAML ``off`` included).
CacheModeValue = Annotated[CacheMode, BeforeValidator(_cache_mode)]


class CacheScope(enum.StrEnum):
    """Who may be served an entry (``routes[].cache_scope``)."""

    #: Only the client key that stored it: the key's name is part of the cache key.
    KEY = "key"
    #: Every client of the route.
    SHARED = "shared"


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class MemoryCache:
    """The in-process level of the response cache."""

    # A chat answer is a few KiB compressed: 256 MiB holds tens of thousands.
    max_bytes: Size = Field(
        default=256 * 1024 * 1024, gt=0,
        description="Compressed bytes kept per instance; the least recently used go first.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class RedisCache:
    """The shared level of the response cache: a Redis every instance names."""

    url: RedisUrl = Field(
        description="The Redis server, e.g. redis://127.0.0.1:6379/0 (rediss:// for TLS).")
    # A lookup on the same network answers in well under a millisecond; past a few ms
    # Redis is slower than the miss it would save, and a request must not wait on it.
    timeout_s: Duration = Field(
        default=0.005, validation_alias="timeout", gt=0,
        description="Longest wait for Redis on the request path; slower counts as down, and "
                    "the request goes on without it.")
    prefix: Name = Field(
        default="skyroute:cache:",
        description="Key prefix of the entries in Redis.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class ApproximateCache:
    """Approximate matches (MinHash LSH) for routes with ``cache: approximate``."""

    threshold: Share = Field(
        default=0.9,
        description="Least estimated Jaccard similarity of the last user message's word "
                    "shingles for a near-identical prompt.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class WireCompression:
    """Compression of whole answers on the wire, for clients that accept it."""

    # Below about a packet, compressing saves less than it costs.
    min_bytes: Size = Field(
        default=1024,
        description="Whole (non-streaming) /v1 answers of at least this many bytes are "
                    "compressed (br, zstd or gzip, by Accept-Encoding); 0 compresses all.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class CachePolicy:
    """The response cache (used by routes with a ``cache`` mode other than off)."""

    # The seed's figure: hot answers kept ten minutes.
    ttl_s: Duration = Field(
        default=600.0, validation_alias="ttl", gt=0,
        description="How long an entry is served.")
    stale_if_error_s: Duration = Field(
        default=3600.0, validation_alias="stale_if_error",
        description="When every upstream fails, an entry expired less than this long ago is "
                    "served, marked stale; 0 turns it off.")
    memory: MemoryCache = Field(
        default_factory=MemoryCache,
        description="The in-process level.")
    redis: RedisCache | None = Field(
        default=None,
        description="The shared level; without it each instance caches on its own.")
    # A burst of identical requests beyond this many waiters is not a cache workload.
    max_waiters: Count = Field(
        default=1000,
        description="Identical requests that may wait for one in flight (coalescing); more go "
                    "upstream on their own.")
    approximate: ApproximateCache = Field(
        default_factory=ApproximateCache,
        description="Near-identical prompts, for routes with cache: approximate.")
    compression: WireCompression = Field(
        default_factory=WireCompression,
        description="Compression of whole answers (cached or not) on the wire.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class RetryPolicy:
    """Backoff between attempts and the retry budget that stops retry storms."""

    backoff_base_s: Duration = Field(
        default=0.025, validation_alias="backoff_base", gt=0,
        description="First backoff between attempts (full-jitter exponential backoff).")
    backoff_cap_s: Duration = Field(
        default=1.0, validation_alias="backoff_cap", gt=0,
        description="Longest backoff between attempts.")
    budget: Share = Field(
        default=0.2,
        description="Retries allowed, as a share of requests over budget_window (Envoy's retry "
                    "budget).")
    budget_window_s: Duration = Field(
        default=10.0, validation_alias="budget_window", gt=0,
        description="The window the retry and hedge budgets count over.")
    hedge_budget: Share = Field(
        default=0.05,
        description="Hedged (extra) upstream calls allowed, as a share of requests.")
    bad_key_cooldown_s: Duration = Field(
        default=600.0, validation_alias="bad_key_cooldown",
        description="How long an upstream answering 401/402 (bad key, no balance) stays out.")
    default_retry_after_s: Duration = Field(
        default=1.0, validation_alias="default_retry_after",
        description="How long a 429/503 without Retry-After keeps an upstream out.")

    @model_validator(mode="after")
    def _base_within_cap(self) -> RetryPolicy:
        if self.backoff_base_s > self.backoff_cap_s:
            raise invalid("backoff_base must not be above backoff_cap")
        return self


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class BreakerPolicy:
    """Circuit breaking per upstream (Envoy's outlier detection)."""

    consecutive_failures: Count = Field(
        default=5,
        description="Open the breaker after this many failures in a row.")
    failure_rate: Share = Field(
        default=0.5, gt=0,
        description="... or after this share of failures over window.")
    min_requests: Count = Field(
        default=10,
        description="Requests in window before failure_rate is judged.")
    window_s: Duration = Field(
        default=30.0, validation_alias="window", gt=0,
        description="The window failure_rate counts over.")
    cooldown_s: Duration = Field(
        default=5.0, validation_alias="cooldown", gt=0,
        description="How long an open breaker stays open; doubles on each repeated trip.")
    max_cooldown_s: Duration = Field(
        default=30.0, validation_alias="max_cooldown", gt=0,
        description="The longest cooldown; then half-open lets one probe through.")

    @model_validator(mode="after")
    def _cooldown_within_max(self) -> BreakerPolicy:
        if self.cooldown_s > self.max_cooldown_s:
            raise invalid("cooldown must not be above max_cooldown")
        return self


#: The slowest of every instance's own (passive) estimate, which each exports as a gauge and
#: keeps after its traffic moved away; for upstreams no instance has one of, the p95 of
#: skyroute's own TTFB histogram across instances.
DEFAULT_PROMETHEUS_QUERY = (
    'max by (upstream) (skyroute_upstream_latency_estimate_seconds{source="passive"}) or '
    "histogram_quantile(0.95, sum by (le, upstream) "
    "(rate(skyroute_upstream_ttfb_seconds_bucket[1m])))"
)


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class PrometheusSource:
    """Where to read upstream latency (seconds, one series per upstream) from Prometheus."""

    url: HttpUrl = Field(description="The Prometheus server, e.g. http://prometheus:9090.")
    query: Name = Field(
        default=DEFAULT_PROMETHEUS_QUERY,
        description="PromQL giving each upstream's latency in seconds (default: the slowest of "
                    "every instance's own passive estimate, else the p95 time to first token "
                    "from skyroute's own histogram over all instances).")
    interval_s: Duration = Field(
        default=5.0, validation_alias="interval", gt=0,
        description="How often the query runs.")
    timeout_s: Duration = Field(
        default=2.0, validation_alias="timeout", gt=0,
        description="How long one query may take.")
    label: Name = Field(
        default="upstream",
        description="The series label that holds the upstream name.")


#: A pool server's scraped load counts for this many scrape intervals (plus the scrape
#: timeout, as long as a round may take); after that the picker goes back to skyroute's
#: own in-flight counts. One lost or slow scrape is not enough.
STALE_SCRAPES = 3


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class PoolScrape:
    """How skyroute watches the servers of each local GPU pool (``latency.scrape``).

    Paths are relative to each endpoint's origin (``scheme://host:port``): pool
    endpoints usually end in ``/v1`` while vLLM and SGLang serve ``/metrics`` and
    ``/health`` at the root.
    """

    # The Gateway API Inference Extension scrapes every 1-2 s; queues change that fast.
    interval_s: Duration = Field(
        default=1.0, validation_alias="interval", gt=0,
        description="How often each pool server's /metrics and health path are read.")
    # A model server answers /health and /metrics in milliseconds even when busy.
    timeout_s: Duration = Field(
        default=0.5, validation_alias="timeout", gt=0,
        description="How long one scrape may take.")
    metrics_path: UrlPath = Field(
        default="/metrics",
        description="Where a pool server's metrics are.")
    # /v1/models works on every OpenAI-compatible server (Ollama has no /health).
    health_path: UrlPath = Field(
        default="/health",
        description="Where a pool server is health-checked (e.g. /v1/models).")
    unhealthy_after: Count = Field(
        default=2,
        description="Failed checks in a row that take a server out; one pass brings it back.")
    metrics: PoolMetricNames = Field(
        default=DEFAULT_METRIC_NAMES,
        description="Metric names per load quantity, first found wins; a list given replaces that "
                    "quantity's default (vLLM, SGLang and TGI names).")

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


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class LatencyPolicy:
    """Latency sources and how a slow upstream is left and taken back."""

    prometheus: PrometheusSource | None = Field(
        default=None,
        description="Read upstream latency from Prometheus as well (all instances' view); without "
                    "it, each instance uses what it measures itself.")
    passive_window_s: Duration = Field(
        default=60.0, validation_alias="passive_window", gt=0,
        description="How far back an instance's own latency samples count.")
    interval_s: Duration = Field(
        default=1.0, validation_alias="interval", gt=0,
        description="How often latency estimates are evaluated again.")
    probe_share: Share = Field(
        default=0.02,
        description="Share of requests sent to slow upstreams anyway, so recovery is seen.")
    recover_ratio: Share = Field(
        default=0.8,
        description="A slow upstream recovers below this share of the threshold.")
    recover_intervals: Count = Field(
        default=3,
        description="Intervals in a row below recover_ratio before it recovers.")
    ramp_s: Duration = Field(
        default=10.0, validation_alias="ramp",
        description="After recovery, traffic returns linearly over this long (slow start).")
    scrape: PoolScrape = Field(
        default_factory=PoolScrape,
        description="Scraping and health-checking the servers of local GPU pools.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class SessionPolicy:
    """Where a request's session id comes from, and how long a session lives."""

    header: Name = Field(
        default="X-Session-ID",
        description="Request header holding the session id (else the OpenAI `user` field of the "
                    "body).")
    ttl_s: Duration = Field(
        default=86400.0, validation_alias="ttl", gt=0,
        description="How long an idle session is kept.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class ObjectPolicy:
    """How long skyroute remembers which upstream holds a stateful object, and how many.

    Files, batches, stored responses, vector stores, assistants and threads live at
    one provider; a later call naming one must go back there (``proxy._objects``).
    """

    ttl_s: Duration = Field(
        default=30 * 86400.0, validation_alias="ttl", gt=0,
        description="How long skyroute remembers which upstream holds a file, batch, stored "
                    "response, ... (OpenAI keeps stored responses 30 days).")
    max_entries: Count = Field(
        default=100_000,
        description="Objects remembered, all instances together; the oldest are forgotten first.")


_DNS_DISCOVERY = r"^dns:[^\s:/]+(?::([0-9]+))?$"


def _discovery(name: str) -> str:
    found = re.fullmatch(_DNS_DISCOVERY, name)
    if found is None or not 0 < int(found[1] or 8080) < 65536:
        raise invalid(f"discovery {name!r} must look like dns:<service name>[:port], "
                      "e.g. dns:skyroute-headless.ns.svc:8080")
    return name


#: ``dns:<service name>[:port]``: peers are the addresses that name resolves to.
Discovery = Annotated[str, AfterValidator(_discovery), Kind("dns name", pattern=_DNS_DISCOVERY)]


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class SyncRelay:
    """Fleet mode: a Redis that relays state between instances instead of peer links."""

    url: RedisUrl = Field(
        description="The Redis server that carries every update, e.g. "
                    "redis://:${REDIS_PASSWORD}@redis:6379/0 (rediss:// for TLS).")
    prefix: Name = Field(
        default="skyroute:sync:",
        description="Key prefix of the streams and snapshots (one per fleet on a shared "
                    "Redis).")
    # A snapshot is the whole document: every 30 s keeps the stream short (a joining
    # instance reads at most about a minute of tail) without rewriting big documents often.
    compact_every_s: Duration = Field(
        default=30.0, validation_alias="compact_every", gt=0,
        description="How often a stream is compacted into a snapshot and trimmed.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class SyncPolicy:
    """State sync with peer instances (the ``/sync/{doc}`` endpoint and peer links)."""

    token: Text = Field(
        repr=False,
        description="The shared secret peers authenticate with, from the environment, e.g. "
                    "${SKYROUTE_SYNC_TOKEN}.")
    peers: tuple[WsUrl, ...] = Field(
        default=(),
        description="Other instances' sync URLs, e.g. wss://sync.eu.example.com/sync.")
    discovery: Discovery | None = Field(
        default=None,
        description="Find peers through DNS: dns:<headless service name>[:port] (port 8080 if not "
                    "given).")
    # Pods come and go, and a new one is peered within this long; 10 s is cheap for
    # any resolver.
    discovery_interval_s: Duration = Field(
        default=10.0, validation_alias="discovery_interval", gt=0,
        description="How often the discovery name is resolved again.")
    rotate_every_s: Duration = Field(
        default=3600.0, validation_alias="rotate_every", gt=0,
        description="How often the shared state documents start a new epoch (and shrink).")
    snapshot_path: Text | None = Field(
        default=None, validation_alias="snapshot",
        description="A file to keep the shared state in across restarts.")
    # With ping_misses this is how fast a cut shows in /health, even one that closes
    # nothing: 1 s x 3 = within 4 s. A ping is a few bytes, so every second is cheap.
    ping_interval_s: Duration = Field(
        default=1.0, validation_alias="ping_every", gt=0, le=60,
        description="How often each side of a peer link pings the other.")
    ping_misses: Count = Field(
        default=3, validation_alias="dead_after_missed_pings", le=100,
        description="A peer link silent for this many ping intervals is closed and redialled.")
    relay: SyncRelay | None = Field(
        default=None,
        description="Relay state through a Redis (streams per document, compacted snapshots) "
                    "instead of links between every pair of instances; replaces peers and "
                    "discovery.")

    @model_validator(mode="after")
    def _usable(self) -> SyncPolicy:
        if not self.token:
            raise invalid("token is required: a shared secret from the environment, e.g. "
                          "token: ${SKYROUTE_SYNC_TOKEN}")
        if self.relay is not None and (self.peers or self.discovery is not None):
            raise invalid("relay replaces peers and discovery (the engine carries every "
                          "update to every instance): remove peers/discovery, or relay")
        return self


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class ReducedLevel:
    """The ``reduced`` level: the route's first target is down, others serve."""

    # A hedge doubles the load on the targets that are left.
    hedging: Flag = Field(
        default=True,
        description="false: no hedged requests while a route is reduced or worse.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class FallbackLevel:
    """The ``fallback`` level: no target is available, the fallback model serves."""

    enabled: Flag = Field(
        default=True,
        description="false: never switch a route to its fallback_model.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class MinimalLevel:
    """The ``minimal`` level: only essential routes are served, with short answers."""

    # Half means a real outage, not one region having a bad minute.
    when_available_below: Share = Field(
        default=0.5,
        description="Enter minimal when fewer than this share of all upstreams is available "
                    "(healthy or slow); 0 turns minimal off.")
    # Short answers keep more clients served by the capacity that is left.
    max_tokens: Count = Field(
        default=256,
        description="In minimal, max_tokens / max_completion_tokens are capped to this (and "
                    "max_tokens added when a request sets neither).")
    max_n: Count = Field(
        default=1,
        description="In minimal, requests asking for more choices (n) than this are refused.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class DegradationPolicy:
    """What each degradation level switches off (the ``degradation`` section)."""

    reduced: ReducedLevel = Field(default_factory=ReducedLevel, description="The reduced level.")
    fallback: FallbackLevel = Field(
        default_factory=FallbackLevel,
        description="The fallback level.")
    minimal: MinimalLevel = Field(default_factory=MinimalLevel, description="The minimal level.")

    @property
    def reduced_hedging(self) -> bool:
        return self.reduced.hedging

    @property
    def fallback_enabled(self) -> bool:
        return self.fallback.enabled

    @property
    def minimal_below(self) -> float:
        return self.minimal.when_available_below

    @property
    def minimal_max_tokens(self) -> int:
        return self.minimal.max_tokens

    @property
    def minimal_max_n(self) -> int:
        return self.minimal.max_n
