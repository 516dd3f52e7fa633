"""The job API: ``/v1/async/*``, and ``/v1/files`` + ``/v1/batches`` run by skyroute.

* ``POST /v1/async/<OpenAI path>`` takes the body the synchronous call takes,
  queues it durably and answers 202 ``{"id", "status": "queued", "status_url"}``.
  ``Idempotency-Key`` returns the job a repeated submit made (409 if the key came
  with another request); ``X-Webhook-URL`` asks for a signed completion webhook.
  ``GET /v1/async/jobs/{id}`` shows status and answer; ``DELETE`` cancels.
* With ``jobs.batches: local`` (the default), files with purpose ``batch`` and
  batches are kept in the job store in OpenAI's shapes, so the SDK's
  ``files.create`` / ``batches.create`` work unchanged. An id skyroute does not hold
  (an upstream's file or batch) and ``jobs.batches: passthrough`` go to the upstream
  as without a ``jobs`` section.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from skyroute.routing import BATCH_ENDPOINTS, BatchMode, BatchStatus

from ._bodies import body_timeout, is_upload
from ._errors import BodyTooLarge, ClientRequestError, NotFound, ProxyError, http_error
from ._handlers import authenticate, choose_route, handle_api, parse_payload, read_body
from ._jobs_runner import JOBS, STORE_RETRY_S, JobsService
from ._jobs_store import IdempotencyConflict, new_id
from ._jobs_views import batch_view, file_view, job_view
from ._jobs_webhooks import WebhookRefused, check_target
from ._state import SERVING

#: The one completion window OpenAI offers, and how long it is.
COMPLETION_WINDOW: Final = "24h"
COMPLETION_WINDOW_S: Final = 24 * 3600.0
MAX_IDEMPOTENCY_KEY: Final = 255
_ASYNC_PREFIX: Final = "/v1/async/"
#: What an async request's path may be: OpenAI paths are ASCII words between slashes.
_ASYNC_PATH: Final = re.compile(r"/v1(/[A-Za-z0-9_.~-]+)+")
#: Ids of jobs, files and batches, skyroute's and upstreams' (``file-abc``, ``batch_abc``).
_OBJECT_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,255}")


def _service(request: web.Request) -> JobsService:
    service = request.app.get(JOBS)
    if service is None or request.app[SERVING].runtime.config.jobs is None:
        raise NotFound("async jobs are off on this skyroute: add a 'jobs' section to the "
                       "routing file (and restart) to turn them on")
    return service


def _owner(request: web.Request) -> str:
    client = authenticate(request, request.app[SERVING].runtime)
    return client.name if client is not None else ""


def _runs_batches(request: web.Request) -> bool:
    jobs = request.app[SERVING].runtime.config.jobs
    return (request.app.get(JOBS) is not None and jobs is not None
            and jobs.batches is BatchMode.LOCAL)


def _base(request: web.Request) -> str:
    return str(request.url.origin())


async def submit_async(request: web.Request) -> web.Response:
    """``POST /v1/async/<path>``: queue the request, answer 202."""
    service = _service(request)
    owner = _owner(request)
    runtime = request.app[SERVING].runtime
    path = "/v1/" + request.raw_path[len(_ASYNC_PREFIX):]
    if not _ASYNC_PATH.fullmatch(path.partition("?")[0]):
        raise ClientRequestError(f"{path.partition('?')[0]!r} is not an OpenAI API path; send "
                                 "the path the synchronous call takes after /v1/async, e.g. "
                                 "/v1/async/chat/completions", param="path")
    if path.startswith(_ASYNC_PREFIX):
        raise ClientRequestError("an async request cannot submit another async request; send "
                                 f"it to {path.replace('/async', '', 1)}", param="path")
    if is_upload(request):
        raise ClientRequestError("async requests take JSON bodies; send uploads (multipart, "
                                 "audio) synchronously")
    limits = runtime.config.limits
    body = await read_body(request, limits.max_body_bytes, idle_timeout_s=limits.body_timeout_s)
    payload = parse_payload(body)
    if payload is None:  # it would only fail later, on the upstream, as a job
        raise ClientRequestError("an async request needs the JSON body the synchronous call "
                                 f"to {path} takes")
    choose_route(runtime.router, payload)  # an unknown model is refused now, not later
    if payload is not None and payload.get("stream") is True:
        raise ClientRequestError("an async answer is kept whole: drop 'stream' (or send the "
                                 "request synchronously)", param="stream")
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ClientRequestError(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} "
                                 "characters", param="Idempotency-Key")
    webhook = await _webhook(request, service)
    try:
        record, created = await service.store.submit(
            owner=owner, method="POST", path=path, body=body or None, idem_key=key,
            webhook=webhook, now=time.time())
    except IdempotencyConflict:
        error = ClientRequestError(f"Idempotency-Key {key!r} was already used with a different "
                                   "request; use a new key for a new request",
                                   code="idempotency_key_reused", param="Idempotency-Key")
        error.status = 409
        raise error from None
    if created:
        service.metrics.accepted.labels("async").inc()
        service.new_work()
    return web.json_response(job_view(record, base=_base(request)), status=202)


async def _webhook(request: web.Request, service: JobsService) -> str | None:
    url = request.headers.get("X-Webhook-URL")
    if url is None:
        return None
    try:
        await check_target(service.policy, url)
    except WebhookRefused as exc:
        raise ClientRequestError(str(exc), code="webhook_not_allowed",
                                 param="X-Webhook-URL") from None
    if service.policy.webhook_secret is None:
        raise ClientRequestError("webhooks are off: set jobs.webhook_secret in the routing "
                                 "file so deliveries can be signed", param="X-Webhook-URL")
    return url


async def get_async(request: web.Request) -> web.Response:
    service = _service(request)
    record = await service.store.job(request.match_info["job_id"], _owner(request))
    if record is None:
        raise NotFound(f"no async job {request.match_info['job_id']!r} (for this API key)")
    return web.json_response(job_view(record, base=_base(request)))


async def cancel_async(request: web.Request) -> web.Response:
    service = _service(request)
    record = await service.store.cancel_job(request.match_info["job_id"], _owner(request),
                                            now=time.time())
    if record is None:
        raise NotFound(f"no async job {request.match_info['job_id']!r} (for this API key)")
    return web.json_response(job_view(record, base=_base(request)))


# -- files --------------------------------------------------------------------------------

async def create_file(request: web.Request) -> web.StreamResponse:
    """``POST /v1/files``: keep an upload with purpose ``batch`` under ``data_dir``."""
    if not _runs_batches(request):
        return await handle_api(request)
    service = request.app[JOBS]
    owner = _owner(request)
    if not request.content_type.startswith("multipart/form-data"):
        raise ClientRequestError("upload a file as multipart/form-data with fields 'file' and "
                                 "'purpose' (the SDK's client.files.create)")
    limits = request.app[SERVING].runtime.config.limits
    limit, idle = limits.max_upload_bytes, limits.body_timeout_s
    declared = request.content_length
    if declared is not None and declared > limit:  # as pass-through uploads: before reading
        raise BodyTooLarge(f"upload of {declared} bytes is over the limit of {limit} bytes "
                           "(limits.max_upload_bytes)")
    file_id = new_id("file-")
    final = service.store.files_dir / file_id
    tmp = service.store.files_dir / f".{file_id}.upload"
    purpose, filename, size = None, None, 0
    try:
        reader = await _multipart(request)
        while True:
            # Each read waits at most limits.body_timeout, as pass-through uploads do: a
            # client pausing mid-upload gets 408 instead of holding its connection.
            async with body_timeout(idle):
                part = await _next_part(reader)
            if part is None:
                break
            if part.name == "purpose":
                purpose = (await _read_field(part, idle)).strip()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"  # type: ignore[union-attr]
                size = await _save(part, tmp, limit, idle)
            elif not (part.name or "").startswith("expires_after"):  # that one: kept till deleted
                raise ClientRequestError(f"unknown form field {part.name!r}; "
                                         f"{_MULTIPART_HINT}", param=part.name)
        if filename is None:
            raise ClientRequestError("the upload has no 'file' field", param="file")
        if purpose != "batch":
            raise ClientRequestError(
                f"purpose {purpose!r}: this skyroute keeps files for batches only (purpose "
                "'batch'); set jobs.batches: passthrough to send files to the upstream",
                param="purpose")
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    record = await service.store.add_file(file_id=file_id, owner=owner, filename=filename,
                                          purpose=purpose, size=size, path=final,
                                          now=time.time())
    return web.json_response(file_view(record))


_MULTIPART_HINT: Final = ("upload the file as multipart/form-data with fields 'file' and "
                          "'purpose' (the SDK's client.files.create)")


async def _multipart(request: web.Request) -> aiohttp.MultipartReader:
    try:
        return await request.multipart()
    except ValueError as exc:  # no boundary in the Content-Type
        raise ClientRequestError(f"the upload is not valid multipart ({exc}); "
                                 f"{_MULTIPART_HINT}") from None


async def _next_part(reader: aiohttp.MultipartReader) -> Any:
    try:
        return await reader.next()
    except (ValueError, HttpProcessingError) as exc:  # a body that is not the parts announced
        raise ClientRequestError(f"the upload is not valid multipart ({exc}); "
                                 f"{_MULTIPART_HINT}") from None


#: Longest form field besides the file (``purpose``).
MAX_FIELD_BYTES: Final = 1024


async def _read_field(part: Any, idle: float) -> str:
    value = b""
    while True:
        async with body_timeout(idle):
            chunk = await part.read_chunk(MAX_FIELD_BYTES)
        if not chunk:
            return value.decode("utf-8", "replace")
        value += chunk
        if len(value) > MAX_FIELD_BYTES:
            raise ClientRequestError(f"form field {part.name!r} is over {MAX_FIELD_BYTES} bytes",
                                     param=part.name)


async def _save(part: Any, tmp: Any, limit: int, idle: float) -> int:
    size = 0
    with open(tmp, "wb") as out:
        while True:
            async with body_timeout(idle):
                chunk = await part.read_chunk(256 * 1024)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the file is over the limit of {limit} bytes "
                                   "(limits.max_upload_bytes)")
            out.write(chunk)  # to the page cache: microseconds, cheaper than a thread hop
        out.flush()
        os.fsync(out.fileno())
    return size


async def list_files(request: web.Request) -> web.StreamResponse:
    if not _runs_batches(request):
        return await handle_api(request)
    query = request.query
    try:
        limit = int(query.get("limit", str(MAX_FILES_PAGE)))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_FILES_PAGE:
        raise ClientRequestError(f"limit must be a whole number from 1 to {MAX_FILES_PAGE}",
                                 param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ClientRequestError("order must be 'asc' or 'desc'", param="order")
    # One more than the page, to say has_more; an unknown ``after`` gives an empty page.
    records = await request.app[JOBS].store.files(
        _owner(request), purpose=query.get("purpose"), after=query.get("after"),
        limit=limit + 1, newest_first=order == "desc")
    data = [file_view(r) for r in records[:limit]]
    return web.json_response({"object": "list", "data": data, "has_more": len(records) > limit,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})


#: Largest (and default) page of ``GET /v1/files``, as OpenAI's.
MAX_FILES_PAGE: Final = 10_000


async def _local_file(request: web.Request) -> dict[str, Any] | None:
    if not _runs_batches(request):
        return None
    return await request.app[JOBS].store.file(request.match_info["file_id"], _owner(request))


async def get_file(request: web.Request) -> web.StreamResponse:
    record = await _local_file(request)
    return web.json_response(file_view(record)) if record else await handle_api(request)


async def get_file_content(request: web.Request) -> web.StreamResponse:
    record = await _local_file(request)
    if record is None:
        return await handle_api(request)
    return web.FileResponse(record["path"], headers={
        "Content-Type": "application/octet-stream"})


async def delete_file(request: web.Request) -> web.StreamResponse:
    if await _local_file(request) is None:
        return await handle_api(request)
    record = await request.app[JOBS].store.delete_file(request.match_info["file_id"],
                                                       _owner(request))
    if record is None:
        raise NotFound(f"no file {request.match_info['file_id']!r}")
    return web.json_response({"id": record["id"], "object": "file", "deleted": True})


# -- batches ------------------------------------------------------------------------------

async def create_batch(request: web.Request) -> web.StreamResponse:
    if not _runs_batches(request):
        return await handle_api(request)
    service = request.app[JOBS]
    owner = _owner(request)
    limits = request.app[SERVING].runtime.config.limits
    payload = parse_payload(await read_body(request, limits.max_body_bytes,
                                            idle_timeout_s=limits.body_timeout_s)) or {}
    endpoint, window = payload.get("endpoint"), payload.get("completion_window")
    if endpoint not in BATCH_ENDPOINTS:
        raise ClientRequestError(f"endpoint {endpoint!r} is not one a batch can run; use one "
                                 f"of {', '.join(BATCH_ENDPOINTS)}", param="endpoint")
    if window != COMPLETION_WINDOW:
        raise ClientRequestError(f"completion_window {window!r}: only {COMPLETION_WINDOW!r} "
                                 "is offered", param="completion_window")
    metadata = payload.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise ClientRequestError("metadata must be an object of strings", param="metadata")
    file_id = payload.get("input_file_id")
    record = await service.store.file(file_id, owner) if isinstance(file_id, str) else None
    if record is None:
        raise NotFound(f"no file {file_id!r} to run: upload it first with purpose 'batch' "
                       "(client.files.create)", param="input_file_id")
    if record["purpose"] != "batch":
        raise ClientRequestError(f"file {file_id!r} has purpose {record['purpose']!r}; a batch "
                                 "runs a file uploaded with purpose 'batch'",
                                 param="input_file_id")
    batch = await service.store.add_batch(owner=owner, endpoint=endpoint, input_file_id=file_id,
                                          completion_window=window, metadata=metadata,
                                          now=time.time(), expires_s=COMPLETION_WINDOW_S)
    service.metrics.accepted.labels("batch").inc()
    return web.json_response(batch_view(batch))


async def list_batches(request: web.Request) -> web.StreamResponse:
    if not _runs_batches(request):
        return await handle_api(request)
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_BATCHES_PAGE:  # as OpenAI's: refused, not silently clamped
        raise ClientRequestError(f"limit must be a whole number from 1 to {MAX_BATCHES_PAGE}",
                                 param="limit")
    records = await request.app[JOBS].store.batches(
        _owner(request), after=request.query.get("after"), limit=limit + 1)
    data = [batch_view(r) for r in records[:limit]]
    return web.json_response({"object": "list", "data": data, "has_more": len(records) > limit,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})


#: Largest page of ``GET /v1/batches``, as OpenAI's.
MAX_BATCHES_PAGE: Final = 100


async def get_batch(request: web.Request) -> web.StreamResponse:
    if not _runs_batches(request):
        return await handle_api(request)
    record = await request.app[JOBS].store.batch(request.match_info["batch_id"],
                                                 _owner(request))
    return web.json_response(batch_view(record)) if record else await handle_api(request)


async def cancel_batch(request: web.Request) -> web.StreamResponse:
    if not _runs_batches(request):
        return await handle_api(request)
    store, owner = request.app[JOBS].store, _owner(request)
    batch_id = request.match_info["batch_id"]
    record = await store.batch(batch_id, owner)
    if record is None:
        return await handle_api(request)
    status = BatchStatus(record["status"])
    if status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
        await store.move_batch(batch_id, status, BatchStatus.CANCELLING, now=time.time())
    elif status is not BatchStatus.CANCELLING:
        raise http_error(409, f"batch {batch_id} is {status.value}; only a validating or "
                              "in-progress batch can be cancelled")
    record = await store.batch(batch_id, owner)
    assert record is not None
    return web.json_response(batch_view(record))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_store_error(exc: Exception) -> bool:
    """A failure of the store itself: SQLite's, or Redis's when a Redis queue is configured
    (redis-py is loaded only then: ~6 MiB of RSS an instance without it skips)."""
    if isinstance(exc, sqlite3.Error):
        return True
    redis_exceptions = sys.modules.get("redis.exceptions")
    return redis_exceptions is not None and isinstance(exc, redis_exceptions.RedisError)


def _store_errors(handler: Handler) -> Handler:
    """A store that fails (Redis down, disk full) is a 503 to retry, not a crash."""
    @functools.wraps(handler)
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            if not _is_store_error(exc):
                raise
            error = ProxyError(f"the job queue is unavailable ({type(exc).__name__}: {exc}); "
                               "retry later", code="queue_unavailable",
                               retry_after_s=STORE_RETRY_S)
            error.status = 503
            raise error from exc

    return handle


def _checked_ids(handler: Handler) -> Handler:
    """An id in the path that no job, file or batch can have is a 400 naming it, not a
    lookup (or an upstream call) for it."""
    @functools.wraps(handler)
    async def handle(request: web.Request) -> web.StreamResponse:
        for name in ("job_id", "file_id", "batch_id"):
            value = request.match_info.get(name)
            if value is not None and not _OBJECT_ID.fullmatch(value):
                raise ClientRequestError(f"{value!r} is not a {name.removesuffix('_id')} id "
                                         "(letters, digits, '-' and '_')", param=name)
        return await handler(request)

    return handle


def add_job_routes(app: web.Application) -> None:
    """The job API; before the catch-all ``/v1/{tail}`` so these paths match first."""
    for method, path, handler in (
            ("GET", "/v1/async/jobs/{job_id}", get_async),
            ("DELETE", "/v1/async/jobs/{job_id}", cancel_async),
            ("POST", "/v1/async/{tail:.+}", submit_async),
            ("POST", "/v1/files", create_file),
            ("GET", "/v1/files", list_files),
            ("GET", "/v1/files/{file_id}", get_file),
            ("DELETE", "/v1/files/{file_id}", delete_file),
            ("GET", "/v1/files/{file_id}/content", get_file_content),
            ("POST", "/v1/batches", create_batch),
            ("GET", "/v1/batches", list_batches),
            ("GET", "/v1/batches/{batch_id}", get_batch),
            ("POST", "/v1/batches/{batch_id}/cancel", cancel_batch)):
        app.router.add_route(method, path, _store_errors(_checked_ids(handler)))
