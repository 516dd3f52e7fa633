"""What one running instance holds: the config being served and typed app keys."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from skyroute.routing import Config, Router, Sleep, TrafficShare
from skyroute.statesync import StateSync

from ._client_keys import ClientKeys
from ._connections import UpstreamSessions
from ._metrics import Metrics
from ._redact import config_secrets, register_secrets
from ._slots import ClientConcurrency, UpstreamSlots

#: Seconds on a monotonic scale: the time every routing decision and latency sample is
#: taken at. ``time.monotonic`` in service; a test passes its own clock to drive time.
Clock = Callable[[], float]


@dataclass(slots=True)
class Runtime:
    """The configuration being served and the router built from it.

    A request takes the current ``Runtime`` once, at its start, and uses it to the
    end: a reload swaps in a new one without touching requests in flight.
    """

    config: Config
    router: Router
    loaded_at: float = field(default_factory=time.time)
    #: The client keys by digest (None: auth is off), built once per config.
    client_keys: ClientKeys | None = field(init=False)

    def __post_init__(self) -> None:
        keys = self.config.api_keys
        self.client_keys = ClientKeys(keys) if keys is not None else None


@dataclass(slots=True)
class Serving:
    """Mutable holder of the current ``Runtime``, plus instance-wide state."""

    runtime: Runtime
    config_path: Path | None = None
    draining: bool = False
    #: Where this instance listens (``http://127.0.0.1:8080``), once it does: the job
    #: runner sends each job to it, through the same path as a client's request.
    url: str | None = None

    def swap(self, config: Config) -> None:
        """Serve ``config``; requests in flight keep the ``Runtime`` they started with.

        The router is shared, so upstream health survives the reload.
        """
        register_secrets(config_secrets(config))
        self.runtime.router.update(config)
        self.runtime = Runtime(config=config, router=self.runtime.router)


@dataclass(slots=True)
class RequestSummary:
    """What the access log line says about a request's upstream side, and the headers
    its answer gets when it is prepared (``proxy._app``'s one hook)."""

    route: str = "-"
    upstream: str = "-"
    attempts: int = 0
    cut: str | None = None
    stream_tokens: int | None = None  # tokens a streamed answer used (read when counted)
    fallback: str | None = None  # the fallback model that answered instead of ``route``
    endpoint: str | None = None  # the pool server that answered, for a pool upstream
    upstream_request_id: str | None = None  # the upstream's x-request-id, for support tickets
    stream_head: bytes | None = None  # a stream's first bytes (a Responses stream's id)
    #: OpenAI's x-ratelimit-* headers for the client key's own limits, on every answer.
    rate_limit_headers: dict[str, str] | None = None
    #: What the response cache did (``x-skyroute-cache``, maybe ``Age``).
    cache_headers: dict[str, str] | None = None

    def set_fields(self) -> dict[str, str]:
        """The access log's optional fields that are set (one dict, built once)."""
        fields = {}
        if self.cut:
            fields["cut"] = self.cut
        if self.fallback:
            fields["fallback"] = self.fallback
        if self.endpoint:
            fields["endpoint"] = self.endpoint
        if self.upstream_request_id:
            fields["upstream_request_id"] = self.upstream_request_id
        return fields


SERVING = web.AppKey("serving", Serving)
METRICS = web.AppKey("metrics", Metrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)
#: The connection pools requests are forwarded through, one per upstream.
UPSTREAM_SESSIONS = web.AppKey("upstream_sessions", UpstreamSessions)
STATE_SYNC = web.AppKey("state_sync", StateSync)
TRAFFIC = web.AppKey("traffic_share", TrafficShare)
UPSTREAM_SLOTS = web.AppKey("upstream_slots", UpstreamSlots)
CLIENT_CONCURRENCY = web.AppKey("client_concurrency", ClientConcurrency)
#: What the attempt loop waits out a backoff delay through (``asyncio.sleep``).
SLEEP: web.AppKey[Sleep] = web.AppKey("sleep")
#: What routing reads the time from (``time.monotonic``).
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
REQUEST_ID = web.RequestKey("request_id", str)
SUMMARY = web.RequestKey("summary", RequestSummary)
#: Where a streamed answer's relayed bytes are also appended, for the response cache.
STREAM_TAP = web.RequestKey("stream_tap", list)
