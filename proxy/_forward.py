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
  (no buffering; the StreamReader's high-water mark gives backpressure). Whether
  the stream ended whole, and what counts as its first content, is its protocol's
  call (``proxy._streams``: ``[DONE]``, a Responses terminal event, or a clean end
  of body). If the upstream breaks off, the client gets an error event in that
  protocol's shape and never a clean end.
* Headers follow ``proxy._headers``; an upstream that compresses although asked
  for identity is decoded (``proxy._encoding``); uploads stream from their spool
  (``proxy._bodies``).
* Either way the upstream response is closed on every exit path, so a client that
  goes away cancels the upstream request.
* Which client carries an attempt (``_open``): the lean one (``proxy._upstream_http``,
  keep-alive pools on asyncio Protocols) for every request to a plain OpenAI-compatible
  upstream; aiohttp's ``ClientSession`` for cloud upstreams (their own URL, signing,
  Bedrock's translated answers), streamed uploads and ``HEAD``. Both answers read
  alike here, and fail with the same exception classes.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import functools
import json
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from skyroute.routing import AttemptOutcome, Provider, Result, Target, classify_provider_error

from ._bedrock import TranslationError
from ._bodies import Upload
from ._bounded_read import MAX_ERROR_BODY, read_at_most
from ._client_guard import send_within
from ._clouds import ConverseAnswer, CredentialUnavailable, UpstreamAccess, credential_hint
from ._connections import UpstreamSessions
from ._encoding import Decoder, accepts, content_coding, decoder_for
from ._headers import response_headers, upstream_headers
from ._paths import upstream_url
from ._rename import rename_model
from ._slots import Slot, UpstreamSlots
from ._sse import StreamTranscript, complete_events
from ._state import STREAM_TAP, Clock
from ._streams import StreamEnd, StreamKind, content_start, first_content_offset, stream_kind
from ._upstream_http import ConnectFailed, UpstreamResponse

#: An upstream's answer, from whichever client carried the attempt.
Answer = aiohttp.ClientResponse | ConverseAnswer | UpstreamResponse

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
    #: The client's OpenAI-Organization/-Project, for upstreams that forward them.
    billing: Mapping[str, str] = field(default_factory=dict)
    upload: Upload | None = None  # a streamed body (multipart, binary) instead of ``body``
    accept_encoding: str = ""  # the client's, for a coding skyroute cannot decode
    kind: StreamKind = field(init=False, default=StreamKind.DONE)  # of a streamed answer

    def __post_init__(self) -> None:
        self.kind = stream_kind(self.path_qs)

    def body_for(self, target: Target) -> bytes | None:
        """The body with the client's model alias replaced by the upstream's name."""
        if self.payload is None or self.alias is None or target.model == self.alias:
            return self.body
        if self.body is None:
            return json.dumps({**self.payload, "model": target.model}).encode()
        return rename_model(self.body, self.payload, target.model)

    def data_for(self, target: Target, headers: CIMultiDict[str]
                 ) -> bytes | AsyncIterator[bytes] | None:
        """What to send as the body of one attempt (a fresh stream for an upload)."""
        if self.upload is None:
            return self.body_for(target)
        renamed = target.model if self.alias is not None else None
        size, chunks = self.upload.sized_for(renamed)
        headers["Content-Length"] = str(size)
        return chunks

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
    response: Answer
    prefix: bytes
    is_sse: bool
    started: float
    ttfb_s: float
    end: StreamEnd  # whether a streamed answer ended whole, by its protocol
    decoder: Decoder | None = None  # the upstream compressed although asked not to
    slot: Slot | None = None  # the upstream connection slot this attempt holds

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


async def open_attempt(session: UpstreamSessions, target: Target, call: UpstreamCall,
                       *, request_id: str, deadline: float, clock: Clock,
                       slots: UpstreamSlots | None = None) -> Opened | Failed:
    """Send ``call`` to ``target`` and wait for the first content byte.

    Args:
        deadline: ``clock`` time by which the first content byte must have arrived
            (the upstream's first-token timeout, capped by the request deadline).
        clock: the instance's clock; the time to first byte is measured on it.
        slots: the connection slots per endpoint; the attempt first waits for one
            (``Result.POOL_FULL`` if none frees up) and ``Opened`` holds it.

    Returns:
        ``Opened`` once content has begun, or ``Failed`` with the classified outcome.
    """
    if slots is None:
        return await _open(session, target, call, request_id=request_id, deadline=deadline,
                           clock=clock)
    slot = await slots.acquire(target, within_s=deadline - clock())
    if slot is None:
        upstream = target.upstream
        return _failure(target, Result.POOL_FULL,
                        f"all {upstream.max_connections} connections (max_connections) busy "
                        f"for {upstream.pool_timeout_s:g}s (pool_timeout)")
    try:
        opened = await _open(session, target, call, request_id=request_id, deadline=deadline,
                             clock=clock)
    except BaseException:
        slot.release()
        raise
    if isinstance(opened, Failed):
        slot.release()
    else:
        opened.slot = slot
    return opened


async def _open(session: UpstreamSessions, target: Target, call: UpstreamCall,
                *, request_id: str, deadline: float, clock: Clock) -> Opened | Failed:
    started = clock()
    headers = upstream_headers(call.headers, call.billing, target, request_id=request_id)
    data = call.data_for(target, headers)
    upstream = target.upstream
    response: Answer | None = None
    access = session.access(upstream)
    try:
        async with asyncio.timeout(deadline - started):
            if access is None and (data is None or isinstance(data, bytes)) \
                    and call.method != "HEAD":
                response = await session.pool_for(upstream).request(
                    call.method, target.endpoint, call.path_qs, headers, data,
                    connect_s=upstream.connect_timeout_s, idle_s=upstream.idle_timeout_s)
            else:
                response = await _aiohttp_request(session, target, call, headers, data, access)
            coding = content_coding(response.headers)
            decoder = decoder_for(coding) if coding else None
            if response.status >= 400:
                return await _failed_status(target, response, decoder)
            if coding and decoder is None and not accepts(call.accept_encoding, coding):
                response.close()
                return _failure(target, Result.SERVER_ERROR,
                                f"answered with Content-Encoding {coding}, which skyroute "
                                "cannot decode and the client did not accept")
            is_sse = response.content_type == "text/event-stream"
            kind = call.kind if coding == "" or decoder is not None else StreamKind.PLAIN
            prefix = await _read_first_content(response, sse=is_sse, kind=kind,
                                               decoder=decoder)
    except CredentialUnavailable as exc:
        return _failure(target, Result.BAD_KEY, str(exc))
    except TranslationError as exc:  # the request cannot be said in this provider's API
        _close(response)
        return _untranslatable(target, str(exc))
    except TimeoutError:
        _close(response)
        waited = clock() - started
        if response is None:
            return _failure(target, Result.TIMEOUT, f"no response headers after {waited:.1f}s")
        return _failure(target, Result.BUSY,
                        f"no first token after {waited:.1f}s (only keep-alives: busy)",
                        ttfb_s=waited)
    except (aiohttp.ClientConnectorError, ConnectFailed) as exc:
        return _failure(target, Result.CONNECT_ERROR, f"cannot connect ({error_category(exc)})")
    except (aiohttp.ClientError, OSError, zlib.error) as exc:
        _close(response)
        return _failure(target, Result.CONNECT_ERROR,
                        f"connection failed before the answer ({error_category(exc)})")
    except BaseException:
        _close(response)
        raise
    if prefix is None:
        _close(response)
        return _failure(target, Result.STREAM_CUT, "the upstream closed with an empty answer")
    return Opened(target=target, response=response, prefix=prefix, is_sse=is_sse,
                  started=started, ttfb_s=clock() - started, end=StreamEnd(kind), decoder=decoder)


async def _aiohttp_request(session: UpstreamSessions, target: Target, call: UpstreamCall,
                           headers: CIMultiDict[str], data: bytes | AsyncIterator[bytes] | None,
                           access: UpstreamAccess | None
                           ) -> aiohttp.ClientResponse | ConverseAnswer:
    """The attempt on aiohttp's client: a cloud upstream, a streamed upload or a HEAD."""
    upstream = target.upstream
    url = upstream_url(target.endpoint, call.path_qs)
    if access is not None:  # a cloud: its path, its identity, maybe its API
        prepared = await access.prepare(
            method=call.method, endpoint=target.endpoint, path_qs=call.path_qs,
            model=target.model, headers=headers, data=data, payload=call.payload)
        url, data = prepared.url, prepared.data
    response = await session.for_upstream(upstream).request(
        call.method, url, data=data, headers=headers,
        timeout=_timeout(upstream.connect_timeout_s, upstream.idle_timeout_s),
        allow_redirects=False)
    if access is not None and prepared.translate:
        return ConverseAnswer(response, model=target.model, payload=call.payload or {})
    return response


@functools.lru_cache(maxsize=256)
def _timeout(connect_s: float, idle_s: float) -> aiohttp.ClientTimeout:
    """An upstream's timeouts (frozen, so one per setting pair, not one per attempt)."""
    return aiohttp.ClientTimeout(total=None, connect=connect_s, sock_read=idle_s)


async def _read_first_content(response: Answer, *, sse: bool,
                              kind: StreamKind, decoder: Decoder | None) -> bytes | None:
    buf = b""
    while True:
        chunk = await response.content.readany()
        if not chunk:
            return None
        buf += decoder.decompress(chunk) if decoder is not None else chunk
        prefix = content_start(buf, sse=sse, kind=kind)
        if prefix is not None:
            return prefix
        if not sse:  # all whitespace so far: nothing worth keeping
            buf = b""


def _untranslatable(target: Target, message: str) -> Failed:
    """A 400 in OpenAI's shape for a request this upstream's API cannot express."""
    body = json.dumps({"error": {"message": f"upstream '{target.name}': {message}",
                                 "type": "invalid_request_error", "param": None,
                                 "code": "unsupported_by_provider"}}).encode()
    outcome = AttemptOutcome(target=target, result=Result.CLIENT_ERROR, status=400,
                             detail=f"not expressible for provider {target.upstream.provider}")
    return Failed(outcome=outcome, status=400, body=body,
                  headers=CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"})))


async def _failed_status(target: Target, response: Answer, decoder: Decoder | None) -> Failed:
    try:
        body = await read_at_most(response, MAX_ERROR_BODY)
        if decoder is not None:
            body = decoder.decompress(body) + decoder.flush()
    except (aiohttp.ClientError, OSError, zlib.error):
        body = b""
    finally:
        response.release()
    status = response.status
    error_type = response.headers.get("x-amzn-ErrorType", "")
    result = classify_provider_error(status, error_type)
    retry_after = _retry_after(response.headers)
    # The upstream's own error text stops here: it may quote a key or an address.
    detail = f"HTTP {status} {result.value}"
    if result is Result.BAD_KEY and target.upstream.provider is not Provider.OPENAI:
        detail += f"; {credential_hint(target.upstream, error_type)}"
    outcome = AttemptOutcome(target=target, result=result, status=status,
                             detail=detail, retry_after_s=retry_after)
    headers = response.headers
    if decoder is not None:  # the body passed on is decoded: so must its headers say
        headers = CIMultiDictProxy(CIMultiDict(
            (k, v) for k, v in headers.items() if k.lower() != "content-encoding"))
    return Failed(outcome=outcome, status=status, headers=headers, body=body)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait: Azure's ``retry-after-ms`` when given (finer), else ``Retry-After``."""
    millis = headers.get("retry-after-ms", "").strip()
    if millis.replace(".", "", 1).isdigit():
        return float(millis) / 1000
    return parse_retry_after(headers.get("Retry-After"))


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


def _close(response: Answer | None) -> None:
    if response is not None:
        response.close()


async def read_rest(opened: Opened) -> bytes | Failed:
    """The whole non-streaming answer, or ``Failed`` if it broke off part-way."""
    try:
        rest = await opened.response.read()
        if opened.decoder is not None:
            rest = opened.decoder.decompress(rest) + opened.decoder.flush()
    except (aiohttp.ClientError, OSError, TimeoutError, zlib.error) as exc:
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
                               extra_headers, decoded=opened.decoder is not None)
    return web.Response(status=opened.response.status, body=body, headers=headers)


def stream_response(opened: Opened, request_id: str,
                    extra_headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """The client's streamed response for ``opened`` (not yet prepared)."""
    return web.StreamResponse(status=opened.response.status,
                              headers=response_headers(opened.response.headers, request_id,
                                                       opened.target, extra_headers,
                                                       decoded=opened.decoder is not None))


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
    upstream, end, decoder = opened.response, opened.end, opened.decoder
    tap = request.get(STREAM_TAP)  # the response cache keeps what the client got
    cut: str | None = None
    try:
        if not resp.prepared:
            await resp.prepare(request)
        pending = opened.prefix
        content = upstream.content
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
                    await send_within(request, resp, events)
                    end.feed(events)
                    if tap is not None:
                        tap.append(events)
            try:
                raw = await content.readany()
                chunk = decoder.decompress(raw) if raw and decoder is not None else raw
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, zlib.error) as exc:
                cut = error_category(exc)
                break
            if not raw:  # the end of the body
                end.eof()
                break
            if chunk[:1] == b":" and not pending:  # a keep-alive comment between events
                chunk = chunk[first_content_offset(chunk, sse=True) or len(chunk):]
            pending += chunk
            if len(pending) > MAX_SSE_EVENT_BYTES:
                cut = f"an event longer than {MAX_SSE_EVENT_BYTES} bytes"
                pending = b""  # never relayed: half an event would corrupt the stream
                break
        if cut is None and pending.strip():
            end.feed(pending)  # a last event without its blank line
            await send_within(request, resp, pending)
            if tap is not None:
                tap.append(pending)
        if cut is None and not end.complete:
            cut = end.missing
    finally:
        opened.close()
    # Once the stream's own end is out the answer is whole: a break after it loses nothing.
    return None if end.complete else cut


async def end_stream(request: web.Request, resp: web.StreamResponse, opened: Opened,
                     cut: str | None) -> None:
    """Finish the client's stream: after a cut, an SSE error event and no ``[DONE]``."""
    if cut is not None:
        await send_within(request, resp, opened.end.error_event(opened.target.name, cut))
    await resp.write_eof()
