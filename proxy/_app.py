"""The aiohttp application: typed app keys, the one error middleware, lifecycles.

``build_app(config)`` returns an application serving the OpenAI API under ``/v1``
plus ``/metrics``, ``/health``, ``/livez`` and ``/readyz``. Long-lived resources
(the shared upstream ``ClientSession``, the config watcher) live in
``cleanup_ctx`` generators. Exceptions become OpenAI-shaped responses in exactly
one place, ``error_middleware``, which also writes the one access-log line per
request.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from skyroute.routing import Config, Router, Sleep, TrafficShare

from ._admin import add_admin_routes
from ._cache import install_cache
from ._client_guard import send_and_close
from ._compress import compress_answer, install_compression
from ._connections import KEEPALIVE_S, UpstreamSessions
from ._errors import ClientRequestError, InternalError, NotFound, ProxyError, http_error
from ._handlers import add_api_routes
from ._health import handle_health, health_ticker
from ._jobs import install_jobs
from ._limit_shares import LIMIT_SHARES, SharedLimits, limit_share_loop
from ._metrics import Metrics
from ._paths import check_target
from ._pool_scrape import pool_scraper
from ._prometheus import prometheus_source
from ._redact import config_secrets, register_secrets
from ._reload import config_watcher
from ._sessions import close_sync_on_shutdown, state_sync_for, state_sync_lifecycle
from ._slots import ClientConcurrency, UpstreamSlots
from ._state import (
    CLIENT_CONCURRENCY,
    CLOCK,
    METRICS,
    REQUEST_ID,
    SERVING,
    SESSION,
    SLEEP,
    STATE_SYNC,
    SUMMARY,
    TRAFFIC,
    UPSTREAM_SESSIONS,
    UPSTREAM_SLOTS,
    Clock,
    RequestSummary,
    Runtime,
    Serving,
)
from ._workers import WorkerSpec

log = structlog.get_logger("skyroute.proxy")

#: Connections kept open to each pool server for scrapes and health checks (requests
#: go through each upstream's own pool, sized by its max_connections).
POOL_LIMIT_PER_HOST = 256


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id_of(request: web.Request) -> str:
    """The request's id: the client's ``X-Request-ID`` if sane, else a new one."""
    given = request.headers.get("X-Request-ID", "")
    if 0 < len(given) <= 128 and given.isprintable() and " " not in given:
        return given
    return os.urandom(16).hex()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into an OpenAI-shaped response and log one line."""
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    summary = request[SUMMARY] = RequestSummary()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    is_api = request.path.startswith("/v1/")
    metrics = request.app[METRICS]
    started = time.perf_counter()
    if is_api:
        metrics.request_started()
    status = 500
    try:
        check_target(request.raw_path)
        resp = await handler(request)
        status = resp.status
    except ProxyError as exc:
        status = exc.status
        resp = exc.to_response(request_id)
        if exc.close_connection:  # the rest of the request will not come: do not wait for it
            await send_and_close(request, resp)
        if isinstance(exc, ClientRequestError):  # not an upstream 429: that one was routed
            metrics.client_errors.labels(exc.code or "invalid_request").inc()
    except web.HTTPException as exc:  # aiohttp's own (no such path, wrong method)
        status = exc.status
        if exc.status == 404:
            error: ProxyError = NotFound(f"{request.method} {request.path} is not served by "
                                         "skyroute; the OpenAI API is under /v1")
        elif exc.status == 405:
            error = http_error(405, f"{request.method} is not allowed on {request.path}; use "
                                    f"{exc.headers.get('Allow', 'another method')}")
        else:
            error = http_error(exc.status, exc.reason if exc.status < 500 else
                               "skyroute could not answer this request")
        resp = error.to_response(request_id)
        for name, value in exc.headers.items():  # e.g. Allow on a 405
            if name.lower() not in ("content-type", "content-length"):
                resp.headers.add(name, value)
    except ConnectionResetError:
        # Writing to a client that went away (upstream errors never get here): not
        # a server error, and nothing more can be sent.
        status = 499
        resp = web.Response(status=499)
    except asyncio.CancelledError:
        status = 499  # the client went away; nginx's code for it
        raise
    except Exception:  # a bug: still an OpenAI-shaped answer, and the traceback logged
        log.exception("request_crashed", path=request.path)
        status = 500
        if request.writer.output_size > 0:
            raise  # part of an answer is out: aiohttp closes the connection
        resp = InternalError(f"skyroute failed to serve this request; its log has the "
                             f"details under request id {request_id}").to_response(request_id)
    finally:
        if is_api:
            metrics.request_finished()
            metrics.requests.labels(summary.route, summary.upstream, str(status)).inc()
            log.info("request_finished", method=request.method, path=request.path, status=status,
                     route=summary.route, upstream=summary.upstream, attempts=summary.attempts,
                     latency_ms=round((time.perf_counter() - started) * 1000, 2),
                     **summary.set_fields())
    if not resp.prepared:
        resp.headers["X-Request-ID"] = request_id
    return resp


async def _prepare_answer(request: web.Request, resp: web.StreamResponse) -> None:
    """The one ``on_response_prepare`` hook: each step is a plain call, not a coroutine
    of its own per answer.

    Every answer to a client with rpm/tpm limits carries OpenAI's x-ratelimit-* headers;
    the cache says what it did (``x-skyroute-cache``); whole ``/v1`` answers are
    compressed for clients that accept it (last: it sees the final headers).
    """
    summary = request.get(SUMMARY)  # None for aiohttp's answer to a request it could not parse
    if summary is not None:
        if summary.rate_limit_headers:
            resp.headers.update(summary.rate_limit_headers)
        if summary.cache_headers:
            resp.headers.update(summary.cache_headers)
    compress_answer(request, resp)


async def _metrics(request: web.Request) -> web.Response:
    return request.app[METRICS].render()


async def _livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def _readyz(request: web.Request) -> web.Response:
    serving = request.app[SERVING]
    if serving.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """The shared session (pool scrapes) and the per-upstream pools requests go through."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=POOL_LIMIT_PER_HOST,
                                     keepalive_timeout=KEEPALIVE_S, enable_cleanup_closed=True)
    # auto_decompress off: bodies are relayed byte for byte (we ask for identity anyway).
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     skip_auto_headers=("User-Agent",)) as session:
        app[SESSION] = session
        app[UPSTREAM_SESSIONS] = UpstreamSessions(app[METRICS].registry)
        stop_reporting = app[METRICS].watch_upstream_connections(
            lambda: app[UPSTREAM_SESSIONS].connections(app[SERVING].runtime.config.upstreams))
        # Cloud identities are fetched now, so the first request finds a token ready.
        app[UPSTREAM_SESSIONS].clouds.start(app[SERVING].runtime.config.upstreams)
        try:
            yield
        finally:
            stop_reporting()
            await app[UPSTREAM_SESSIONS].aclose()


def build_app(config: Config, *, config_path: str | Path | None = None,
              watch_interval_s: float = 0.5, sleep: Sleep = asyncio.sleep,
              worker: WorkerSpec | None = None, clock: Clock = time.monotonic,
              ) -> web.Application:
    """The skyroute application for ``config``.

    Args:
        config_path: the routing file to watch and reload (and reload on SIGHUP,
            when run by ``proxy.serve``); None serves ``config`` unchanged.
        watch_interval_s: how often the file is checked for changes.
        sleep: what backoff delays are waited out through (between a request's
            attempts, and between a sync link's attempts to reach a peer).
        worker: set in a ``--workers`` worker process: its sibling workers are sync peers.
        clock: the time routing decisions and latency samples are taken at; a test
            passes a fake clock to drive time itself. Timeouts stay real durations.
    """
    register_secrets(config_secrets(config))
    app = web.Application(middlewares=[error_middleware])
    app.on_response_prepare.append(_prepare_answer)
    app[CLOCK] = clock
    app[SERVING] = Serving(runtime=Runtime(config=config, router=Router(config)),
                           config_path=Path(config_path) if config_path else None)
    app[METRICS] = Metrics(instance=config.instance_id)
    app[TRAFFIC] = TrafficShare()
    app[UPSTREAM_SLOTS] = UpstreamSlots()
    app[CLIENT_CONCURRENCY] = ClientConcurrency()
    app[SLEEP] = sleep
    app[STATE_SYNC] = state_sync_for(config, app[METRICS].registry, sleep=sleep, worker=worker)
    if config.sync is not None or worker is not None:
        app[STATE_SYNC].add_routes(app)
    app.cleanup_ctx.append(state_sync_lifecycle(STATE_SYNC))
    app[LIMIT_SHARES] = SharedLimits(app[STATE_SYNC].store)
    app.cleanup_ctx.append(limit_share_loop)
    app.on_shutdown.append(close_sync_on_shutdown(STATE_SYNC))
    app.cleanup_ctx.append(_client_session)
    install_cache(app)
    install_compression(app)
    app.cleanup_ctx.append(health_ticker)
    app.cleanup_ctx.append(prometheus_source)
    app.cleanup_ctx.append(pool_scraper)  # after _client_session: it scrapes through it
    if config_path is not None:
        app.cleanup_ctx.append(config_watcher(watch_interval_s))
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/api/health", handle_health)
    app.router.add_get("/livez", _livez)
    app.router.add_get("/readyz", _readyz)
    install_jobs(app, config, worker)  # its routes before the catch-all of add_api_routes
    add_api_routes(app)
    add_admin_routes(app)
    if config.api_keys is None:
        log.warning("auth_disabled", source=config.source,
                    hint="add auth.api_keys to the routing file to require a client key")
    return app
