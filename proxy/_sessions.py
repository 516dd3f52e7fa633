"""Sessions and client limits, kept in ``statesync`` and shared by every instance.

The proxy side of state sync: it maps the routing file onto ``SyncSettings``,
runs ``StateSync`` for the app's lifetime, finds a request's session id, and
carries out ``routing``'s decisions about the store: ``rpm``/``tpm`` limits across
all instances (``check_rate``) and session pins (``affinity_after``). Every
instance has a store: without a ``sync`` section it is simply not shared.
Times here are wall-clock (``time.time()``), the only clock instances share.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from skyroute.routing import (
    RATE_WINDOW_S,
    Admit,
    ApiKey,
    Config,
    Pin,
    RateLimited,
    SessionPolicy,
    Sleep,
    Touch,
    check_rate,
    check_share,
)
from skyroute.statesync import SessionStore, StateSync, SyncSettings

from ._errors import RateLimitExceeded
from ._limit_shares import SharedLimits
from ._metrics import Metrics
from ._workers import WorkerSpec

log = structlog.get_logger("skyroute.limits")

_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')


def state_sync_for(config: Config, registry: CollectorRegistry, *,
                   sleep: Sleep = asyncio.sleep, worker: WorkerSpec | None = None) -> StateSync:
    """The ``StateSync`` for ``config`` (shared if it has a ``sync`` section).

    A ``--workers`` worker is also a peer of its sibling workers (``worker``), with the
    supervisor's token (the file's ``sync.token``, or a generated one).
    """
    sync = config.sync
    token = worker.token if worker else sync.token if sync else None
    relay = sync.relay if sync else None
    # With a relay every worker joins the engine itself: no links between workers.
    peers = (*(sync.peers if sync else ()), *(worker.peers if worker and not relay else ()))
    settings = SyncSettings(
        instance_id=worker.sync_instance_id(config.instance_id) if worker
        else config.instance_id, token=token,
        peers=peers, discovery=sync.discovery if sync else None,
        discovery_interval_s=sync.discovery_interval_s if sync else 10.0,
        session_ttl_s=config.sessions.ttl_s,
        rotate_every_s=sync.rotate_every_s if sync else 3600.0,
        snapshot_path=sync.snapshot_path if sync else None, usage_window_s=RATE_WINDOW_S,
        ping_interval_s=sync.ping_interval_s if sync else 1.0,
        ping_misses=sync.ping_misses if sync else 3,
        relay_url=relay.url if relay else None,
        relay_prefix=relay.prefix if relay else "skyroute:sync:",
        relay_compact_every_s=relay.compact_every_s if relay else 30.0)
    return StateSync(settings, registry=registry, sleep=sleep)


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


def enforce_limits(store: SessionStore, client: ApiKey, metrics: Metrics, *,
                   now: float, shares: SharedLimits | None = None) -> dict[str, str]:
    """Count one request for ``client``, or refuse it if over its rpm/tpm across instances
    (``routing.check_rate`` decides, from the store's counts), or over this instance's
    share of its rpm (``routing.check_share``, with ``shares``' budget).

    Returns:
        OpenAI's ``x-ratelimit-*`` headers for the key's own limits, this request
        counted (SDKs pace themselves by them); empty for a key without limits.

    Raises:
        RateLimitExceeded: with ``Retry-After`` and which limit was hit.
    """
    if client.rpm is None and client.tpm is None:
        return {}
    usage = store.usage_buckets(client.name, now=now)
    decision: Admit | RateLimited = check_rate(key=client.name, rpm=client.rpm, tpm=client.tpm,
                                               usage=usage, now=now)
    budget = None
    if shares is not None and client.rpm is not None:
        shares.arrived(client.name, now)  # demand counts refused requests too
        budget = shares.budget(client.name, client.rpm)
        if isinstance(decision, Admit):
            decision = check_share(key=client.name, rpm=client.rpm, budget=budget, usage=usage,
                                   own=store.own_usage_buckets(client.name, now=now), now=now,
                                   unused_elsewhere=shares.unused_elsewhere(client.name)
                                   ) or decision
    if isinstance(decision, RateLimited):
        metrics.rate_limited.labels(client.name, decision.limit).inc()
        log.info("request_rate_limited", key=client.name, limit=decision.limit,
                 allowed=decision.allowed, used=decision.used, share=budget,
                 retry_after_s=decision.retry_after_s)
        raise RateLimitExceeded(decision.message, retry_after_s=decision.retry_after_s, headers={
            f"x-ratelimit-limit-{decision.limit}": str(decision.allowed),
            f"x-ratelimit-remaining-{decision.limit}": str(decision.remaining),
            f"x-ratelimit-reset-{decision.limit}": f"{decision.retry_after_s}s"})
    store.add_usage(client.name, requests=1, now=now)
    headers = {}
    for status in decision.status:
        headers[f"x-ratelimit-limit-{status.limit}"] = str(status.allowed)
        headers[f"x-ratelimit-remaining-{status.limit}"] = str(status.remaining)
        headers[f"x-ratelimit-reset-{status.limit}"] = _duration(status.reset_s)
    return headers


def _duration(seconds: float) -> str:
    """A duration as OpenAI writes it in rate-limit headers: ``6m0s``, ``1s``, ``20ms``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
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


def remember_session(store: SessionStore, session_id: str, update: Pin | Touch | None) -> None:
    """Carry out ``routing.affinity_after``'s decision for the session.

    A pin passes the pin its request saw as ``moved_from``: one made without having
    seen a pin does not replace an earlier pin made at another instance (statesync's
    pin rule), so the session stays where it was first answered.
    """
    if isinstance(update, Pin):
        store.pin(session_id, update.upstream, now=time.time(), moved_from=update.moved_from)
    elif isinstance(update, Touch):
        store.touch(session_id, now=time.time())
