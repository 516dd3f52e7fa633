"""Completion webhooks of async jobs, signed as Standard Webhooks (and Stripe) do.

Each delivery is a POST of the job's JSON (what ``GET /v1/async/jobs/{id}`` shows)
with three headers: ``webhook-id`` (the job id, the same on every retry, so the
receiver can drop duplicates), ``webhook-timestamp`` (Unix seconds, so it can refuse
old replays) and ``webhook-signature``: ``v1,`` and the base64 HMAC-SHA256, keyed by
``jobs.webhook_secret``, of ``{webhook-id}.{webhook-timestamp}.{body}``. A delivery
that gets no 2xx is retried with the jobs' backoff, up to ``jobs.max_retries``
times; the store keeps what is due, so a restart loses no delivery.

Targets are checked against ``jobs.webhook_hosts`` when the job is submitted and again
at each delivery, whose connections resolve names through :class:`CheckedResolver`: the
addresses checked are the ones connected to, so a name rebound to an internal address
after the submit check is still refused, and redirects are not followed.

A delivery whose host resolves to an address not allowed, or no longer resolves at all
(no such name), is *refused*: not retried, since no retry changes the answer without a
settings or DNS change, logged as ``job_webhook_refused`` and counted as ``refused`` or
``unresolved``. A temporary DNS failure (``EAI_AGAIN``: the resolver did not answer) is
an ordinary failure, retried with backoff up to ``jobs.max_retries``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from skyroute.routing import JobsPolicy, after_try

from ._jobs_runner import wake_within
from ._jobs_views import job_view

if TYPE_CHECKING:
    from ._jobs_runner import JobsService

log = structlog.get_logger("skyroute.jobs")

#: Longest wait for a receiver's answer.
WEBHOOK_TIMEOUT_S: Final = 10.0
#: A delivery being sent is held from other instances this long.
SENDING_LEASE_S: Final = 60.0


#: Longest wait for resolving a webhook host at submit.
RESOLVE_TIMEOUT_S: Final = 5.0


class WebhookRefused(Exception):
    """A webhook URL that ``jobs.webhook_hosts`` does not let skyroute call; says why."""


class HostRefused(OSError):
    """At delivery: the host resolved to an address ``jobs.webhook_hosts`` does not allow."""

    result = "refused"


class HostUnresolved(OSError):
    """At delivery: the host has no address (no such name), as opposed to a resolver that
    did not answer this time."""

    result = "unresolved"


def refusal(exc: BaseException) -> HostRefused | HostUnresolved | None:
    """The refusal behind a failed delivery's connection error, if it was one."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    return cause if isinstance(cause, HostRefused | HostUnresolved) else None


def check_url(policy: JobsPolicy, url: str) -> str:
    """The URL's host if ``webhook_hosts`` allows it by name (addresses are checked later)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"X-Webhook-URL {url!r} is not an http(s) URL")
    host = parts.hostname
    if not policy.webhook_hosts:
        raise WebhookRefused("webhooks are off: list the hosts they may go to in "
                             "jobs.webhook_hosts in the routing file (e.g. [hooks.example.com])")
    if not policy.webhook_host_allowed(host):
        raise WebhookRefused(f"X-Webhook-URL host {host!r} is not allowed: add it to "
                             "jobs.webhook_hosts (a private, loopback or link-local address "
                             "needs an IP or CIDR entry covering it)")
    return host


def check_addresses(policy: JobsPolicy, host: str, addresses: list[str]) -> None:
    """Refuse ``host`` if any address it resolved to is not allowed."""
    refused = [a for a in addresses if not policy.webhook_address_allowed(a)]
    if refused or not addresses:
        raise WebhookRefused(
            f"X-Webhook-URL host {host!r} resolves to {', '.join(refused) or 'nothing'}, a "
            "private, loopback or link-local address: webhooks go there only if an IP or "
            "CIDR entry in jobs.webhook_hosts covers it")


async def check_target(policy: JobsPolicy, url: str) -> None:
    """Refuse (:class:`WebhookRefused`) a webhook URL skyroute must not call."""
    host = check_url(policy, url)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):  # not wait_for: see wake_within
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        raise WebhookRefused(f"X-Webhook-URL host {host!r} does not resolve ({exc})") from None
    check_addresses(policy, host, [str(info[4][0]) for info in infos])


class CheckedResolver(AbstractResolver):
    """aiohttp's resolver, refusing names that resolve to addresses not allowed."""

    def __init__(self, policy: Callable[[], JobsPolicy], *,
                 resolver: AbstractResolver | None = None) -> None:
        """``resolver``: where names are looked up (aiohttp's threaded getaddrinfo)."""
        self._policy = policy
        self._resolver = resolver or aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        try:
            results = await self._resolver.resolve(host, port, family)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN:
                raise  # the resolver did not answer: a failure like any other, retried
            raise HostUnresolved(f"webhook host {host!r} does not resolve ({exc.strerror}); "
                                 "check the X-Webhook-URL the job was submitted with") from None
        try:
            check_addresses(self._policy(), host, [r["host"] for r in results])
        except WebhookRefused as exc:
            raise HostRefused(str(exc)) from None
        return results

    async def close(self) -> None:
        await self._resolver.close()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one delivery."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


async def webhook_sender(service: JobsService) -> None:
    """Deliver due webhooks, forever, from a session of their own (checked resolving)."""
    connector = aiohttp.TCPConnector(limit=0, resolver=CheckedResolver(lambda: service.policy))
    async with aiohttp.ClientSession(connector=connector) as session:
        await _send_due(service, session)


async def _send_due(service: JobsService, session: aiohttp.ClientSession) -> None:
    while True:
        # Cleared here, by its only waiter: an event left set would make this loop spin,
        # a write transaction per turn (it did, with submits setting the lane's event).
        service.job_ended.clear()
        due = await service.store.due_webhooks(limit=32, lease_s=SENDING_LEASE_S,
                                               now=time.time())
        if due:
            await asyncio.gather(*(_deliver(service, session, job) for job in due))
            continue
        await wake_within(service.job_ended, 0.5)


async def _deliver(service: JobsService, session: aiohttp.ClientSession,
                   job: dict[str, object]) -> None:
    policy = service.policy
    secret, url, job_id = policy.webhook_secret, str(job["webhook"]), str(job["id"])
    body = json.dumps(job_view(job, base=None)).encode()
    timestamp = int(time.time())
    headers = {"Content-Type": "application/json", "webhook-id": job_id,
               "webhook-timestamp": str(timestamp)}
    if secret:
        headers["webhook-signature"] = sign(secret, job_id, timestamp, body)
    status: int | None = None
    request: dict[str, Any] = {"data": body, "headers": headers, "allow_redirects": False,
                               "timeout": aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)}
    try:
        # Settings may have changed since the submit; an IP literal (never resolved) is
        # checked here whole, a name's addresses by the session's CheckedResolver.
        check_url(policy, url)
        async with session.post(url, **request) as resp:
            status = resp.status
        error = f"HTTP {status}"
    except WebhookRefused as exc:
        await _refuse(service, job_id, "refused", str(exc))
        return
    except (aiohttp.ClientError, TimeoutError) as exc:
        refused = refusal(exc)
        if refused is not None:
            await _refuse(service, job_id, refused.result, str(refused))
            return
        error = repr(exc)
    if status is not None and 200 <= status < 300:
        service.metrics.webhooks.labels("delivered").inc()
        await service.store.webhook_sent(job_id, ok=True, next_at=None)
        log.info("job_webhook_delivered", job_id=job_id, status=status)
        return
    tries = int(str(job["webhook_tries"]))
    decision = after_try(None, error=error, retries_done=tries, max_retries=policy.max_retries,
                         base_s=policy.backoff_base_s, cap_s=policy.backoff_cap_s,
                         rng=service.rng)
    next_at = time.time() + decision.delay_s if hasattr(decision, "delay_s") else None
    service.metrics.webhooks.labels("retry" if next_at else "failed").inc()
    log.warning("job_webhook_failed", job_id=job_id, error=error, retry_at=next_at)
    await service.store.webhook_sent(job_id, ok=False, next_at=next_at)


async def _refuse(service: JobsService, job_id: str, result: str, error: str) -> None:
    """A delivery no retry would change: given up now, not after ``jobs.max_retries``."""
    service.metrics.webhooks.labels(result).inc()
    log.warning("job_webhook_refused", job_id=job_id, result=result, error=error)
    await service.store.webhook_sent(job_id, ok=False, next_at=None)
