"""Pure routing decisions: the config model, upstream choice and failover policy.

Nothing in this package does I/O or reads a clock; ``proxy/`` feeds it events
with ``now`` and carries out the decisions it returns.
"""

from ._errors import ConfigError, ConfigProblem, RoutingError, RoutingStateError
from ._health import STATES, Estimate, HealthChange, UpstreamHealth
from ._router import LEVELS, AttemptPlan, Router
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
    LatencyPolicy,
    Limits,
    Listen,
    PrometheusSource,
    RetryPolicy,
    Route,
    SessionPolicy,
    SyncPolicy,
    Upstream,
    load_config,
    parse_config,
)

__all__ = [
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
    "Estimate",
    "GiveUp",
    "HealthChange",
    "LatencyPolicy",
    "Limits",
    "Listen",
    "PrometheusSource",
    "Respond",
    "Result",
    "Retry",
    "RetryPolicy",
    "Route",
    "Router",
    "RoutingError",
    "RoutingStateError",
    "SessionPolicy",
    "SyncPolicy",
    "Target",
    "TrafficShare",
    "Upstream",
    "UpstreamHealth",
    "classify_status",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]
