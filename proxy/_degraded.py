"""Carrying out routing's degradation decisions for one request.

``routing`` decides: ``Router.serving`` says which route serves a request (the
one asked for, or its fallback), the ``max_tokens`` cap, or a refusal;
``Router.fallback_after_failure`` says whether the fallback gets one try after
every attempt over the route failed. This module applies those decisions and
keeps the books: metrics, a log line per degraded request (with its
request_id, bound by the middleware), and the response headers that say so.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from skyroute.routing import Refuse, Route, Router, Serve, capped_payload

from ._errors import DegradedRefusal, UpstreamError
from ._metrics import Metrics
from ._state import RequestSummary

log = structlog.get_logger("skyroute.degradation")

#: Set on every answer a fallback model gave, streams included.
DEGRADED_HEADER = "X-Skyroute-Degraded"
FALLBACK_MODEL_HEADER = "X-Skyroute-Fallback-Model"

#: ``serve_route`` with everything but ``route`` (and ``extra_headers``) bound.
ServeRoute = Callable[..., Awaitable[web.StreamResponse]]


def decide(router: Router, route: Route, payload: dict[str, Any] | None, metrics: Metrics, *,
           now: float) -> Serve:
    """routing's decision for a request for ``route``.

    Raises:
        DegradedRefusal: in minimal mode, for a route not marked essential or a
            request asking for more choices than ``degradation.minimal.max_n``.
    """
    n = payload.get("n") if payload else None
    decision = router.serving(route, n=n if type(n) is int else None, now=now)
    if isinstance(decision, Refuse):
        metrics.degraded_refusals.labels(route.model, decision.reason).inc()
        log.warning("request_refused", route=route.model, level="minimal",
                    reason=decision.reason)
        raise DegradedRefusal(decision.message, param=decision.param,
                              retry_after_s=decision.retry_after_s)
    return decision


def cap_max_tokens(body: bytes, payload: dict[str, Any] | None, decision: Serve,
                   metrics: Metrics) -> tuple[bytes, dict[str, Any] | None]:
    """The body with its token limit capped as ``decision`` says (minimal mode;
    ``routing.capped_payload`` says which fields and how)."""
    capped = capped_payload(payload, decision.max_tokens)
    if capped is None:
        return body, payload
    route = decision.fallback_for or decision.route.model
    metrics.max_tokens_capped.labels(route).inc()
    log.info("max_tokens_capped", route=route, level="minimal", max_tokens=decision.max_tokens)
    return json.dumps(capped).encode(), capped


async def serve_decided(serve: ServeRoute, decision: Serve, *, asked: Route, router: Router,
                        metrics: Metrics, summary: RequestSummary,
                        deadline: float) -> web.StreamResponse:
    """Serve over the route ``decision`` names; after every attempt failed, its fallback once.

    Args:
        asked: the route the client asked for.
        deadline: loop time by which the request must be answered, fallback included.

    Raises:
        UpstreamError: when no attempt, fallback included, produced an answer.
    """
    if decision.fallback_for is not None:
        try:
            return await _serve_fallback(serve, asked, decision.route, metrics, summary,
                                         why=f"route level is {decision.level}")
        except UpstreamError as exc:
            raise UpstreamError(f"No upstream of model '{asked.model}' is available, so its "
                                f"fallback model '{decision.route.model}' served the request, "
                                f"and failed: {exc.message}", status=exc.status,
                                retry_after_s=exc.retry_after_s) from exc
    try:
        return await serve(route=decision.route)
    except UpstreamError as exc:
        loop = asyncio.get_running_loop()
        fallback = router.fallback_after_failure(asked, deadline=deadline, now=loop.time())
        if fallback is None:
            raise
        try:
            return await _serve_fallback(serve, asked, fallback, metrics, summary,
                                         why="every attempt over the route failed")
        except UpstreamError as again:
            raise UpstreamError(f"{exc.message} The fallback model '{fallback.model}' failed "
                                f"too: {again.message}", status=again.status,
                                retry_after_s=again.retry_after_s) from again


async def _serve_fallback(serve: ServeRoute, asked: Route, fallback: Route, metrics: Metrics,
                          summary: RequestSummary, *, why: str) -> web.StreamResponse:
    log.warning("fallback_model_used", route=asked.model, fallback=fallback.model,
                reason=why)
    attempts = summary.attempts
    headers = {DEGRADED_HEADER: "fallback", FALLBACK_MODEL_HEADER: fallback.model}
    try:
        resp = await serve(route=fallback, extra_headers=headers)
    finally:
        # The access log and skyroute_requests_total keep the route the client asked for.
        summary.route = asked.model
        summary.attempts += attempts
    summary.fallback = fallback.model
    metrics.fallback_served.labels(asked.model, fallback.model).inc()
    return resp
