"""Moving one request to one upstream and its answer back: the only streaming code.

Theory of operation:

* ``open_attempt`` sends the request and reads until the first *content* byte,
  under the upstream's first-token deadline. DeepSeek's busy mode (200 followed
  only by blank lines or ``: keep-alive`` SSE comments) is not progress, so those
  bytes are dropped and do not stop the clock. Until this returns ``Opened``
  nothing has reached the client, so any failure can still fail over.
* ``buffered_response`` finishes a non-streaming (JSON) answer: it reads the whole
  body first, so a connection cut half-way is an attempt failure and never a
  shorter answer passed on as a whole one.
* ``relay_stream`` commits: it sends the headers and relays bytes as they arrive
  (no buffering; the StreamReader's high-water mark gives backpressure). If the
  upstream breaks off after that, the client gets an SSE error event and the
  stream ends without ``[DONE]``.
* Either way the upstream response is closed on every exit path, so a client that
  goes away cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from skyroute.routing import AttemptOutcome, Result, Target, classify_status

from ._connections import UpstreamSessions
from ._paths import upstream_url
from ._slots import Slot, UpstreamSlots
from ._sse import StreamTranscript, complete_events

#: Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the
#: ones skyroute sets itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "content-length",
})
_DROP_REQUEST = HOP_BY_HOP | {"authorization", "api-key", "x-api-key", "accept-encoding",
                              "x-request-id"}
_DROP_RESPONSE = HOP_BY_HOP | {"content-encoding", "date", "server", "set-cookie"}
#: An error body from an upstream is read up to this size to pass on or log.
MAX_ERROR_BODY = 1 << 20
#: The event that ends an OpenAI stream, as its own line.
_DONE_LINE = re.compile(rb"(?m)^data: ?\[DONE\]\r?$")
#: Longest single SSE event relayed. Real chunks are a few hundred bytes (a big
#: tool-call argument a few hundred KiB); an upstream sending endless bytes with no
#: event end must not grow skyroute's memory without bound.
MAX_SSE_EVENT_BYTES = 8 * 1024 * 1024


@dataclass(slots=True, kw_only=True)
class UpstreamCall:
    """What to send upstream, prepared once per client request."""

    method: str
    path_qs: str  # below the base URL, e.g. "/chat/completions?x=1"
    headers: CIMultiDict[str]
    body: bytes | None
    payload: dict[str, Any] | None  # the parsed JSON body, when there is one
    alias: str | None  # the model name the client asked for

    def body_for(self, target: Target) -> bytes | None:
        """The body with the client's model alias replaced by the upstream's name."""
        if self.payload is None or self.alias is None or target.model == self.alias:
            return self.body
        return json.dumps({**self.payload, "model": target.model}).encode()

    def continuing(self, partial: str, used_tokens: int) -> UpstreamCall:
        """This chat request, asking the next upstream to go on from ``partial``.

        The partial answer goes back as a final assistant message (the prefix the
        model continues), and a ``max_tokens`` limit shrinks by what was used.
        """
        assert self.payload is not None
        payload = dict(self.payload)
        if partial:
            payload["messages"] = [*payload["messages"],
                                   {"role": "assistant", "content": partial}]
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(payload.get(key), int):
                payload[key] = max(1, payload[key] - used_tokens)
        return replace(self, body=json.dumps(payload).encode(), payload=payload)


@dataclass(slots=True, kw_only=True)
class Opened:
    """An attempt whose answer has begun; nothing has been sent to the client yet."""

    target: Target
    response: aiohttp.ClientResponse
    prefix: bytes
    is_sse: bool
    started: float
    ttfb_s: float
    slot: Slot | None = None  # the endpoint connection slot this attempt holds

    def release(self) -> None:
        """Give the connection slot back (the answer has been read whole)."""
        if self.slot is not None:
            self.slot.release()

    def close(self) -> None:
        """Close the upstream response and give its connection slot back."""
        self.response.close()
        self.release()


@dataclass(slots=True, kw_only=True)
class Failed:
    """An attempt that produced no usable answer; ``answer`` is kept for 4xx pass-on."""

    outcome: AttemptOutcome
    status: int | None = None
    headers: CIMultiDictProxy[str] | None = None
    body: bytes = b""


def client_headers(request: web.Request) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones and the client's credentials."""
    return CIMultiDict((k, v) for k, v in request.headers.items()
                       if k.lower() not in _DROP_REQUEST)


def response_headers(upstream: Mapping[str, str], request_id: str, target: Target,
                     extra: Mapping[str, str] | None = None) -> CIMultiDict[str]:
    headers = CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in _DROP_RESPONSE)
    headers["X-Request-ID"] = request_id
    headers["X-Skyroute-Upstream"] = target.name
    headers.update(extra or {})  # e.g. X-Skyroute-Degraded for a fallback answer
    return headers


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def first_content_offset(buf: bytes, *, sse: bool) -> int | None:
    """Where real content starts in ``buf``, skipping keep-alives; None if not yet.

    Blank lines are skipped in both formats; in SSE, comment lines (``:`` ...) too.
    """
    i, n = 0, len(buf)
    while i < n:
        byte = buf[i]
        if byte in b"\r\n \t":
            i += 1
        elif sse and byte == 0x3A:  # ':' starts an SSE comment such as ": keep-alive"
            end = buf.find(b"\n", i)
            if end < 0:
                return None
            i = end + 1
        else:
            return i
    return None


async def open_attempt(session: UpstreamSessions, target: Target, call: UpstreamCall,
                       *, request_id: str, deadline: float,
                       slots: UpstreamSlots | None = None) -> Opened | Failed:
    """Send ``call`` to ``target`` and wait for the first content byte.

    Args:
        deadline: loop time by which the first content byte must have arrived
            (the upstream's first-token timeout, capped by the request deadline).
        slots: the connection slots per endpoint; the attempt first waits for one
            (``Result.POOL_FULL`` if none frees up) and ``Opened`` holds it.

    Returns:
        ``Opened`` once content has begun, or ``Failed`` with the classified outcome.
    """
    if slots is None:
        return await _open(session, target, call, request_id=request_id, deadline=deadline)
    slot = await slots.acquire(target, deadline=deadline)
    if slot is None:
        upstream = target.upstream
        return _failure(target, Result.POOL_FULL,
                        f"all {upstream.max_connections} connections (max_connections) busy "
                        f"for {upstream.pool_timeout_s:g}s (pool_timeout)")
    try:
        opened = await _open(session, target, call, request_id=request_id, deadline=deadline)
    except BaseException:
        slot.release()
        raise
    if isinstance(opened, Failed):
        slot.release()
    else:
        opened.slot = slot
    return opened


async def _open(session: UpstreamSessions, target: Target, call: UpstreamCall,
                *, request_id: str, deadline: float) -> Opened | Failed:
    loop = asyncio.get_running_loop()
    started = loop.time()
    headers = CIMultiDict(call.headers)
    headers["X-Request-ID"] = request_id
    if target.upstream.api_key:
        headers["Authorization"] = f"Bearer {target.upstream.api_key}"
    upstream = target.upstream
    timeout = aiohttp.ClientTimeout(total=None, connect=upstream.connect_timeout_s,
                                    sock_read=upstream.idle_timeout_s)
    response: aiohttp.ClientResponse | None = None
    try:
        async with asyncio.timeout_at(deadline):
            response = await session.for_upstream(upstream).request(
                call.method, upstream_url(target.endpoint, call.path_qs),
                data=call.body_for(target), headers=headers, timeout=timeout,
                allow_redirects=False)
            if response.status >= 400:
                return await _failed_status(target, response)
            is_sse = response.content_type == "text/event-stream"
            prefix = await _read_first_content(response, sse=is_sse)
    except TimeoutError:
        _close(response)
        waited = loop.time() - started
        if response is None:
            return _failure(target, Result.TIMEOUT, f"no response headers after {waited:.1f}s")
        return _failure(target, Result.BUSY,
                        f"no first token after {waited:.1f}s (only keep-alives: busy)",
                        ttfb_s=waited)
    except aiohttp.ClientConnectorError as exc:
        return _failure(target, Result.CONNECT_ERROR, f"cannot connect ({error_category(exc)})")
    except (aiohttp.ClientError, OSError) as exc:
        _close(response)
        return _failure(target, Result.CONNECT_ERROR,
                        f"connection failed before the answer ({error_category(exc)})")
    except BaseException:
        _close(response)
        raise
    if prefix is None:
        _close(response)
        return _failure(target, Result.STREAM_CUT, "the upstream closed with an empty answer")
    now = loop.time()
    return Opened(target=target, response=response, prefix=prefix, is_sse=is_sse,
                  started=started, ttfb_s=now - started)


async def _read_first_content(response: aiohttp.ClientResponse, *, sse: bool) -> bytes | None:
    buf = b""
    while True:
        chunk = await response.content.readany()
        if not chunk:
            return None
        buf += chunk
        offset = first_content_offset(buf, sse=sse)
        if offset is not None:
            return buf[offset:]
        if not sse:  # all whitespace so far: nothing worth keeping
            buf = b""


async def _failed_status(target: Target, response: aiohttp.ClientResponse) -> Failed:
    try:
        body = await response.content.read(MAX_ERROR_BODY)
    except (aiohttp.ClientError, OSError):
        body = b""
    finally:
        response.release()
    status = response.status
    result = classify_status(status)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    # The upstream's own error text stops here: it may quote a key or an address.
    outcome = AttemptOutcome(target=target, result=result, status=status,
                             detail=f"HTTP {status} {result.value}", retry_after_s=retry_after)
    return Failed(outcome=outcome, status=status, headers=response.headers, body=body)


def error_category(exc: BaseException) -> str:
    """What kind of network error ``exc`` is, without its text (which names hosts).

    An ``OSError``'s errno name (``ECONNREFUSED``), else the exception's class name.
    """
    os_error = getattr(exc, "os_error", exc)
    if isinstance(os_error, OSError) and os_error.errno in errno.errorcode:
        return errno.errorcode[os_error.errno]
    return type(exc).__name__


def _failure(target: Target, result: Result, detail: str, *,
             ttfb_s: float | None = None) -> Failed:
    return Failed(outcome=AttemptOutcome(target=target, result=result, detail=detail,
                                         ttfb_s=ttfb_s))


def _close(response: aiohttp.ClientResponse | None) -> None:
    if response is not None:
        response.close()


async def read_rest(opened: Opened) -> bytes | Failed:
    """The whole non-streaming answer, or ``Failed`` if it broke off part-way."""
    try:
        rest = await opened.response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        opened.close()
        return _failure(opened.target, Result.STREAM_CUT,
                        f"answer cut part-way ({error_category(exc)})")
    except BaseException:
        opened.close()
        raise
    opened.release()
    return opened.prefix + rest


def buffered_response(opened: Opened, body: bytes, request_id: str,
                      extra_headers: Mapping[str, str] | None = None) -> web.Response:
    """The response for a non-streaming answer read whole by ``read_rest``."""
    headers = response_headers(opened.response.headers, request_id, opened.target,
                               extra_headers)
    return web.Response(status=opened.response.status, body=body, headers=headers)


def stream_response(opened: Opened, request_id: str,
                    extra_headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """The client's streamed response for ``opened`` (not yet prepared)."""
    return web.StreamResponse(status=opened.response.status,
                              headers=response_headers(opened.response.headers, request_id,
                                                       opened.target, extra_headers))


async def relay_stream(request: web.Request, resp: web.StreamResponse, opened: Opened, *,
                       transcript: StreamTranscript | None = None,
                       continuation: bool = False) -> str | None:
    """Commit to the SSE stream ``opened`` and relay it into ``resp``; returns the cut reason.

    After this starts, failover is no longer possible. SSE is relayed whole events
    at a time, so a cut never leaves half an event for whatever is written next
    (``end_stream``'s error event, or a resumed attempt's events). With a
    ``transcript``, every event is read into it; with ``continuation``, the
    events are those of a resumed attempt and are rewritten to continue the
    stream the client already has.
    """
    upstream = opened.response
    cut: str | None = None
    try:
        if not resp.prepared:
            await resp.prepare(request)
        pending, done = opened.prefix, False
        chunks = upstream.content.iter_any()
        while True:
            whole = complete_events(pending)
            if whole:
                events, pending = ((pending, b"") if whole == len(pending)
                                   else (pending[:whole], pending[whole:]))
                if transcript is not None:
                    if continuation:
                        events = transcript.continue_with(events)
                    else:
                        transcript.feed(events)
                if events:
                    # Outside the try below: a client that went away is not the
                    # upstream's fault; its error ends the attempt with no outcome.
                    await resp.write(events)
                    done = done or _DONE_LINE.search(events) is not None
            try:
                chunk = await anext(chunks, None)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                cut = error_category(exc)
                break
            if chunk is None:
                break
            if chunk[:1] == b":" and not pending:  # a keep-alive comment between events
                chunk = chunk[first_content_offset(chunk, sse=True) or len(chunk):]
            pending += chunk
            if len(pending) > MAX_SSE_EVENT_BYTES:
                cut = f"an event longer than {MAX_SSE_EVENT_BYTES} bytes"
                pending = b""  # never relayed: half an event would corrupt the stream
                break
        if not done and cut is None and _DONE_LINE.search(pending):
            done = True
            await resp.write(pending)  # a last event without its blank line
    finally:
        opened.close()
    # Once [DONE] is out the answer is whole: what broke after it does not matter.
    return None if done else cut or "the upstream ended the stream without [DONE]"


async def end_stream(resp: web.StreamResponse, opened: Opened, cut: str | None) -> None:
    """Finish the client's stream: after a cut, an SSE error event and no ``[DONE]``."""
    if cut is not None:
        await resp.write(sse_error_event(opened.target.name, cut))
    await resp.write_eof()


def sse_error_event(upstream: str, reason: str) -> bytes:
    """An OpenAI-shaped error as one SSE event, for a stream that broke off."""
    error = {"error": {
        "message": (f"the upstream '{upstream}' broke off the stream part-way ({reason}); "
                    "the answer above is incomplete, retry the request"),
        "type": "upstream_error", "param": None, "code": "stream_interrupted"}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"
