"""A realistic stand-in for a remote OpenAI-compatible upstream (DeepSeek, OpenAI, vLLM, SGLang).

Used by the test-suite, by ``skyroute demo`` and by the benchmarks: a real aiohttp server on a
real port that answers like the real APIs do, and misbehaves like them on demand.

Rules
* Answers are deterministic and name their upstream ("Hello from <name> t3 t4"); only ids and
  ``created`` vary. Modes apply to the answering POSTs (chat, completions, embeddings) after the
  key, JSON and model checks, which behave like the real APIs.
* ``behaviour`` is read once per request, except that a request held "busy" is released as soon
  as the live mode is flipped away from "busy" (handy for deterministic tests).
* aiohttp (3.9+) does not cancel handlers on disconnect by default, so a vanished client shows as
  ``ConnectionResetError`` on a write, or as a closed transport while a handler waits (``pause``
  polls). Either one, or a ``CancelledError`` under ``handler_cancellation=True``, counts once in
  ``cancelled``. Every state change wakes ``wait_for``, so tests never sleep to synchronise.
* ``GET /_standin/behaviour`` shows the behaviour and ``POST`` (a JSON object of ``Behaviour``
  fields) changes it, so a person or another process can make a running stand-in slow or busy
  (``skyroute demo`` prints the commands). It checks every field first and changes nothing on
  a 400. It needs no key: stand-ins listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import math
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Final, final

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web import ContentCoding
from multidict import CIMultiDictProxy

from ._standin_api import StandinApi

__all__ = ["MODES", "Behaviour", "StandinUpstream", "behaviour_update"]

log = structlog.get_logger("skyroute.standin")

MODES: Final = frozenset({"ok", "busy", "error", "rate_limited", "reset_before",
                          "reset_midstream", "bad_key", "no_balance", "bad_request"})
ENCODINGS: Final = frozenset({"gzip", "deflate"})
#: OpenAI's rate-limit headers, sent on every answer (they describe the stand-in's key).
RATELIMIT_HEADERS: Final = {
    "x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms", "x-ratelimit-limit-tokens": "2000000",
    "x-ratelimit-remaining-tokens": "1999990", "x-ratelimit-reset-tokens": "0s"}
# DeepSeek closes a connection it has kept busy after about ten minutes.
BUSY_MAX_S: Final = 600.0
# How often a waiting handler looks for a vanished client: short enough that tests waiting on
# ``cancelled`` resolve quickly, long enough to cost nothing measurable in benchmarks.
_DISCONNECT_POLL_S: Final = 0.02
_EMBEDDING_DIMS: Final = 8
_PROMETHEUS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
# Gauges read from ``load["waiting"]``, ``load["running"]`` (+ in-flight), ``load["kv_cache"]``.
_METRIC_NAMES: Final = {
    "vllm": ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"),
    "sglang": ("sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage"),
}
_ENDPOINT_KINDS: Final = {"chat/completions": "chat", "completions": "text",
                          "embeddings": "embeddings"}
# mode: (status, message, type, code), in DeepSeek's and OpenAI's wording.
_ERROR_BODIES: Final[dict[str, tuple[int, str, str, str]]] = {
    "rate_limited": (429, "Rate limit reached", "requests", "rate_limit_exceeded"),
    "bad_key": (401, "Authentication Fails (the API key is invalid)", "authentication_error",
                "invalid_api_key"),
    "no_balance": (402, "Insufficient Balance", "unknown_error", "invalid_request_error"),
    "bad_request": (400, "Invalid request", "invalid_request_error", "invalid_request_error"),
}
_SERVER_ERRORS: Final = {500: "Internal server error", 502: "Bad gateway",
                          503: "Server is busy, please try again later", 504: "Gateway timeout"}
CONTROL_PATH: Final = "/_standin/behaviour"


@dataclasses.dataclass
class Behaviour:
    """How the stand-in answers; mutable so a test can flip it while the server runs."""

    mode: str = "ok"
    ttft_s: float = 0.0
    token_delay_s: float = 0.0
    tokens: int = 5
    error_status: int = 503
    retry_after_s: float = 1.0
    busy_for_s: float | None = None
    keepalive_interval_s: float = 0.05
    reset_after_chunks: int = 2
    #: Compress non-streaming answers with this coding when the client accepts it ...
    content_encoding: str | None = None
    #: ... or even when it asked for identity, as some servers do.
    force_encoding: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "mode" and value not in MODES:
            raise ValueError(f"Behaviour.mode must be one of {sorted(MODES)}, got {value!r}")
        if name == "content_encoding" and value not in (None, *ENCODINGS):
            raise ValueError(f"Behaviour.content_encoding must be null or one of "
                             f"{sorted(ENCODINGS)}, got {value!r}")
        if name == "error_status" and value not in _SERVER_ERRORS:
            raise ValueError(f"Behaviour.error_status must be 500/502/503/504, got {value!r}")
        super().__setattr__(name, value)


def behaviour_update(body: Any) -> dict[str, Any]:
    """Check a control request's JSON body: a subset of ``Behaviour``'s fields with values.

    Raises:
        ValueError: naming the first field that is unknown or has a value of the wrong kind.
    """
    example = 'e.g. {"ttft_s": 0.4} or {"mode": "busy"}'
    if not isinstance(body, dict) or not body:
        raise ValueError(f"the body must be a JSON object of Behaviour fields, {example}")
    kinds = {f.name: str(f.type) for f in dataclasses.fields(Behaviour)}
    for name, value in body.items():
        kind = kinds.get(name)
        if kind is None:
            raise ValueError(f"unknown field {name!r}; Behaviour fields: {', '.join(kinds)}")
        if value is None and "None" in kind:
            continue
        if kind == "bool":
            ok, want = isinstance(value, bool), "true or false"
        elif kind == "str":
            ok, want = isinstance(value, str), f"one of {sorted(MODES)}"
        elif kind.startswith("str"):
            ok, want = value in ENCODINGS, f"one of {sorted(ENCODINGS)}"
        elif "float" in kind:
            ok, want = _is_amount(value), "a number of seconds >= 0"
        else:
            ok, want = _is_amount(value) and isinstance(value, int), "a whole number >= 0"
        if "None" in kind:
            want += " or null"
        if not ok:
            raise ValueError(f"field {name!r} must be {want}, got {json.dumps(value)}")
    return body


def _is_amount(value: Any) -> bool:
    """A finite number >= 0; JSON true/false are not numbers (Python's bool is an int)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _abort(request: web.BaseRequest, resp: web.StreamResponse, *, rst: bool) -> web.StreamResponse:
    """Drop the connection (``rst``: with a TCP RST, not a FIN); aiohttp then drops ``resp``."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if rst and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return resp


def _error(status: int, message: str, type_: str, code: str | None,
           param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _words(value: Any) -> int:
    if isinstance(value, dict):
        value = [value.get("content"), value.get("text")]
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    return len(value.split()) if isinstance(value, str) else 0


def _embeddings_json(model: str, body: dict[str, Any]) -> dict[str, Any]:
    """Small deterministic vectors, one per input, as floats or (the SDK's default) base64."""
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and all(isinstance(v, int) for v in value)):
        value = [value]  # one text, or one pre-tokenised input
    inputs = [v if isinstance(v, str) else json.dumps(v) for v in value or []]
    data = []
    for i, text in enumerate(inputs):
        digest = hashlib.sha256(f"{model}\0{text}".encode()).digest()
        vec: Any = [round(b / 127.5 - 1.0, 6) for b in digest[:_EMBEDDING_DIMS]]
        if body.get("encoding_format") == "base64":
            vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    prompt = max(1, _words(inputs))
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}


def _choice(key: str, value: Any, finish: str | None) -> dict[str, Any]:
    return {"index": 0, key: value, "logprobs": None, "finish_reason": finish}


@dataclasses.dataclass(slots=True, kw_only=True)
class _Answer:
    """One deterministic answer, rendered as JSON or as SSE events."""

    kind: str  # "chat", "text" or "embeddings"
    model: str
    upstream: str
    body: dict[str, Any]
    tokens: int

    def pieces(self) -> list[str]:
        """The answer's tokens; after a final assistant message, the ones it has not got."""
        words = ["Hello", " from", f" {self.upstream}"]
        said = 0  # a continuation (skyroute's stream resume) goes on from the prefix
        messages = self.body.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            said = len(str(messages[-1].get("content") or "").split())
        return [words[i] if i < len(words) else f" t{i}" for i in range(said, self.tokens)]

    def usage(self) -> dict[str, int]:
        prompt = max(1, _words(self.body.get("messages") or self.body.get("prompt")))
        return {"prompt_tokens": prompt, "completion_tokens": self.tokens,
                "total_tokens": prompt + self.tokens}

    def head(self, *, chunk: bool) -> dict[str, Any]:
        chat = self.kind == "chat"
        kind = "chat.completion" + (".chunk" if chunk else "") if chat else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": self.model}

    def as_json(self) -> dict[str, Any]:
        if self.kind == "embeddings":
            return _embeddings_json(self.model, self.body)
        text = "".join(self.pieces())
        choice = (_choice("message", {"role": "assistant", "content": text}, "stop")
                  if self.kind == "chat" else _choice("text", text, "stop"))
        return {**self.head(chunk=False), "choices": [choice], "usage": self.usage()}

    def sse_events(self) -> Iterator[tuple[bool, bytes]]:
        """Yield ``(is_content, event_bytes)`` for a streamed answer, ``[DONE]`` included."""
        chat, head = self.kind == "chat", self.head(chunk=True)
        opts = self.body.get("stream_options")
        with_usage = isinstance(opts, dict) and opts.get("include_usage") is True

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            chunk = {**head, "choices": choices, **({"usage": usage} if with_usage else {})}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        if chat:
            yield False, event([_choice("delta", {"role": "assistant", "content": ""}, None)])
        for p in self.pieces():
            yield True, event([_choice("delta", {"content": p}, None) if chat
                               else _choice("text", p, None)])
        yield False, event([_choice("delta", {}, "stop") if chat else _choice("text", "", "stop")])
        if with_usage:
            yield False, event([], self.usage())
        yield False, b"data: [DONE]\n\n"


@final
class StandinUpstream:
    """An OpenAI-compatible upstream on a real port, for tests, demos and benchmarks.

    Args:
        name: appears in every answer ("Hello from <name>") and in echoes.
        models: model ids served; any other model gets OpenAI's 404 ``model_not_found``.
        api_key: when set, ``Authorization: Bearer <api_key>`` is required (else 401).
        behaviour: initial ``Behaviour`` (default: answer normally at once).
        metrics_format: ``None`` (``/metrics`` is 404), ``"vllm"`` or ``"sglang"``.
    """

    def __init__(self, name: str, *, models: Sequence[str] = ("deepseek-chat",),
                 api_key: str | None = None, behaviour: Behaviour | None = None,
                 metrics_format: str | None = None) -> None:
        if metrics_format not in (None, *_METRIC_NAMES):
            raise ValueError(f"metrics_format must be None, 'vllm' or 'sglang': {metrics_format!r}")
        self.name = name
        self.models = tuple(models)
        self.api_key = api_key
        self.behaviour = behaviour if behaviour is not None else Behaviour()
        self.metrics_format = metrics_format
        self.load: dict[str, float] = {"waiting": 0.0, "running": 0.0, "kv_cache": 0.0}
        self.requests_total = self.in_flight = self.cancelled = 0
        self.last_headers: CIMultiDictProxy[str] | None = None
        self.last_json: Any = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._closing = False
        # An Event swapped on every change rather than an asyncio.Condition: state changes
        # happen in sync code (``finally`` blocks) where acquiring a Condition's lock can't wait.
        self._changed_event = asyncio.Event()
        self.api = StandinApi(self)  # Responses, files, batches, audio, images, moderations
        self.app: web.Application = self._build_app()

    def __repr__(self) -> str:
        return (f"<StandinUpstream {self.name} mode={self.behaviour.mode} requests="
                f"{self.requests_total} in_flight={self.in_flight} cancelled={self.cancelled}>")

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"StandinUpstream {self.name!r}: port read before start()")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    @property
    def control_url(self) -> str:
        """Where ``GET``/``POST`` read and change ``behaviour`` from outside the process."""
        return f"http://{self._host}:{self.port}{CONTROL_PATH}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (0 = a free port); read it back from ``port``/``base_url``."""
        if self._runner is not None:
            raise RuntimeError(f"StandinUpstream {self.name!r}: start() called twice")
        # A short shutdown timeout: aclose() must not wait for a 10-minute busy answer.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner, self._host, self._closing = runner, host, False
        self._port = int(runner.addresses[0][1])

    async def aclose(self) -> None:
        """Stop listening and drop open connections; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self._closing = True
            await runner.cleanup()

    async def __aenter__(self) -> StandinUpstream:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def wait_for(self, predicate: Callable[[StandinUpstream], bool],
                       timeout: float = 5.0) -> None:
        """Return once ``predicate(self)`` is true; raise ``TimeoutError`` after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    await self._changed_event.wait()
        except TimeoutError:
            raise TimeoutError(f"wait_for: predicate still false after {timeout} s: "
                               f"{self!r}") from None

    def _changed(self) -> None:
        event, self._changed_event = self._changed_event, asyncio.Event()
        event.set()

    def _build_app(self) -> web.Application:
        # Uploads are streamed by the handlers that take them, never held whole.
        app = web.Application(middlewares=[self._track], client_max_size=1 << 40)
        app.on_response_prepare.append(self._openai_headers)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get(CONTROL_PATH, self._show_behaviour)
        app.router.add_post(CONTROL_PATH, self._change_behaviour)
        app.router.add_post("/v1/{endpoint:chat/completions|completions|embeddings}", self._answer)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._models)
        self.api.add_routes(app)
        app.router.add_route("*", "/v1/{tail:.*}", self._echo)
        return app

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Count /v1 requests, check the key, and turn a vanished client into ``cancelled``."""
        if not request.path.startswith("/v1/"):
            return await handler(request)
        self.requests_total += 1
        self.in_flight += 1
        self.last_headers = request.headers
        self._changed()
        try:
            if self.api_key is not None and (
                    request.headers.get("Authorization") != f"Bearer {self.api_key}"):
                return _error(401, "Incorrect API key provided", "invalid_request_error",
                              "invalid_api_key")
            resp = await handler(request)
            coding = self.behaviour.content_encoding
            accepted = coding in request.headers.get("Accept-Encoding", "") if coding else False
            if (coding and isinstance(resp, web.Response) and not resp.prepared
                    and (accepted or self.behaviour.force_encoding)):
                resp.enable_compression(ContentCoding(coding))
            return resp
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            # Includes aiohttp's ClientConnectionResetError; CancelledError needs
            # handler_cancellation=True.
            self.cancelled += not self._closing
            if isinstance(exc, asyncio.CancelledError):
                raise
            # Drop the connection (if aclose() got here first it is still open) so that nothing
            # more is written to it; aiohttp then discards this response quietly.
            return _abort(request, web.Response(status=499), rst=False)
        finally:
            self.in_flight -= 1
            self._changed()

    async def pause(self, request: web.Request, seconds: float) -> None:
        """Sleep ``seconds``, raising ``ConnectionResetError`` as soon as the client disconnects."""
        deadline = time.monotonic() + seconds
        while True:
            transport = request.transport
            if transport is None or transport.is_closing() or self._closing:
                raise ConnectionResetError(f"client left {self.name!r} while it was waiting")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, _DISCONNECT_POLL_S))

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        kind = _ENDPOINT_KINDS[request.match_info["endpoint"]]
        try:
            body = self.last_json = await request.json()
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            return _error(400, "We could not parse the JSON body of your request (it must be "
                          "a JSON object).", "invalid_request_error", "invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", "invalid_request_error",
                          None, param="model")
        if model not in self.models:
            return _error(404, f"The model `{model}` does not exist or you do not have access "
                          "to it.", "invalid_request_error", "model_not_found", param="model")
        b = dataclasses.replace(self.behaviour)  # this request's view; busy still reads live
        refused = self.refusal(request, b)
        if refused is not None:
            return refused
        answer = _Answer(kind=kind, model=model, upstream=self.name, body=body, tokens=b.tokens)
        if kind != "embeddings" and body.get("stream") is True:
            return await self._stream(request, answer, b)
        return await self._json(request, answer, b)

    def refusal(self, request: web.Request, b: Behaviour) -> web.StreamResponse | None:
        """The error answer (or dropped connection) ``b.mode`` calls for; None to answer."""
        if b.mode == "error":
            return _error(b.error_status, _SERVER_ERRORS[b.error_status], "server_error", None)
        if b.mode in _ERROR_BODIES:
            retry_after = {"Retry-After": str(max(0, math.ceil(b.retry_after_s)))}
            return _error(*_ERROR_BODIES[b.mode],
                          headers=retry_after if b.mode == "rate_limited" else None)
        if b.mode == "reset_before":
            return _abort(request, web.Response(), rst=True)
        return None

    async def _json(self, request: web.Request, answer: _Answer, b: Behaviour
                    ) -> web.StreamResponse:
        payload = json.dumps(answer.as_json()).encode()
        if b.mode == "ok":
            await self.pause(request, b.ttft_s)
            return web.Response(body=payload, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if b.mode == "reset_midstream":
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            await request.writer.drain()
            return _abort(request, resp, rst=False)
        await resp.prepare(request)  # busy: 200 at once, then empty lines
        if await self.keep_busy(request, resp, b, b"\n"):
            await self.pause(request, b.ttft_s)
            await resp.write(payload)
        await resp.write_eof()
        return resp

    async def _stream(self, request: web.Request, answer: _Answer, b: Behaviour
                      ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)  # a StreamResponse sends its headers now
        if b.mode == "busy" and not await self.keep_busy(request, resp, b, b": keep-alive\n\n"):
            await resp.write_eof()
            return resp
        await self.pause(request, b.ttft_s)
        sent = 0
        for is_content, event in answer.sse_events():
            if is_content:
                if b.mode == "reset_midstream" and sent >= b.reset_after_chunks:
                    return _abort(request, resp, rst=False)
                if sent:
                    await self.pause(request, b.token_delay_s)
                sent += 1
            await resp.write(event)
            await request.writer.drain()
        await resp.write_eof()
        return resp

    async def keep_busy(self, request: web.Request, resp: web.StreamResponse, b: Behaviour,
                         keepalive: bytes) -> bool:
        """Send ``keepalive`` until ``busy_for_s`` passes or the live mode leaves "busy" (True:
        answer now); with ``busy_for_s`` None or > ``BUSY_MAX_S`` give up (False) as DeepSeek
        does."""
        answers = b.busy_for_s is not None and b.busy_for_s <= BUSY_MAX_S
        limit = BUSY_MAX_S if b.busy_for_s is None else min(b.busy_for_s, BUSY_MAX_S)
        deadline = time.monotonic() + limit
        while self.behaviour.mode == "busy":
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return answers
            await resp.write(keepalive)
            await request.writer.drain()
            await self.pause(request, min(b.keepalive_interval_s, remaining))
        return True

    async def _models(self, request: web.Request) -> web.Response:
        objects = {m: {"id": m, "object": "model", "created": 1700000000, "owned_by": self.name}
                   for m in self.models}
        model = request.match_info.get("model")
        if model is None:
            return web.json_response({"object": "list", "data": list(objects.values())})
        if model not in objects:
            return _error(404, f"The model `{model}` does not exist", "invalid_request_error",
                          "model_not_found", param="model")
        return web.json_response(objects[model])

    async def _openai_headers(self, request: web.Request, resp: web.StreamResponse) -> None:
        """Every /v1 answer carries a request id and rate-limit headers, as OpenAI's do."""
        if request.path.startswith("/v1/"):
            resp.headers.setdefault("x-request-id", f"req_{uuid.uuid4().hex}")
            for name, value in RATELIMIT_HEADERS.items():
                resp.headers.setdefault(name, value)

    async def _echo(self, request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "method": request.method,
                                  "upstream": self.name})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _show_behaviour(self, request: web.Request) -> web.Response:
        return web.json_response({"upstream": self.name, **dataclasses.asdict(self.behaviour)})

    async def _change_behaviour(self, request: web.Request) -> web.Response:
        """Apply a validated subset of fields to the live ``behaviour``; all or nothing."""
        try:
            update = behaviour_update(json.loads(await request.text()))
            dataclasses.replace(self.behaviour, **update)  # Behaviour's own checks, on a copy
        except ValueError as exc:  # includes malformed JSON
            return _error(400, f"POST {CONTROL_PATH} on stand-in {self.name!r}: {exc}",
                          "invalid_request_error", "invalid_behaviour")
        before = {k: getattr(self.behaviour, k) for k in update}
        for name, value in update.items():  # in place: tests may hold the same object
            setattr(self.behaviour, name, value)
        self._changed()
        log.info("standin_behaviour_changed", upstream=self.name,
                 changes={k: [before[k], v] for k, v in update.items()})
        return await self._show_behaviour(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        names = _METRIC_NAMES.get(self.metrics_format or "")
        if names is None:
            raise web.HTTPNotFound()
        values = (self.load.get("waiting", 0.0), self.load.get("running", 0.0) + self.in_flight,
                  self.load.get("kv_cache", 0.0))
        label = f'{{model_name="{self.models[0] if self.models else self.name}"}}'
        text = "".join(f"# HELP {metric} {metric.split(':')[1].replace('_', ' ')}\n"
                       f"# TYPE {metric} gauge\n{metric}{label} {float(value)}\n"
                       for metric, value in zip(names, values, strict=True))
        return web.Response(body=text.encode(), headers={"Content-Type": _PROMETHEUS_CONTENT_TYPE})
