"""Sessions and client limits, kept in ``statesync`` and shared by every instance.

The proxy side of state sync: it maps the routing file onto ``SyncSettings``,
runs ``StateSync`` for the app's lifetime, finds a request's session id, applies
``rpm``/``tpm`` limits across all instances, and gossips upstream health. Every
instance has a store: without a ``sync`` section it is simply not shared.
Times here are wall-clock (``time.time()``), the only clock instances share.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from skyroute.routing import ApiKey, Config, SessionPolicy
from skyroute.statesync import SessionStore, StateSync, SyncSettings

from ._errors import RateLimited

#: Usage is counted in buckets of this many seconds over the last minute; a client
#: over its limit may retry once the oldest bucket has left the window.
USAGE_BUCKET_S = 10
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')


def state_sync_for(config: Config, registry: CollectorRegistry) -> StateSync:
    """The ``StateSync`` for ``config`` (shared if it has a ``sync`` section)."""
    sync = config.sync
    settings = SyncSettings(
        instance_id=config.instance_id, token=sync.token if sync else None,
        peers=tuple(sync.peers) if sync else (), discovery=sync.discovery if sync else None,
        discovery_interval_s=sync.discovery_interval_s if sync else 10.0,
        session_ttl_s=config.sessions.ttl_s,
        rotate_every_s=sync.rotate_every_s if sync else 3600.0,
        snapshot_path=sync.snapshot_path if sync else None)
    return StateSync(settings, registry=registry)


def state_sync_lifecycle(key: web.AppKey[StateSync]) -> Any:
    """A cleanup context that starts the app's ``StateSync`` and closes it at shutdown."""

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await app[key].start()
        yield
        await app[key].aclose()

    return lifecycle


def close_sync_on_shutdown(key: web.AppKey[StateSync]) -> Any:
    """An ``on_shutdown`` hook: close sync links and sockets before the drain waits.

    Sync WebSockets live as long as the peer; left open, they would hold the
    graceful shutdown for its whole grace period.
    """

    async def close(app: web.Application) -> None:
        await app[key].aclose()

    return close


def session_id_of(request: web.Request, payload: dict[str, Any] | None,
                  policy: SessionPolicy) -> str | None:
    """The session id: the configured header, else the body's OpenAI ``user`` field."""
    given = request.headers.get(policy.header)
    if not given and payload is not None and isinstance(payload.get("user"), str):
        given = payload["user"]
    return given[:200] if given else None


def enforce_limits(store: SessionStore, client: ApiKey, *, now: float) -> None:
    """Count one request for ``client``, or refuse it if over its rpm/tpm across instances.

    Raises:
        RateLimited: with ``Retry-After`` and which limit was hit.
    """
    if client.rpm is None and client.tpm is None:
        return
    usage = store.usage(client.name, now=now)
    retry_after = USAGE_BUCKET_S - (now % USAGE_BUCKET_S) + 0.001
    if client.rpm is not None and usage.requests >= client.rpm:
        raise RateLimited(
            f"rate limit for key '{client.name}': {client.rpm} requests per minute across all "
            f"skyroute instances; retry after {retry_after:.0f}s", retry_after_s=retry_after)
    if client.tpm is not None and usage.tokens >= client.tpm:
        raise RateLimited(
            f"token limit for key '{client.name}': {client.tpm} tokens per minute across all "
            f"skyroute instances; retry after {retry_after:.0f}s", retry_after_s=retry_after)
    store.add_usage(client.name, requests=1, now=now)


def ratelimit_headers(store: SessionStore, client: ApiKey, *, now: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for a client key's own limits (this request counted).

    SDKs and client libraries read these to pace themselves; they describe the
    client's key at skyroute, never skyroute's keys at the providers.
    """
    if client.rpm is None and client.tpm is None:
        return {}
    usage = store.usage(client.name, now=now)
    reset = _duration(USAGE_BUCKET_S - (now % USAGE_BUCKET_S))
    headers = {}
    if client.rpm is not None:
        headers.update({"x-ratelimit-limit-requests": str(client.rpm),
                        "x-ratelimit-remaining-requests": str(max(0, client.rpm
                                                                  - usage.requests - 1)),
                        "x-ratelimit-reset-requests": reset})
    if client.tpm is not None:
        headers.update({"x-ratelimit-limit-tokens": str(client.tpm),
                        "x-ratelimit-remaining-tokens": str(max(0, client.tpm - usage.tokens)),
                        "x-ratelimit-reset-tokens": reset})
    return headers


def _duration(seconds: float) -> str:
    """A duration as OpenAI writes it in rate-limit headers: ``6m0s``, ``1s``, ``20ms``."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def count_tokens(store: SessionStore, client: ApiKey, body: bytes | None, *,
                 streamed: int | None = None) -> None:
    """Add an answer's tokens to the client's usage.

    Args:
        body: a whole (non-streamed) answer; its ``usage.total_tokens`` counts.
        streamed: the tokens a streamed answer used (see ``serve_route``).
    """
    tokens = streamed
    if tokens is None and body:
        match = _TOTAL_TOKENS.search(body)
        tokens = int(match.group(1)) if match else None
    if tokens:
        store.add_usage(client.name, tokens=tokens, now=time.time())


def remember_session(store: SessionStore, session_id: str, served_by: str,
                     pinned: str | None) -> None:
    """Pin the session to the upstream that answered (re-pin if it moved), or touch it."""
    now = time.time()
    if served_by != pinned:
        store.pin(session_id, served_by, now=now)
    else:
        store.touch(session_id, now=now)
