"""Pure routing decisions: the config model, upstream choice and failover policy.

Nothing in this package does I/O or reads a clock; ``proxy/`` feeds it events
with ``now`` and carries out the decisions it returns.
"""

from ._errors import ConfigError, ConfigProblem, RoutingError, RoutingStateError
from ._router import (
    RETRYABLE,
    AttemptOutcome,
    AttemptPlan,
    Decision,
    GiveUp,
    Respond,
    Result,
    Retry,
    Router,
    Target,
    classify_status,
)
from ._yaml import parse_duration, parse_size
from .config import ApiKey, Config, Limits, Listen, Route, Upstream, load_config, parse_config

__all__ = [
    "RETRYABLE",
    "ApiKey",
    "AttemptOutcome",
    "AttemptPlan",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "Decision",
    "GiveUp",
    "Limits",
    "Listen",
    "Respond",
    "Result",
    "Retry",
    "Route",
    "Router",
    "RoutingError",
    "RoutingStateError",
    "Target",
    "Upstream",
    "classify_status",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]
