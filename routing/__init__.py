"""Pure routing decisions: the config model, upstream choice and failover policy.

Nothing in this package does I/O or reads a clock; ``proxy/`` feeds it events
with ``now`` and carries out the decisions it returns.
"""

from ._affinity import Pin, Touch, affinity_after
from ._approximate import ApproximateIndex, ApproximateQuery, approximate_query
from ._backoff import Jitter, Sleep, backoff_delays
from ._cache import (
    CACHE_PATHS,
    CacheDirectives,
    CacheLookup,
    Freshness,
    NotCacheable,
    cache_directives,
    cache_lookup,
    freshness,
    is_storable,
)
from ._degradation import (
    LEVELS,
    Level,
    LevelChange,
    MinimalTrigger,
    Refuse,
    Serve,
    capped_payload,
)
from ._errors import ConfigError, ConfigProblem, RoutingError, RoutingStateError
from ._gossip import GOSSIPED, Adopt, Finding, Publish, Withdraw, gossip_decisions
from ._health import STATES, Estimate, HealthChange, UpstreamHealth, UpstreamState
from ._limits import RATE_WINDOW_S, Admit, Limit, LimitStatus, RateLimited, UsageSlice, check_rate
from ._plan import AttemptPlan
from ._policies import CacheMode, CachePolicy, CacheScope, Strategy
from ._pool import (
    DEFAULT_METRIC_NAMES,
    EndpointPicker,
    EndpointView,
    PoolMetricNames,
    ServerLoad,
    parse_server_load,
)
from ._pool_set import EndpointChange
from ._router import Router
from ._router_types import (
    RETRYABLE,
    AttemptOutcome,
    Decision,
    GiveUp,
    Respond,
    Result,
    Retry,
    Target,
    classify_status,
)
from ._share import DEFAULT_SHARE_WINDOW_S, TrafficShare
from ._streams import is_resumable, streamed_tokens
from ._values import parse_duration, parse_size
from ._yaml import MAX_TEXT_BYTES as MAX_CONFIG_BYTES
from .config import (
    ApiKey,
    BreakerPolicy,
    Config,
    DegradationPolicy,
    LatencyPolicy,
    Limits,
    Listen,
    ObjectPolicy,
    PoolScrape,
    PrometheusSource,
    RetryPolicy,
    Route,
    SessionPolicy,
    SyncPolicy,
    Upstream,
    parse_config,
)

__all__ = [
    "CACHE_PATHS",
    "DEFAULT_METRIC_NAMES",
    "DEFAULT_SHARE_WINDOW_S",
    "GOSSIPED",
    "LEVELS",
    "MAX_CONFIG_BYTES",
    "RATE_WINDOW_S",
    "RETRYABLE",
    "STATES",
    "Admit",
    "Adopt",
    "ApiKey",
    "ApproximateIndex",
    "ApproximateQuery",
    "AttemptOutcome",
    "AttemptPlan",
    "BreakerPolicy",
    "CacheDirectives",
    "CacheLookup",
    "CacheMode",
    "CachePolicy",
    "CacheScope",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "Decision",
    "DegradationPolicy",
    "EndpointChange",
    "EndpointPicker",
    "EndpointView",
    "Estimate",
    "Finding",
    "Freshness",
    "GiveUp",
    "HealthChange",
    "Jitter",
    "LatencyPolicy",
    "Level",
    "LevelChange",
    "Limit",
    "LimitStatus",
    "Limits",
    "Listen",
    "MinimalTrigger",
    "NotCacheable",
    "ObjectPolicy",
    "Pin",
    "PoolMetricNames",
    "PoolScrape",
    "PrometheusSource",
    "Publish",
    "RateLimited",
    "Refuse",
    "Respond",
    "Result",
    "Retry",
    "RetryPolicy",
    "Route",
    "Router",
    "RoutingError",
    "RoutingStateError",
    "Serve",
    "ServerLoad",
    "SessionPolicy",
    "Sleep",
    "Strategy",
    "SyncPolicy",
    "Target",
    "Touch",
    "TrafficShare",
    "Upstream",
    "UpstreamHealth",
    "UpstreamState",
    "UsageSlice",
    "Withdraw",
    "affinity_after",
    "approximate_query",
    "backoff_delays",
    "cache_directives",
    "cache_lookup",
    "capped_payload",
    "check_rate",
    "classify_status",
    "freshness",
    "gossip_decisions",
    "is_resumable",
    "is_storable",
    "parse_config",
    "parse_duration",
    "parse_server_load",
    "parse_size",
    "streamed_tokens",
]
