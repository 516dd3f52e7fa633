"""The attempt loop: ask ``routing`` for a target, run the attempt, report back.

This is the only place that turns routing decisions into I/O for a client
request. It owns no policy: whether to try another upstream, and which, is
``AttemptPlan``'s answer; this module only performs it and keeps the books
(metrics, log lines, the request summary for the access log).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from skyroute.routing import (
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
    is_resumable,
    streamed_tokens,
)

from ._connections import UpstreamSessions
from ._errors import UpstreamError
from ._forward import (
    Failed,
    Opened,
    UpstreamCall,
    buffered_response,
    end_stream,
    open_attempt,
    read_rest,
    relay_stream,
    stream_response,
)
from ._headers import response_headers
from ._health import report_changes
from ._metrics import Metrics
from ._slots import UpstreamSlots
from ._sse import StreamTranscript
from ._state import CLOCK, SLEEP, SUMMARY, TRAFFIC, UPSTREAM_SLOTS, Clock, RequestSummary

log = structlog.get_logger("skyroute.proxy")


@dataclass(slots=True, kw_only=True)
class _Interrupted:
    """A stream cut after the client got part of it, which the route may resume."""

    request: web.Request
    resp: web.StreamResponse
    transcript: StreamTranscript
    opened: Opened  # the attempt that was cut
    outcome: AttemptOutcome


async def serve_route(request: web.Request, *, router: Router, route: Route, call: UpstreamCall,
                      session: UpstreamSessions, metrics: Metrics, request_id: str,
                      summary: RequestSummary, prefer: str | None = None,
                      pinned: str | None = None, count_usage: bool = False,
                      extra_headers: Mapping[str, str] | None = None,
                      job: bool = False) -> web.StreamResponse:
    """Serve ``call`` over ``route``, failing over as the plan decides.

    Args:
        prefer: the upstream the request's session is pinned to, while healthy.
        pinned: the only upstream to try (it holds an object the request names).
        count_usage: read streamed answers for their token usage (into
            ``summary.stream_tokens``), for a client with a ``tpm`` limit.
        extra_headers: added to the response's headers (before a stream starts).
        job: a job's own call: the route's ``jobs.targets`` go first.

    Raises:
        UpstreamError: when the plan gives up (no upstream produced an answer).
    """
    app = request.app
    clock = app[CLOCK]
    plan = router.plan(route, now=clock(), prefer=prefer, pinned=pinned, job=job)
    summary.route = route.model
    resuming: _Interrupted | None = None  # a cut stream being continued elsewhere
    while True:
        target = _next_target(plan, metrics, clock())
        if isinstance(target, GiveUp):
            if resuming is not None:
                return await _end_cut(resuming, summary, metrics, call, gave_up=target)
            raise _give_up(target, route, metrics)
        summary.attempts, summary.upstream = plan.attempts, target.name
        answer = await _attempt(request, target, call, session, metrics, router, plan,
                                request_id, clock, app[UPSTREAM_SLOTS], resuming=resuming,
                                track=count_usage or route.resume, extra_headers=extra_headers)
        if isinstance(answer, tuple):
            resp, outcome, transcript = answer
            summary.upstream = outcome.target.name  # a hedge may have won
            if outcome.target.upstream.is_pool:
                summary.endpoint = outcome.target.endpoint
            summary.cut = outcome.detail or None
            _book(router, plan, metrics, outcome, clock())
            app[TRAFFIC].record_served(route.model, outcome.target.name, clock())
            if resuming is not None:
                result = "cut" if summary.cut else "resumed"
                metrics.stream_resumes.labels(route.model, result).inc()
            if transcript is not None:
                summary.stream_tokens = _tokens_used(transcript, call)
            return resp
        if isinstance(answer, _Interrupted):
            resuming, outcome = answer, answer.outcome
        else:
            outcome = answer.outcome
        decision = _book(router, plan, metrics, outcome, clock())
        if isinstance(decision, Respond):  # the client's own mistake: pass it on untouched
            if resuming is not None:  # too late for that: the client has half an answer
                return await _end_cut(resuming, summary, metrics, call, outcome.detail)
            return web.Response(status=answer.status or 502, body=answer.body,
                                headers=response_headers(answer.headers or {}, request_id,
                                                         target, extra_headers))
        log.warning("upstream_attempt_failed", upstream=target.name, region=target.upstream.region,
                    result=outcome.result.value, detail=outcome.detail, attempt=plan.attempts,
                    will_retry=isinstance(decision, Retry),
                    paid=decision.paid if isinstance(decision, Retry) else None,
                    resume=resuming is not None or None)
        if isinstance(decision, GiveUp):
            if resuming is not None:
                return await _end_cut(resuming, summary, metrics, call, gave_up=decision)
            raise _give_up(decision, route, metrics)
        metrics.failovers.labels(route.model).inc()
        if decision.paid:
            metrics.retries_paid.labels(route.model).inc()
        if decision.delay_s > 0:
            await app[SLEEP](decision.delay_s)


def _next_target(plan: AttemptPlan, metrics: Metrics, now: float) -> Target | GiveUp:
    """The plan's next target; an attempt the panic rule made is counted and logged."""
    panics, paid = plan.panics, plan.paid_retries
    target = plan.next_attempt(now=now)
    route = plan.route.model
    if plan.paid_retries > paid:  # the failover target went bad: the retry was paid after all
        metrics.retries_paid.labels(route).inc()
    if plan.panics > panics and not isinstance(target, GiveUp):
        metrics.panic_attempts.labels(route, target.name).inc()
        # The panic rule: nothing else of the route can take the request.
        log.warning("panic_attempt_started", upstream=target.name, route=route,
                    attempt=plan.attempts)
    return target


async def _attempt(request: web.Request, target: Target, call: UpstreamCall,
                   session: UpstreamSessions, metrics: Metrics, router: Router,
                   plan: AttemptPlan, request_id: str, clock: Clock, slots: UpstreamSlots, *,
                   resuming: _Interrupted | None, track: bool,
                   extra_headers: Mapping[str, str] | None = None,
                   ) -> tuple[web.StreamResponse, AttemptOutcome, StreamTranscript | None] \
        | _Interrupted | Failed:
    """One attempt: an answer sent to the client, a resumable cut, or ``Failed``.

    With ``resuming``, the attempt continues that cut stream: the request asks for
    the rest of the partial answer, and its events go into the same response.
    """
    if resuming is not None:
        call = call.continuing(resuming.transcript.text, resuming.transcript.content_chunks)
    target, opened = await _open_hedged(target, call, session, metrics, router, plan,
                                        request_id, slots, clock)
    if isinstance(opened, Failed):
        return opened
    try:
        return await _answer(request, opened, call, metrics, plan, request_id, clock,
                             resuming=resuming, track=track, extra_headers=extra_headers)
    except BaseException:
        router.cancel(opened.target, now=clock())  # the client went away mid-answer
        raise


async def _answer(request: web.Request, opened: Opened, call: UpstreamCall, metrics: Metrics,
                  plan: AttemptPlan, request_id: str, clock: Clock, *,
                  resuming: _Interrupted | None, track: bool,
                  extra_headers: Mapping[str, str] | None,
                  ) -> tuple[web.StreamResponse, AttemptOutcome, StreamTranscript | None] \
        | _Interrupted | Failed:
    """Send the answer ``opened`` has begun to the client (see ``_attempt``)."""
    target = opened.target
    metrics.ttfb.labels(target.name, target.upstream.region).observe(opened.ttfb_s)
    transcript: StreamTranscript | None = None
    if opened.is_sse:
        if resuming is None:  # a Responses stream's opening names the stored response
            request[SUMMARY].stream_head = opened.prefix[:4096]
        resp = resuming.resp if resuming is not None \
            else stream_response(opened, request_id, extra_headers)
        transcript = resuming.transcript if resuming is not None \
            else StreamTranscript() if track else None
        try:
            cut = await relay_stream(request, resp, opened, transcript=transcript,
                                     continuation=resuming is not None)
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away: nothing more can reach it
        except Exception as exc:  # a bug while relaying: the client must still see the cut
            log.exception("stream_relay_crashed", upstream=target.name)
            cut = f"skyroute failed relaying the stream ({type(exc).__name__})"
            transcript = None  # nothing to resume from
        if cut is not None and transcript is not None and is_resumable(
                resume=plan.route.resume, payload=call.payload,
                text_only=transcript.text_only, finished=transcript.finished):
            outcome = AttemptOutcome(target=target, result=Result.STREAM_CUT,
                                     status=opened.response.status, detail=cut,
                                     ttfb_s=opened.ttfb_s)
            return _Interrupted(request=request, resp=resp, transcript=transcript,
                                opened=opened, outcome=outcome)
        await end_stream(request, resp, opened, cut)
    else:
        body = await read_rest(opened)
        if isinstance(body, Failed):
            return body
        resp, cut = buffered_response(opened, body, request_id, extra_headers), None
    if cut is None:
        metrics.latency.labels(target.name, target.upstream.region).observe(
            clock() - opened.started)
    outcome = AttemptOutcome(target=target, result=Result.STREAM_CUT if cut else Result.SUCCESS,
                             status=opened.response.status, detail=cut or "",
                             ttfb_s=opened.ttfb_s)
    return resp, outcome, transcript


async def _end_cut(cut: _Interrupted, summary: RequestSummary, metrics: Metrics,
                   call: UpstreamCall, why: str | None = None, *,
                   gave_up: GiveUp | None = None) -> web.StreamResponse:
    """No upstream could continue a cut stream: end it with the error event."""
    if gave_up is not None and gave_up.budget_exhausted:
        metrics.retry_budget_exhausted.labels(summary.route).inc()
        why = "the retry budget is spent (too many retries across requests)"
    reason = cut.outcome.detail + (f"; resuming failed: {why}" if why else
                                   "; no upstream could continue it")
    summary.cut = reason
    summary.stream_tokens = _tokens_used(cut.transcript, call)
    metrics.stream_resumes.labels(summary.route, "cut").inc()
    await end_stream(cut.request, cut.resp, cut.opened, reason)
    return cut.resp


def _tokens_used(transcript: StreamTranscript, call: UpstreamCall) -> int:
    """Tokens a streamed answer used (``routing.streamed_tokens`` says how they count)."""
    return streamed_tokens(reported=transcript.usage_tokens, request_bytes=len(call.body or b""),
                           content_chunks=transcript.content_chunks)


async def _open_hedged(target: Target, call: UpstreamCall, session: UpstreamSessions,
                       metrics: Metrics, router: Router, plan: AttemptPlan, request_id: str,
                       slots: UpstreamSlots, clock: Clock) -> tuple[Target, Opened | Failed]:
    """Open ``target``; if the route hedges and no first token came in time, race another.

    The first attempt to produce content wins and the other is cancelled (it has
    no outcome). A failure while the other attempt still runs is booked at once.
    """

    def opening(t: Target) -> Coroutine[Any, Any, Opened | Failed]:
        deadline = min(clock() + t.upstream.first_token_timeout_s, plan.deadline)
        return open_attempt(session, t, call, request_id=request_id, deadline=deadline,
                            clock=clock, slots=slots)

    def start(t: Target) -> asyncio.Task[Opened | Failed]:
        return asyncio.create_task(opening(t))

    delay = plan.hedge_delay(target, now=clock())
    if delay is None:  # no hedging: no task, no extra turn of the event loop
        try:
            return target, await opening(target)
        except BaseException:
            router.cancel(target, now=clock())  # the client went away
            raise
    tasks = {start(target): target}
    started = {target.name: clock()}
    hedge: Target | None = None
    raced = False  # True once a winner is known: the losers' waits are latency samples
    try:
        done, _ = await asyncio.wait(tasks, timeout=delay)
        if not done:
            hedge = plan.hedge(now=clock())
            if hedge is not None:
                tasks[start(hedge)] = hedge
                started[hedge.name] = clock()
        while True:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                winner, result = tasks.pop(task), task.result()
                if isinstance(result, Opened) or not tasks:
                    if hedge is not None:
                        route = plan.route.model
                        metrics.hedges.labels(route, "won" if winner is hedge else "lost").inc()
                    raced = isinstance(result, Opened)
                    return winner, result
                _book(router, plan, metrics, result.outcome, clock())
    finally:
        await _cancel_losers(tasks, router, plan, clock(),
                             started=started if raced else None)


async def _cancel_losers(tasks: dict[asyncio.Task[Opened | Failed], Target], router: Router,
                         plan: AttemptPlan, now: float, *,
                         started: dict[str, float] | None) -> None:
    for task, target in tasks.items():
        task.cancel()
        waited = now - started[target.name] if started is not None else None
        router.cancel(target, now=now, waited_s=waited)
        plan.cancel(target)
    for result in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(result, Opened):  # finished in the same instant as the winner
            result.close()


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
