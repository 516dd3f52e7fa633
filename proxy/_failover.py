"""The attempt loop: ask ``routing`` for a target, run the attempt, report back.

This is the only place that turns routing decisions into I/O for a client
request. It owns no policy: whether to try another upstream, and which, is
``AttemptPlan``'s answer; this module only performs it and keeps the books
(metrics, log lines, the request summary for the access log).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from routing import (
    AttemptOutcome,
    AttemptPlan,
    Decision,
    GiveUp,
    Respond,
    Result,
    Retry,
    Route,
    Router,
    Target,
)

from ._errors import UpstreamError
from ._forward import (
    Failed,
    Opened,
    UpstreamCall,
    buffered_response,
    open_attempt,
    read_rest,
    relay_stream,
    response_headers,
)
from ._health import report_changes
from ._metrics import Metrics
from ._state import TRAFFIC, RequestSummary

log = structlog.get_logger("skyroute.proxy")


async def serve_route(request: web.Request, *, router: Router, route: Route, call: UpstreamCall,
                      session: aiohttp.ClientSession, metrics: Metrics, request_id: str,
                      summary: RequestSummary, prefer: str | None = None,
                      ) -> web.StreamResponse:
    """Serve ``call`` over ``route``, failing over as the plan decides.

    Raises:
        UpstreamError: when the plan gives up (no upstream produced an answer).
    """
    loop = asyncio.get_running_loop()
    plan = router.plan(route, now=loop.time(), prefer=prefer)
    summary.route = route.model
    while True:
        target = plan.next_attempt(now=loop.time())
        if isinstance(target, GiveUp):
            raise _give_up(target, route, metrics)
        summary.attempts, summary.upstream = plan.attempts, target.name
        try:
            answer = await _attempt(request, target, call, session, metrics, router, plan,
                                    request_id)
        except BaseException:
            router.cancel(target, now=loop.time())  # the client went away mid-attempt
            raise
        if isinstance(answer, tuple):
            resp, outcome = answer
            summary.upstream = outcome.target.name  # a hedge may have won
            summary.cut = outcome.detail or None
            _book(router, plan, metrics, outcome, loop.time())
            request.app[TRAFFIC].record_served(route.model, outcome.target.name, loop.time())
            return resp
        outcome = answer.outcome
        decision = _book(router, plan, metrics, outcome, loop.time())
        if isinstance(decision, Respond):  # the client's own mistake: pass it on untouched
            return web.Response(status=answer.status or 502, body=answer.body,
                                headers=response_headers(answer.headers or {}, request_id,
                                                         target))
        log.warning("upstream attempt failed", upstream=target.name, region=target.upstream.region,
                    result=outcome.result.value, detail=outcome.detail, attempt=plan.attempts,
                    will_retry=isinstance(decision, Retry))
        if isinstance(decision, GiveUp):
            raise _give_up(decision, route, metrics)
        metrics.failovers.labels(route.model).inc()
        if decision.delay_s > 0:
            await asyncio.sleep(decision.delay_s)


async def _attempt(request: web.Request, target: Target, call: UpstreamCall,
                   session: aiohttp.ClientSession, metrics: Metrics, router: Router,
                   plan: AttemptPlan, request_id: str,
                   ) -> tuple[web.StreamResponse, AttemptOutcome] | Failed:
    """One attempt: an answer sent to the client (with its outcome), or ``Failed``."""
    loop = asyncio.get_running_loop()
    target, opened = await _open_hedged(target, call, session, metrics, router, plan,
                                        request_id)
    if isinstance(opened, Failed):
        return opened
    metrics.ttfb.labels(target.name, target.upstream.region).observe(opened.ttfb_s)
    if opened.is_sse:
        resp, cut = await relay_stream(request, opened, request_id)
    else:
        body = await read_rest(opened)
        if isinstance(body, Failed):
            return body
        resp, cut = buffered_response(opened, body, request_id), None
    if cut is None:
        metrics.latency.labels(target.name, target.upstream.region).observe(
            loop.time() - opened.started)
    outcome = AttemptOutcome(target=target, result=Result.STREAM_CUT if cut else Result.SUCCESS,
                             status=opened.response.status, detail=cut or "",
                             ttfb_s=opened.ttfb_s)
    return resp, outcome


async def _open_hedged(target: Target, call: UpstreamCall, session: aiohttp.ClientSession,
                       metrics: Metrics, router: Router, plan: AttemptPlan, request_id: str,
                       ) -> tuple[Target, Opened | Failed]:
    """Open ``target``; if the route hedges and no first token came in time, race another.

    The first attempt to produce content wins and the other is cancelled (it has
    no outcome). A failure while the other attempt still runs is booked at once.
    """
    loop = asyncio.get_running_loop()

    def opening(t: Target) -> Coroutine[Any, Any, Opened | Failed]:
        deadline = min(loop.time() + t.upstream.first_token_timeout_s, plan.deadline)
        return open_attempt(session, t, call, request_id=request_id, deadline=deadline)

    def start(t: Target) -> asyncio.Task[Opened | Failed]:
        return asyncio.create_task(opening(t))

    delay = plan.hedge_delay(target, now=loop.time())
    if delay is None:  # no hedging: no task, no extra turn of the event loop
        return target, await opening(target)
    tasks = {start(target): target}
    hedge: Target | None = None
    try:
        done, _ = await asyncio.wait(tasks, timeout=delay)
        if not done:
            hedge = plan.hedge(now=loop.time())
            if hedge is not None:
                tasks[start(hedge)] = hedge
        while True:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                winner, result = tasks.pop(task), task.result()
                if isinstance(result, Opened) or not tasks:
                    if hedge is not None:
                        route = plan.route.model
                        metrics.hedges.labels(route, "won" if winner is hedge else "lost").inc()
                    return winner, result
                _book(router, plan, metrics, result.outcome, loop.time())
    finally:
        await _cancel_losers(tasks, router, plan, loop.time())


async def _cancel_losers(tasks: dict[asyncio.Task[Opened | Failed], Target], router: Router,
                         plan: AttemptPlan, now: float) -> None:
    for task, target in tasks.items():
        task.cancel()
        router.cancel(target, now=now)
        plan.cancel(target)
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Opened):  # finished in the same instant as the winner
            result.response.close()


def _book(router: Router, plan: AttemptPlan, metrics: Metrics, outcome: AttemptOutcome,
          now: float) -> Decision:
    """Tell routing how an attempt went; report any health change it caused."""
    metrics.attempts.labels(outcome.target.name, outcome.result.value).inc()
    report_changes([router.record(outcome, now=now)], router, metrics)
    return plan.record(outcome, now=now)


def _give_up(decision: GiveUp, route: Route, metrics: Metrics) -> UpstreamError:
    if decision.budget_exhausted:
        metrics.retry_budget_exhausted.labels(route.model).inc()
    return UpstreamError(decision.message, status=decision.status,
                         retry_after_s=decision.retry_after_s)
