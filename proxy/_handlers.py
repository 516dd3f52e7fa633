"""Handlers for the OpenAI API under ``/v1``.

A handler parses and validates the request, asks the router for the route, and
hands the rest to the attempt loop (``proxy._failover``), through the
degradation decision (``proxy._degraded``). Only the ``model``, ``stream``, ``n``
and token-limit fields of a JSON body are interpreted; the body goes upstream as the
client sent it unless the model alias has to be renamed or, in minimal mode, its
``max_tokens`` capped. Uploads (multipart, binary) are streamed, not parsed
(``proxy._bodies``). A request that names a stored object (a file, a stored
response) goes to the upstream holding it (``proxy._objects``).
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import structlog
from aiohttp import web
from skyroute.routing import ApiKey, CacheMode, Config, Route, Router, affinity_after

from ._bodies import Upload, body_chunks, is_upload
from ._cache import serve_cached
from ._degraded import cap_max_tokens, decide, serve_decided
from ._errors import (
    BodyTooLarge,
    ClientRequestError,
    InvalidApiKey,
    InvalidJSON,
    ModelNotFound,
    NotFound,
    http_error,
)
from ._failover import serve_route
from ._forward import UpstreamCall
from ._headers import client_key, request_headers
from ._jobs_auth import JobRequest, job_caller
from ._limit_shares import LIMIT_SHARES
from ._metrics import Metrics
from ._objects import creates_object, holder_of, named_ids, remember_created
from ._paths import upstream_path
from ._sessions import (
    count_tokens,
    enforce_limits,
    remember_session,
    session_id_of,
)
from ._state import (
    CLIENT_CONCURRENCY,
    CLOCK,
    METRICS,
    REQUEST_ID,
    SERVING,
    STATE_SYNC,
    SUMMARY,
    UPSTREAM_SESSIONS,
    RequestSummary,
    Runtime,
)

log = structlog.get_logger("skyroute.proxy")


def authenticate(request: web.Request, runtime: Runtime) -> ApiKey | None:
    """The client key the request carries (None when auth is off).

    The key is looked for in ``auth.key_headers`` (default ``Authorization: Bearer``,
    ``api-key``, ``x-api-key``), and compared by digest in constant time.

    Raises:
        InvalidApiKey: the key is missing or unknown.
    """
    if isinstance(request, JobRequest):  # a job's own call (``proxy._jobs_runner``)
        return job_caller(request, runtime)
    keys = runtime.client_keys
    if keys is None:
        return None
    config = runtime.config
    given = client_key(request, config.key_headers)
    if given is None:
        where = ", ".join("'Authorization: Bearer <key>'" if h == "authorization" else f"'{h}'"
                          for h in config.key_headers)
        raise InvalidApiKey(f"missing API key: send it as one of {where} "
                            "(the OpenAI SDK's api_key)")
    key = keys.find(given)
    if key is not None:
        return key
    raise InvalidApiKey("incorrect API key provided; check the key configured for this "
                        "client in skyroute's auth.api_keys")


async def read_body(request: web.Request, limit: int, *, idle_timeout_s: float) -> bytes:
    """The request body, refusing anything over ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading; a
    chunked body is refused as soon as it passes the limit. A client that sends
    nothing for ``idle_timeout_s`` (``limits.body_timeout``) gets a 408.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the "
                           f"limit of {limit} bytes (limits.max_body_bytes)")
    content = request.content
    if content.is_eof():  # all of it came with the head (most JSON bodies): no wait, no timer
        body = content.read_nowait()
    else:
        chunks, size = [], 0
        async for chunk in body_chunks(request, idle_timeout_s):
            size += len(chunk)
            if size > limit:  # refused as soon as it passes the limit, not read on
                raise _over_limit(limit)
            chunks.append(chunk)
        body = b"".join(chunks)
    if len(body) > limit:
        raise _over_limit(limit)
    if declared is not None and len(body) < declared:
        raise ClientRequestError(f"the request body ended after {len(body)} of the {declared} "
                                 "bytes its Content-Length announced")
    return body


def _over_limit(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"request body is over the limit of {limit} bytes "
                        "(limits.max_body_bytes)")


#: Deepest JSON nesting accepted in a request body. OpenAI payloads nest a few
#: levels (messages, content parts, tool schemas of some depth); far deeper is an
#: attack on the parser or on whoever re-encodes the body.
MAX_JSON_DEPTH = 64


def parse_payload(body: bytes) -> dict[str, Any] | None:
    """The JSON object in ``body``; None for an empty body.

    Raises:
        InvalidJSON: the body is not a JSON object, nests deeper than
            ``MAX_JSON_DEPTH`` or holds NaN/Infinity (which no upstream accepts).
    """
    if not body.strip():
        return None
    try:
        payload = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidJSON(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") \
            from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJSON(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidJSON("the request body must be a JSON object")
    # Only a body with that many brackets can be that deep: most skip the walk.
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and _too_deep(payload):
        raise InvalidJSON(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    return payload


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return False


def choose_route(router: Router, payload: dict[str, Any] | None) -> tuple[Route, str | None]:
    """The route for the request's ``model``, or the default route if it names none."""
    model = payload.get("model") if payload else None
    if model is None:
        route = router.default_route()
        if route is None:
            raise NotFound("no route is configured; add one under 'routes' in the routing file")
        return route, None
    if not isinstance(model, str):
        raise InvalidJSON("'model' must be a string", param="model")
    route = router.route_for(model)
    if route is None:
        known = ", ".join(router.models) or "none"
        raise ModelNotFound(f"The model '{model}' does not exist on this skyroute "
                            f"(models: {known})", param="model")
    return route, model


#: Methods sent on to an upstream. TRACE (which echoes the request, skyroute's
#: upstream key included) and CONNECT (a tunnel) never are.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def handle_api(request: web.Request) -> web.StreamResponse:
    """Any ``/v1/...`` request that goes to an upstream."""
    if request.method not in FORWARDED_METHODS:
        raise http_error(405, f"{request.method} is not forwarded; the OpenAI API uses "
                              "GET, POST and DELETE")
    path_qs = upstream_path(request.raw_path)
    app = request.app  # a property walking the match info: looked up once
    runtime = app[SERVING].runtime  # this request keeps this config to the end
    client = authenticate(request, runtime)
    with app[CLIENT_CONCURRENCY].hold(client):  # a refused request uses no rpm
        return await _serve_api(request, app, runtime, client, path_qs)


async def _serve_api(request: web.Request, app: web.Application, runtime: Runtime,
                     client: ApiKey | None, path_qs: str) -> web.StreamResponse:
    """The rest of ``handle_api`` once the client is known and admitted."""
    config, sync = runtime.config, app[STATE_SYNC]
    if client is not None and (client.rpm is not None or client.tpm is not None):
        request[SUMMARY].rate_limit_headers = enforce_limits(
            sync.store, client, app[METRICS], now=time.time(), shares=app[LIMIT_SHARES])
    call = await _read_call(request, config, path_qs)
    try:
        route, alias = choose_route(runtime.router, call.payload if call.upload is None
                                    else {"model": call.upload.model} if call.upload.model
                                    else None)
        call.alias = alias
        if route.cache is CacheMode.OFF:  # most routes: no cache layer, no partial
            resp = await _serve(request, app, runtime.router, route, call, client)
        else:
            resp = await serve_cached(request, route, call, client, functools.partial(
                _serve, request, app, runtime.router, route, call, client))
    finally:
        if call.upload is not None:
            call.upload.close()
    summary = request[SUMMARY]
    summary.upstream_request_id = resp.headers.get("X-Upstream-Request-ID")
    body = resp.body if isinstance(resp, web.Response) else None
    body = body if isinstance(body, bytes) else None
    if resp.status < 300 and creates_object(call.method, call.path_qs):
        remember_created(sync.objects, body or summary.stream_head,
                         summary.upstream, config, app[METRICS])
    if client is not None and client.tpm is not None:
        count_tokens(sync.store, client, body, streamed=summary.stream_tokens)
    return resp


async def _read_call(request: web.Request, config: Config, path_qs: str) -> UpstreamCall:
    """The request as it goes upstream: headers by the rules, a JSON body or an upload."""
    headers, billing = request_headers(request, config.trusted_proxies)
    upload: Upload | None = None
    body, payload = b"", None
    if is_upload(request):
        upload = await Upload.read(request, config.limits.max_upload_bytes,
                                   idle_timeout_s=config.limits.body_timeout_s)
    else:
        body = await read_body(request, config.limits.max_body_bytes,
                               idle_timeout_s=config.limits.body_timeout_s)
        payload = parse_payload(body) if request.method in ("POST", "PUT", "PATCH") else None
    return UpstreamCall(method=request.method, path_qs=path_qs,
                        headers=headers, billing=billing, body=body or None, payload=payload,
                        upload=upload, alias=None,
                        accept_encoding=request.headers.get("Accept-Encoding", ""))


async def _serve(request: web.Request, app: web.Application, router: Router, route: Route,
                 call: UpstreamCall, client: ApiKey | None) -> web.StreamResponse:
    """Route and serve ``call``: to the holder of an object it names, else by degradation."""
    config, sync = router.config, app[STATE_SYNC]
    metrics, clock = app[METRICS], app[CLOCK]
    now = clock()
    summary = request[SUMMARY]
    ids = named_ids(call.path_qs, call.payload)
    holder = holder_of(sync.objects, ids, router, metrics, now=now) if ids else None
    job = isinstance(request, JobRequest)  # built by the job runner, never by the server
    serve = functools.partial(serve_route, request, router=router, call=call,
                              session=app[UPSTREAM_SESSIONS], metrics=metrics,
                              request_id=request[REQUEST_ID], summary=summary,
                              count_usage=client is not None and client.tpm is not None,
                              job=job)
    if holder is not None:  # only that upstream has the object: no fallback, no session
        return await serve(route=route, pinned=holder)
    decision = decide(router, route, call.payload, metrics, now=now)
    if call.body is not None:
        call.body, call.payload = cap_max_tokens(call.body, call.payload, decision, metrics)
    session_id = session_id_of(request, call.payload, config.sessions)
    session = sync.store.get(session_id, now=time.time()) if session_id else None
    pinned = session.upstream if session else None
    if pinned is not None:
        serve = functools.partial(serve, prefer=pinned)
    resp = await serve_decided(serve, decision, asked=route,
                               router=router, metrics=metrics, summary=summary,
                               deadline=now + route.timeout_s, clock=clock)
    if session_id:
        remember_session(sync.store, session_id, affinity_after(
            pinned=pinned, served_by=summary.upstream, status=resp.status,
            fallback=summary.fallback is not None))
    if job:
        _count_job_target(router, summary, metrics)
    return resp


def _count_job_target(router: Router, summary: RequestSummary, metrics: Metrics) -> None:
    """A job answered on a route with ``jobs.targets``: by one of them, or by the route's own
    targets (every preferred one was out, or failed this time)."""
    preferred = router.job_targets(summary.route)
    if not preferred:
        return
    choice = "preferred" if summary.upstream in preferred else "fallback"
    metrics.job_targets.labels(summary.route, choice).inc()
    if choice == "fallback":
        log.info("job_target_fallback", route=summary.route, upstream=summary.upstream,
                 preferred=list(preferred),
                 hint="no upstream in jobs.targets was available or answered; the route's own "
                      "targets served the job")


def _model_entry(alias: str, created: int) -> dict[str, Any]:
    return {"id": alias, "object": "model", "created": created, "owned_by": "skyroute"}


async def handle_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: every alias this skyroute routes, in OpenAI's list shape."""
    runtime = request.app[SERVING].runtime
    authenticate(request, runtime)
    created = int(runtime.loaded_at)
    data = [_model_entry(alias, created) for alias in runtime.router.models]
    return web.json_response({"object": "list", "data": data})


async def handle_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: one alias, or 404 naming it."""
    runtime = request.app[SERVING].runtime
    authenticate(request, runtime)
    alias = request.match_info["model"]
    if runtime.router.route_for(alias) is None:
        raise ModelNotFound(f"The model '{alias}' does not exist on this skyroute", param="model")
    return web.json_response(_model_entry(alias, int(runtime.loaded_at)))


#: The OpenAI paths nearly every request takes, registered as plain routes: aiohttp finds
#: one by a dict lookup of the whole path, where the catch-all ``/v1/{tail}`` costs a
#: walk up the path's parents and a regex match. Both lead to ``handle_api``.
HOT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


def add_api_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", handle_models)
    app.router.add_get("/v1/models/{model}", handle_model)
    for path in HOT_PATHS:
        app.router.add_route("*", path, handle_api)
    app.router.add_route("*", "/v1/{tail:.*}", handle_api)

