"""The job runner: drains the queue through skyroute's own request path, in a low-priority lane.

Each job is served by this very instance's handler chain, in-process
(``proxy._jobs_call``: no socket, no HTTP parsing), so it takes exactly the path a
synchronous request takes (auth, limits, aliases, cache, failover, busy detection,
degradation), with no routing code of its own. The call is a ``JobRequest``, which
only this code makes (no client can send one), naming the client key that submitted
the job; the API authenticates it as that client (``job_caller``).

Where the lane runs (``LaneHere``): with ``jobs.lane.process: separate`` ``skyroute
run`` starts a jobs worker at idle CPU priority (``proxy._workers``) whose lane takes the
whole window, the kernel putting it aside whenever a serving worker has work; the serving
workers run no lane, only the API, and poke the jobs worker through a pipe when a submit
queues work. Otherwise (``inline``, or a ``Server`` embedded in a program) the lane runs
in the serving process itself, as follows.

The lane: at most ``LaneWindow.size`` jobs run at once per instance; the window is
halved when an answer says "busy" or the route's level is ``reduced`` or worse, and
grows back as tries succeed (AIMD, ``routing._jobs``). While clients are served, the
lane yields to them: every 20 ms ``LaneShare`` sets how many jobs may run from the
process's CPU use and the event loop's lag, against ``jobs.lane`` (``count_clients``
counts client requests: every request under ``/v1/`` that is not a job's own call), so
jobs take the CPU the clients leave idle, and none of it while clients need it all. A
try's answer decides the job (``after_try``): done, retried later with backoff, or given up.
The store call that records it also claims the jobs that will refill the slot it frees
(``JobsService.refill``), kept in ``ready`` until the lane starts them: a lane running a
few jobs at a time makes one store round trip per job instead of a claim and a finish.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import structlog
from aiohttp import web
from skyroute.routing import (
    BUSY_STATUSES,
    LEVELS,
    Finished,
    GaveUp,
    JobsPolicy,
    LaneShare,
    LaneWindow,
    Level,
    after_try,
)

from ._forward import parse_retry_after
from ._jobs_auth import JobRequest
from ._jobs_call import call_in_process
from ._jobs_metrics import JobMetrics
from ._jobs_store import Job, JobStore, Refill
from ._state import CLOCK, SERVING

if TYPE_CHECKING:
    from ._jobs_redis import RedisJobStore

log = structlog.get_logger("skyroute.jobs")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: How often an idle runner looks for due jobs (new local submissions wake it at once).
POLL_INTERVAL_S: Final = 0.2
#: The lag probe's period, and the lane share's tick.
LAG_PROBE_S: Final = 0.02
#: Least time between two logs of the lane yielding to clients (or getting it all back).
YIELD_LOG_INTERVAL_S: Final = 10.0
#: A try may take the route's whole timeout; the job's call allows a little more.
CALL_MARGIN_S: Final = 30.0
_RANK = {level: rank for rank, level in enumerate(LEVELS)}


class LaneHere(enum.Enum):
    """Whether this process runs the lane, and how it learns of new work."""

    #: The lane runs here, beside this process's clients (yielding by ``LaneShare``).
    INLINE = "inline"
    #: This is the jobs worker: the lane runs here, alone; serving workers poke it.
    SEPARATE = "separate"
    #: A serving worker beside a jobs worker: no lane here; a submit pokes the jobs worker.
    ELSEWHERE = "elsewhere"


class JobsService:
    """One instance's queue, lane and runner (the ``JOBS`` app key)."""

    def __init__(self, policy: JobsPolicy, *, metrics: JobMetrics,
                 lane: LaneHere = LaneHere.INLINE, wake_fd: int | None = None) -> None:
        """``wake_fd``: the jobs wake-up pipe's end (``WorkerSpec.wake_fd``): written to
        by a serving worker (``ELSEWHERE``), read by the jobs worker (``SEPARATE``)."""
        self.policy = policy
        self.lane_here = lane
        self.wake_fd = wake_fd
        self.data_dir = Path(policy.data_dir)
        self.store: JobStore | RedisJobStore
        if policy.redis is None:
            self.store = JobStore(self.data_dir, defer_lane_syncs=lane is LaneHere.SEPARATE)
        else:  # imported here: redis-py is ~6 MiB of RSS that an instance without it skips
            from ._jobs_redis import RedisJobStore

            self.store = RedisJobStore(policy.redis.url, policy.redis.prefix, self.data_dir,
                                       retention_s=policy.retention_s)
        self.metrics = metrics
        self.lane = LaneWindow(policy.concurrency)
        self.worker = f"{os.getpid()}-{secrets.token_hex(6)}"
        #: Set by a submit: new work for the lane (cleared by the lane).
        self.wake = asyncio.Event()
        #: Set when a job ends: a webhook may be due (cleared by the webhook sender).
        self.job_ended = asyncio.Event()
        self.rng = random.Random()
        self.running: dict[asyncio.Task[None], Job] = {}
        #: Jobs claimed with a finishing job's result (``refill``), started by the lane
        #: as it has room; claimed by this worker (their leases renewed) until then.
        self.ready: collections.deque[Job] = collections.deque()
        #: Store calls ending a job now (``ended``), whose refill is not in ``ready`` yet.
        self.ending: set[asyncio.Future[tuple[bool, list[Job]]]] = set()
        #: The lane's claim in progress (its jobs are not in ``running`` yet).
        self.claiming: asyncio.Future[list[Job]] | None = None
        self.loop_lag_s = 0.0
        self.share = LaneShare(cpu_target=policy.lane.cpu,
                               lag_limit_s=policy.lane.loop_lag_s,
                               trickle_s=policy.lane.trickle_s)
        #: Client requests started so far, and in flight now (``count_clients``).
        self.clients_started = 0
        self.clients_in_flight = 0
        #: Set when a slot frees or the share grows: the lane may start more.
        self.lane_room = asyncio.Event()
        #: The time batches' completion windows are checked against (a test moves it).
        self.wall: Callable[[], float] = time.time

    def new_work(self) -> None:
        """A submit, or a batch's lines, queued jobs: wake the lane, wherever it runs."""
        self.wake.set()
        if self.lane_here is LaneHere.ELSEWHERE and self.wake_fd is not None:
            # Non-blocking: a full pipe means the jobs worker has wake-ups waiting already.
            with contextlib.suppress(BlockingIOError):
                os.write(self.wake_fd, b"w")

    def room(self) -> int:
        """Jobs that may start now: the AIMD window, or the share clients leave it."""
        return self.share.room(window=self.lane.size, running=len(self.running),
                               now=time.monotonic())

    def refill(self, *, serving: bool) -> Refill | None:
        """What a job ending now claims in the same store call: one job for the slot it
        frees, if the lane still has room for it once the jobs already in ``ready``
        start (none when the share was cut, and none while the instance is not serving:
        starting, or draining on its way out). Room beyond that slot is the lane's to
        claim: jobs ending together would each claim it."""
        if serving and self.room() + 1 - len(self.ready) > 0:
            return Refill(1, self.lease_s())
        return None

    async def ended(self, call: Awaitable[tuple[bool, list[Job]]]) -> bool:
        """Await the store call that ends a job (``finish``, ``retry_later``); the jobs it
        claimed go to ``ready`` even if the caller is cancelled meanwhile (a shutdown
        then hands them back: ``jobs_lifecycle``). Returns whether the job was ended."""
        ending = asyncio.ensure_future(call)
        self.ending.add(ending)
        ending.add_done_callback(self._refilled)
        return (await asyncio.shield(ending))[0]

    def _refilled(self, ending: asyncio.Future[tuple[bool, list[Job]]]) -> None:
        self.ending.discard(ending)
        if not ending.cancelled() and ending.exception() is None:
            claimed = ending.result()[1]
            self.ready.extend(claimed)
            if claimed:
                self.metrics.claimed.labels("refill").inc(len(claimed))

    def adopt(self, policy: JobsPolicy) -> None:
        """A reload changed the ``jobs`` section: retries, lane size and share, webhooks
        apply now; the store (``data_dir``, ``redis``) stays until a restart."""
        if (policy.data_dir, policy.redis) != (self.policy.data_dir, self.policy.redis):
            log.warning("jobs_restart_needed", hint="jobs.data_dir and jobs.redis take effect "
                                                    "at the next start")
        self.policy = policy
        self.lane.set_limit(policy.concurrency)
        self.share.cpu_target = policy.lane.cpu
        self.share.lag_limit_s = policy.lane.loop_lag_s
        self.share.trickle_s = policy.lane.trickle_s

    def lease_s(self) -> float:
        return self.policy.visibility_timeout_s

    async def health(self) -> dict[str, object]:
        """The queue and the lane, as /health shows them."""
        counts = await self.store.counts()
        oldest = await self.store.oldest_queued()
        queue = {"queue": "redis" if self.policy.redis is not None else "sqlite",
                 "batches": self.policy.batches.value,
                 "targets": {alias: list(names) for alias, names in self.policy.targets.items()},
                 "jobs": {state: counts.get(state, 0) for state in ("queued", "running")},
                 "oldest_queued_s": round(time.time() - oldest, 3) if oldest else 0.0}
        if self.lane_here is LaneHere.ELSEWHERE:
            return {**queue, "lane": {
                "process": "separate",
                "see": "the jobs worker runs the lane: /metrics skyroute_jobs_lane_window, "
                       "skyroute_jobs_claimed_total, skyroute_jobs_finished_total"}}
        return {**queue,
                "lane": {"process": self.lane_here.value,
                         "running": len(self.running), "ready": len(self.ready),
                         "window": self.lane.size,
                         "limit": self.lane.limit,
                         "share": self.lane.size if self.share.share is None
                         else self.share.share,
                         "loop_lag_ms": round(self.loop_lag_s * 1000, 2)}}


JOBS = web.AppKey("jobs", JobsService)


@web.middleware
async def count_clients(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count client requests (not jobs' own calls) for the lane's share."""
    if isinstance(request, JobRequest) or not request.path.startswith("/v1/"):
        return await handler(request)
    service = request.app[JOBS]
    service.clients_started += 1
    service.clients_in_flight += 1
    try:
        return await handler(request)
    finally:
        service.clients_in_flight -= 1


async def jobs_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: open the store, run the lane and its helpers, close on exit."""
    service = app[JOBS]
    await asyncio.to_thread(service.data_dir.mkdir, parents=True, exist_ok=True)
    await service.store.start()
    if service.lane_here is LaneHere.ELSEWHERE:  # the API only: the jobs worker runs the rest
        try:
            yield
        finally:
            await service.store.aclose()
        return
    if service.lane_here is LaneHere.SEPARATE and service.wake_fd is not None:
        _watch_wake_pipe(service, service.wake_fd)
    from ._jobs_batches import batch_driver  # the batch side needs the runner's key
    from ._jobs_webhooks import webhook_sender

    loops: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("skyroute-jobs-lane", lambda: _drain(app, service)),
        ("skyroute-jobs-leases", lambda: _renew_leases(service)),
        ("skyroute-jobs-batches", lambda: batch_driver(app, service)),
        ("skyroute-jobs-webhooks", lambda: webhook_sender(service)),
        ("skyroute-jobs-gauges", lambda: _gauges(service))]
    if service.lane_here is LaneHere.INLINE:  # a jobs worker has no clients to yield to
        loops.append(("skyroute-jobs-lag", lambda: _probe_lag(service)))
    tasks = [asyncio.create_task(_resilient(name, loop), name=name) for name, loop in loops]
    try:
        yield
    finally:
        if service.lane_here is LaneHere.SEPARATE and service.wake_fd is not None:
            asyncio.get_running_loop().remove_reader(service.wake_fd)
        for task in tasks:
            task.cancel()
        in_flight = dict(service.running)
        for task in (*tasks, *in_flight):
            task.cancel()
        # Bounded: a store that stops answering (a Redis connection stuck mid-close), or
        # a loop that outlives its cancellation (what wake_within avoids), must not hold
        # shutdown; unreleased jobs are claimed again after their lease.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.gather(*tasks, *in_flight, return_exceptions=True)
                # Jobs cut short go back to the queue now, not after their lease: a
                # restart (or another instance) runs them at once. A stored result is
                # left alone. So do jobs claimed as the lane was cancelled (not started).
                unstarted: list[Job] = []
                if service.claiming is not None:
                    with contextlib.suppress(Exception):
                        unstarted = await service.claiming
                await asyncio.gather(*service.ending, return_exceptions=True)  # into ready
                with contextlib.suppress(Exception):
                    await service.store.release(
                        [*in_flight.values(), *unstarted, *service.ready], worker=service.worker)
                await service.store.aclose()
        except TimeoutError:
            log.warning("jobs_close_timed_out", timeout_s=CLOSE_TIMEOUT_S,
                        stuck=[t.get_name() for t in tasks if not t.done()],
                        jobs_stuck=sum(not t.done() for t in in_flight),
                        hint="jobs in flight are run again once their lease ends")


#: Longest wait at shutdown for the lane to stop and the store to close.
CLOSE_TIMEOUT_S: Final = 10.0
#: How long a loop waits after its store failed (Redis down, disk full) before going on.
STORE_RETRY_S: Final = 1.0


def _watch_wake_pipe(service: JobsService, fd: int) -> None:
    """Wake the lane whenever a serving worker pokes the pipe (``JobsService.new_work``);
    without it the lane still finds new work within ``POLL_INTERVAL_S``."""
    os.set_blocking(fd, False)

    def poked() -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 4096)  # every poke so far: one wake-up is enough
        service.wake.set()

    asyncio.get_running_loop().add_reader(fd, poked)


async def _resilient(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run ``loop`` forever: a failing store (Redis restarting) pauses it, never ends it.

    Jobs claimed when the store failed are not lost: their lease runs out and they are
    claimed again.
    """
    while True:
        try:
            await loop()
        except Exception as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # shutdown cancelled us and a library answered with its own error
            log.warning("job_queue_unavailable", loop=name, error=repr(exc),
                        retry_in_s=STORE_RETRY_S)
            await pause(STORE_RETRY_S)


async def _drain(app: web.Application, service: JobsService) -> None:
    """Claim due jobs while the lane has room; run each as a task."""
    slot_freed = service.lane_room
    while True:
        current = app[SERVING].runtime.config.jobs
        if current is not None and current is not service.policy:
            service.adopt(current)
        _watch_level(app, service)
        free = service.room()
        # Not serving yet (the application is still starting), or draining (SIGTERM: the
        # instance is on its way out, and a job claimed now would hold its shutdown): the
        # queue keeps the work for later, or for the next instance.
        serving = app[SERVING]
        if serving.draining and service.ready:  # refills not started go back to the queue
            handed = list(service.ready)
            service.ready.clear()
            await service.store.release(handed, worker=service.worker)
        if free <= 0 or serving.url is None or serving.draining:
            slot_freed.clear()
            await wake_within(slot_freed, POLL_INTERVAL_S)
            continue
        service.wake.clear()
        jobs = [service.ready.popleft() for _ in range(min(free, len(service.ready)))]
        if not jobs:
            # Shielded: a shutdown that cancels the lane while the store claims must still
            # learn which jobs it claimed, to hand them back (``jobs_lifecycle``).
            claim = asyncio.ensure_future(service.store.claim(
                worker=service.worker, limit=free, lease_s=service.lease_s(), now=time.time()))
            service.claiming = claim
            jobs = await asyncio.shield(claim)
            service.claiming = None
            if jobs:
                service.metrics.claimed.labels("claim").inc(len(jobs))
        for job in jobs:
            task = asyncio.create_task(_run_one(app, service, job))
            service.running[task] = job

            def done(t: asyncio.Task[None]) -> None:
                service.running.pop(t, None)
                slot_freed.set()

            task.add_done_callback(done)
        if not jobs:
            await wake_within(service.wake, POLL_INTERVAL_S)


async def wake_within(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set, at most ``timeout_s``: a job loop's pause between turns.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that lands in the
    loop iteration where the awaited thing completes (CPython gh-86296, fixed in 3.12). The
    job loops, woken by every finished job, then outlived shutdown; and redis-py's socket
    writes go through ``wait_for`` too, so a cancellation landing while a loop sends a
    command is lost the same way. So every pause first stops a loop whose task was
    cancelled (``stop_if_cancelled``), whoever swallowed the ``CancelledError``.
    """
    stop_if_cancelled()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


async def pause(seconds: float) -> None:
    """``asyncio.sleep`` for the job loops, stopping a cancelled one (see ``wake_within``)."""
    stop_if_cancelled()
    await asyncio.sleep(seconds)


def stop_if_cancelled() -> None:
    """Raise ``CancelledError`` if this task was cancelled and the error was swallowed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError("cancelled earlier; the CancelledError was swallowed")


def _watch_level(app: web.Application, service: JobsService) -> None:
    """A route at ``reduced`` or worse slows the lane as a busy answer does."""
    router = app[SERVING].runtime.router
    now = app[CLOCK]()
    if _RANK[router.level(now=now)] >= _RANK[Level.REDUCED] and service.lane.on_busy(
            now=time.monotonic()):
        service.metrics.lane_slowdowns.labels("degraded").inc()
        service.metrics.lane_window.set(service.lane.size)


async def _run_one(app: web.Application, service: JobsService, job: Job) -> None:
    try:
        await _try_job(app, service, job)
    except Exception as exc:  # the store failed: the lease runs out and the job runs again
        log.warning("job_result_not_stored", job_id=job.id, error=repr(exc))


async def _try_job(app: web.Application, service: JobsService, job: Job) -> None:
    policy, metrics = service.policy, service.metrics
    kind = "line" if job.batch_id else "async"
    headers = {"X-Request-ID": job.id, "Content-Type": "application/json"}
    route_timeout = max(r.timeout_s for r in app[SERVING].runtime.config.routes) \
        if app[SERVING].runtime.config.routes else 600.0
    status: int | None = None
    body: bytes | None = None
    retry_after: float | None = None
    started = time.perf_counter()
    try:
        async with asyncio.timeout(route_timeout + CALL_MARGIN_S):
            answer = await call_in_process(app, job.method, job.path, job.body, headers,
                                           owner=job.owner)
        status, body = answer.status, answer.body
        retry_after = parse_retry_after(answer.headers.get("Retry-After"))
        error = "" if status < 400 else _error_text(status, body)
    except TimeoutError:
        error = f"skyroute did not answer within {route_timeout + CALL_MARGIN_S:g} s"
    except Exception as exc:  # a bug past the error middleware: the try is spent, not the job
        log.exception("job_call_crashed", job_id=job.id)
        error = f"skyroute failed serving the job: {exc!r}"
    metrics.try_seconds.labels(kind).observe(time.perf_counter() - started)
    if status is None or status in BUSY_STATUSES:
        if service.lane.on_busy(now=time.monotonic()):
            metrics.lane_slowdowns.labels("busy").inc()
    else:
        service.lane.on_success()
    metrics.lane_window.set(service.lane.size)
    decision = after_try(status, error=error, retries_done=job.tries,
                         max_retries=policy.max_retries, base_s=policy.backoff_base_s,
                         cap_s=policy.backoff_cap_s, rng=service.rng, retry_after_s=retry_after)
    now = time.time()
    serving = app[SERVING]
    refill = service.refill(serving=serving.url is not None and not serving.draining)
    if isinstance(decision, Finished | GaveUp):
        final_error = decision.error if isinstance(decision, GaveUp) else (error or None)
        if await service.ended(service.store.finish(
                job, worker=service.worker, status=status, response=body, error=final_error,
                now=now, refill=refill)):
            ok = status is not None and 200 <= status < 300 and isinstance(decision, Finished)
            metrics.finished.labels(kind, "completed" if ok else "failed").inc()
            log.info("job_finished", job_id=job.id, batch_id=job.batch_id, status=status,
                     tries=job.tries + 1, error=final_error)
            if job.batch_id is None:  # an async job may have a webhook; a batch line never
                service.job_ended.set()
    else:
        metrics.retries.labels(kind).inc()
        log.info("job_retry", job_id=job.id, batch_id=job.batch_id, status=status,
                 tries=job.tries + 1, delay_s=round(decision.delay_s, 3), error=decision.error)
        await service.ended(service.store.retry_later(
            job, worker=service.worker, at=now + decision.delay_s, error=decision.error,
            now=now, refill=refill))


def _error_text(status: int, body: bytes | None) -> str:
    import json

    try:
        message = json.loads(body or b"")["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = (body or b"")[:200].decode("utf-8", "replace")
    return f"HTTP {status}: {message}"


async def _probe_lag(service: JobsService) -> None:
    """How late the event loop wakes a sleeper, and the lane's share from it, the process's
    CPU use and the clients served, every ``LAG_PROBE_S``."""
    loop = asyncio.get_running_loop()
    metrics = service.metrics
    cpu_before, started_before = time.process_time(), service.clients_started
    yielding_since: float | None = None
    logged_at = -YIELD_LOG_INTERVAL_S
    while True:
        began = loop.time()
        await pause(LAG_PROBE_S)
        now = loop.time()
        lag = max(0.0, now - began - LAG_PROBE_S)
        service.loop_lag_s = 0.7 * service.loop_lag_s + 0.3 * lag
        cpu_now = time.process_time()
        clients = service.clients_started - started_before + service.clients_in_flight
        cpu = (cpu_now - cpu_before) / max(now - began, 1e-3)
        cpu_before, started_before = cpu_now, service.clients_started
        before = service.lane.size if service.share.share is None else service.share.share
        service.share.tick(clients=clients, cpu=cpu, lag_s=service.loop_lag_s,
                           window=service.lane.size)
        after = service.lane.size if service.share.share is None else service.share.share
        metrics.lane_share.set(after)
        if after < before:
            metrics.lane_yields.inc()
        elif after > before:
            service.lane_room.set()
        # Logged as states (yielding, or the whole window back), at most one per interval.
        if service.share.share is not None and yielding_since is None:
            yielding_since = now
            if now - logged_at >= YIELD_LOG_INTERVAL_S and service.running:
                logged_at = now
                log.info("lane_yielding", share=after, window=service.lane.size,
                         running=len(service.running), cpu=round(cpu, 2),
                         loop_lag_ms=round(service.loop_lag_s * 1000, 2))
        elif service.share.share is None and yielding_since is not None:
            if now - logged_at >= YIELD_LOG_INTERVAL_S:
                logged_at = now
                log.info("lane_resumed", window=service.lane.size,
                         yielded_s=round(now - yielding_since, 3))
            yielding_since = None


async def _renew_leases(service: JobsService) -> None:
    """Renew this worker's claims well before they run out (a third of the lease)."""
    while True:
        await pause(service.lease_s() / 3)
        await service.store.renew(worker=service.worker, lease_s=service.lease_s(),
                                  now=time.time())


#: How often finished work past ``jobs.retention`` is deleted.
PURGE_INTERVAL_S: Final = 600.0


async def _gauges(service: JobsService) -> None:
    """Queue gauges, from the store, once a second; the retention purge now and then."""
    purged_at: float | None = None  # not 0.0: the monotonic clock starts near 0 at boot
    while True:
        if purged_at is None or time.monotonic() - purged_at > PURGE_INTERVAL_S:
            purged_at = time.monotonic()
            purged = await service.store.purge(
                ended_before=time.time() - service.policy.retention_s)
            if purged:
                log.info("jobs_purged", jobs=purged, retention_s=service.policy.retention_s)
        counts = await service.store.counts()
        for state in ("queued", "running"):
            service.metrics.jobs.labels(state).set(counts.get(state, 0))
        oldest = await service.store.oldest_queued()
        service.metrics.queue_age.set(max(0.0, time.time() - oldest) if oldest else 0.0)
        service.metrics.lane_window.set(service.lane.size)
        await pause(1.0)
