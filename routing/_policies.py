"""Policy sections of the routing file: retries, breakers, latency, sessions, sync.

Frozen dataclasses with their defaults and the reasoning behind them; each
``__post_init__`` rejects values that cannot work. ``routing.config`` reads the
YAML into them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    max_cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be a share above 0% and at most 100%")
        if self.cooldown_s > self.max_cooldown_s:
            raise ValueError("cooldown must not be above max_cooldown")


#: skyroute's own TTFB histogram, aggregated across every instance Prometheus scrapes.
DEFAULT_PROMETHEUS_QUERY = (
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
    rotate_every_s: float = 3600.0
    snapshot_path: str | None = None

    def __post_init__(self) -> None:
        for peer in self.peers:
            if not peer.startswith(("ws://", "wss://")):
                raise ValueError(f"peer {peer!r} must start with ws:// or wss://")
        if self.discovery is not None and not self.discovery.startswith("dns:"):
            raise ValueError(f"discovery {self.discovery!r} must look like dns:<service name>")
