"""Plain values that cross the routing boundary: targets, outcomes, decisions.

``proxy/`` builds ``AttemptOutcome`` values from what happened on the wire and
gets ``Respond`` / ``Retry`` / ``GiveUp`` back; none of them carries behaviour.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from .config import Upstream


class Result(enum.Enum):
    """How one attempt at one upstream ended."""

    SUCCESS = "success"            # an answer the client gets (2xx, or another status we pass on)
    CLIENT_ERROR = "client_error"  # 400/404/422...: the request itself is wrong; pass it on
    BAD_KEY = "bad_key"            # 401/402/403: that upstream's key or balance is bad
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 500/502/503/504
    CONNECT_ERROR = "connect_error"
    TIMEOUT = "timeout"            # no bytes for too long once the answer had started
    BUSY = "busy"                  # no first token before the deadline (keep-alives only)
    STREAM_CUT = "stream_cut"      # the answer broke off part-way
    #: skyroute's own connection limit to the upstream (max_connections) stayed full:
    #: the request never reached it, so this says nothing about its health.
    POOL_FULL = "pool_full"


#: Results after which the next target is tried.
RETRYABLE = frozenset({Result.BAD_KEY, Result.RATE_LIMITED, Result.SERVER_ERROR,
                       Result.CONNECT_ERROR, Result.TIMEOUT, Result.BUSY, Result.STREAM_CUT,
                       Result.POOL_FULL})


def classify_status(status: int) -> Result:
    """Map an upstream HTTP status to the ``Result`` it stands for."""
    if status < 400:
        return Result.SUCCESS
    if status in (401, 402, 403):
        return Result.BAD_KEY
    if status == 429:
        return Result.RATE_LIMITED
    if status >= 500:
        return Result.SERVER_ERROR
    return Result.CLIENT_ERROR


#: Bedrock's error types (``x-amzn-ErrorType``) whose status alone would mislead routing.
_BEDROCK_ERRORS: Final = {
    "ThrottlingException": Result.RATE_LIMITED,
    "ServiceQuotaExceededException": Result.RATE_LIMITED,
    "ServiceUnavailableException": Result.SERVER_ERROR,
    # The model is being loaded (on-demand import): busy, try elsewhere.
    "ModelNotReadyException": Result.SERVER_ERROR,
    "ModelTimeoutException": Result.TIMEOUT,
    "InternalServerException": Result.SERVER_ERROR,
    "ModelErrorException": Result.SERVER_ERROR,
    "AccessDeniedException": Result.BAD_KEY,
    "UnrecognizedClientException": Result.BAD_KEY,
    "ExpiredTokenException": Result.BAD_KEY,
    "InvalidSignatureException": Result.BAD_KEY,
}


def classify_provider_error(status: int, error_type: str) -> Result:
    """What an upstream's error means for routing, by its status and a cloud's error type.

    ``error_type`` is Bedrock's ``x-amzn-ErrorType`` (``ThrottlingException:...``), or
    empty. Azure's and Vertex's overload signals are plain 429s and 503s.
    """
    result = _BEDROCK_ERRORS.get(error_type.partition(":")[0])
    return result if result is not None else classify_status(status)



@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One concrete place to send one attempt."""

    upstream: Upstream
    endpoint: str  # base URL, e.g. http://10.0.0.5:8000/v1
    model: str  # the upstream's own model name for the requested alias
    #: The upstream's name: a field, read a dozen times per request, set once here.
    name: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.upstream.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptOutcome:
    target: Target
    result: Result
    detail: str = ""  # e.g. "HTTP 503", "connection refused"
    status: int | None = None
    retry_after_s: float | None = None
    ttfb_s: float | None = None  # time to first content byte (or the wait, for BUSY)


@dataclass(frozen=True, slots=True, kw_only=True)
class Respond:
    """Give the client the answer of the last attempt."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """Wait ``delay_s`` (backoff), then try ``next_attempt()`` again.

    ``paid``: the retry goes back to upstreams already failing and was paid from the
    route's retry budget; otherwise it is failover to an untried healthy upstream.
    """

    reason: str
    delay_s: float = 0.0
    paid: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class GiveUp:
    """No attempt left: answer the client with ``status`` and this message."""

    status: int
    message: str
    retry_after_s: float | None = None
    budget_exhausted: bool = False


Decision = Respond | Retry | GiveUp
