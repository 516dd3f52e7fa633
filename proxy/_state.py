"""What one running instance holds: the config being served and typed app keys."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from skyroute.routing import Config, Router, Sleep, TrafficShare
from skyroute.statesync import StateSync

from ._connections import UpstreamSessions
from ._metrics import Metrics


@dataclass(slots=True)
class Runtime:
    """The configuration being served and the router built from it.

    A request takes the current ``Runtime`` once, at its start, and uses it to the
    end: a reload swaps in a new one without touching requests in flight.
    """

    config: Config
    router: Router
    loaded_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class Serving:
    """Mutable holder of the current ``Runtime``, plus instance-wide state."""

    runtime: Runtime
    config_path: Path | None = None
    draining: bool = False

    def swap(self, config: Config) -> None:
        """Serve ``config``; requests in flight keep the ``Runtime`` they started with.

        The router is shared, so upstream health survives the reload.
        """
        self.runtime.router.update(config)
        self.runtime = Runtime(config=config, router=self.runtime.router)


@dataclass(slots=True)
class RequestSummary:
    """What the access log line says about a request's upstream side."""

    route: str = "-"
    upstream: str = "-"
    attempts: int = 0
    cut: str | None = None
    stream_tokens: int | None = None  # tokens a streamed answer used (read when counted)
    fallback: str | None = None  # the fallback model that answered instead of ``route``
    endpoint: str | None = None  # the pool server that answered, for a pool upstream
    upstream_request_id: str | None = None  # the upstream's x-request-id, for support tickets
    stream_head: bytes | None = None  # a stream's first bytes (a Responses stream's id)


SERVING = web.AppKey("serving", Serving)
METRICS = web.AppKey("metrics", Metrics)
SESSION = web.AppKey("session", aiohttp.ClientSession)
#: The connection pools requests are forwarded through, one per upstream.
UPSTREAM_SESSIONS = web.AppKey("upstream_sessions", UpstreamSessions)
STATE_SYNC = web.AppKey("state_sync", StateSync)
TRAFFIC = web.AppKey("traffic_share", TrafficShare)
#: What the attempt loop waits out a backoff delay through (``asyncio.sleep``).
SLEEP: web.AppKey[Sleep] = web.AppKey("sleep")
REQUEST_ID = web.RequestKey("request_id", str)
SUMMARY = web.RequestKey("summary", RequestSummary)
#: Where a streamed answer's relayed bytes are also appended, for the response cache.
STREAM_TAP = web.RequestKey("stream_tap", list)
#: OpenAI's x-ratelimit-* headers for the client key's own limits, on every answer.
RATE_LIMIT_HEADERS = web.RequestKey("rate_limit_headers", dict)
