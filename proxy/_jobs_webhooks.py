"""Completion webhooks of async jobs, signed as Standard Webhooks (and Stripe) do.

Each delivery is a POST of the job's JSON (what ``GET /v1/async/jobs/{id}`` shows)
with three headers: ``webhook-id`` (the job id, the same on every retry, so the
receiver can drop duplicates), ``webhook-timestamp`` (Unix seconds, so it can refuse
old replays) and ``webhook-signature``: ``v1,`` and the base64 HMAC-SHA256, keyed by
``jobs.webhook_secret``, of ``{webhook-id}.{webhook-timestamp}.{body}``. A delivery
that gets no 2xx is retried with the jobs' backoff, up to ``jobs.max_retries``
times; the store keeps what is due, so a restart loses no delivery.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from typing import TYPE_CHECKING, Final

import aiohttp
import structlog
from skyroute.routing import after_try

from ._jobs_views import job_view

if TYPE_CHECKING:
    from ._jobs_runner import JobsService

log = structlog.get_logger("skyroute.jobs")

#: Longest wait for a receiver's answer.
WEBHOOK_TIMEOUT_S: Final = 10.0
#: A delivery being sent is held from other instances this long.
SENDING_LEASE_S: Final = 60.0


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one delivery."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


async def webhook_sender(service: JobsService, session: aiohttp.ClientSession) -> None:
    """Deliver due webhooks, forever."""
    while True:
        due = await service.store.due_webhooks(limit=32, lease_s=SENDING_LEASE_S,
                                               now=time.time())
        if due:
            await asyncio.gather(*(_deliver(service, session, job) for job in due))
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(service.wake.wait(), 0.5)


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
    try:
        async with session.post(url, data=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)) as resp:
            status = resp.status
        error = f"HTTP {status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
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
