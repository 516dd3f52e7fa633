"""The attempt loop: ask ``routing`` for a target, run the attempt, report back.

This is the only place that turns routing decisions into I/O for a client
request. It owns no policy: whether to try another upstream, and which, is
``AttemptPlan``'s answer; this module only performs it and keeps the books
(metrics, log lines, the request summary for the access log).
"""

from __future__ import annotations

import asyncio

import aiohttp
import structlog
from aiohttp import web

from routing import AttemptOutcome, AttemptPlan, GiveUp, Respond, Result, Route, Router

from ._errors import UpstreamError
from ._forward import (
    Failed,
    Opened,
    UpstreamCall,
    open_attempt,
    read_rest,
    relay_stream,
    response_headers,
    send_buffered,
)
from ._metrics import Metrics
from ._state import RequestSummary

log = structlog.get_logger("skyroute.proxy")


async def serve_route(request: web.Request, *, router: Router, route: Route, call: UpstreamCall,
                      session: aiohttp.ClientSession, metrics: Metrics, request_id: str,
                      summary: RequestSummary) -> web.StreamResponse:
    """Serve ``call`` over ``route``, failing over as the plan decides.

    Raises:
        UpstreamError: when the plan gives up (no upstream produced an answer).
    """
    loop = asyncio.get_running_loop()
    plan = router.plan(route, now=loop.time())
    summary.route = route.model
    while True:
        target = plan.next_attempt(now=loop.time())
        if isinstance(target, GiveUp):
            raise UpstreamError(target.message, status=target.status,
                                retry_after_s=target.retry_after_s)
        summary.attempts, summary.upstream = plan.attempts, target.name
        deadline = min(loop.time() + target.upstream.first_token_timeout_s, plan.deadline)
        attempt = await open_attempt(session, target, call, request_id=request_id,
                                     deadline=deadline)
        if isinstance(attempt, Opened):
            metrics.ttfb.labels(target.name, target.upstream.region).observe(attempt.ttfb_s)
            if attempt.is_sse:
                resp, cut = await relay_stream(request, attempt, request_id)
                summary.cut = cut
                _finish(router, plan, metrics, attempt, cut, loop.time())
                return resp
            body = await read_rest(attempt)
            if not isinstance(body, Failed):
                _finish(router, plan, metrics, attempt, None, loop.time())
                return await send_buffered(request, attempt, body, request_id)
            attempt = body
        outcome = attempt.outcome
        metrics.attempts.labels(target.name, outcome.result.value).inc()
        router.record(outcome, now=loop.time())
        decision = plan.record(outcome, now=loop.time())
        if isinstance(decision, Respond):  # the client's own mistake: pass it on untouched
            return web.Response(status=attempt.status or 502, body=attempt.body,
                                headers=response_headers(attempt.headers or {}, request_id,
                                                         target))
        log.warning("upstream attempt failed", upstream=target.name, region=target.upstream.region,
                    result=outcome.result.value, detail=outcome.detail, attempt=plan.attempts,
                    will_retry=not isinstance(decision, GiveUp))
        if isinstance(decision, GiveUp):
            raise UpstreamError(decision.message, status=decision.status,
                                retry_after_s=decision.retry_after_s)
        metrics.failovers.labels(route.model).inc()


def _finish(router: Router, plan: AttemptPlan, metrics: Metrics, opened: Opened,
            cut: str | None, now: float) -> None:
    """Book an attempt that produced an answer (whole, or cut after the commit)."""
    target = opened.target
    result = Result.STREAM_CUT if cut else Result.SUCCESS
    outcome = AttemptOutcome(target=target, result=result, status=opened.response.status,
                             detail=cut or "")
    metrics.attempts.labels(target.name, result.value).inc()
    if cut is None:
        metrics.latency.labels(target.name, target.upstream.region).observe(now - opened.started)
    router.record(outcome, now=now)
    plan.record(outcome, now=now)
