"""Pure routing decisions: the config model, upstream choice and failover policy.

Nothing in this package does I/O or reads a clock; ``proxy/`` feeds it events
with ``now`` and carries out the decisions it returns.
"""

from ._degradation import Level, LevelChange, MinimalTrigger, Refuse, Serve
from ._errors import ConfigError, ConfigProblem, RoutingError, RoutingStateError
from ._health import STATES, Estimate, HealthChange, UpstreamHealth, UpstreamState
from ._plan import AttemptPlan
from ._pool import (
    DEFAULT_METRIC_NAMES,
    EndpointPicker,
    EndpointView,
    PoolMetricNames,
    ServerLoad,
    parse_server_load,
)
from ._pool_set import EndpointChange
from ._router import LEVELS, Router
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
from ._yaml import parse_duration, parse_size
from .config import (
    ApiKey,
    BreakerPolicy,
    Config,
    DegradationPolicy,
    LatencyPolicy,
    Limits,
    Listen,
    PoolScrape,
    PrometheusSource,
    RetryPolicy,
    Route,
    SessionPolicy,
    Strategy,
    SyncPolicy,
    Upstream,
    load_config,
    parse_config,
)

__all__ = [
    "DEFAULT_METRIC_NAMES",
    "DEFAULT_SHARE_WINDOW_S",
    "LEVELS",
    "RETRYABLE",
    "STATES",
    "ApiKey",
    "AttemptOutcome",
    "AttemptPlan",
    "BreakerPolicy",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "Decision",
    "DegradationPolicy",
    "EndpointChange",
    "EndpointPicker",
    "EndpointView",
    "Estimate",
    "GiveUp",
    "HealthChange",
    "LatencyPolicy",
    "Level",
    "LevelChange",
    "Limits",
    "Listen",
    "MinimalTrigger",
    "PoolMetricNames",
    "PoolScrape",
    "PrometheusSource",
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
    "Strategy",
    "SyncPolicy",
    "Target",
    "TrafficShare",
    "Upstream",
    "UpstreamHealth",
    "UpstreamState",
    "classify_status",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_server_load",
    "parse_size",
]
