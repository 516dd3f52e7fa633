"""The stand-in's endpoints beyond chat: Responses, files, batches, audio, images, moderations.

Each answers in the shape the OpenAI API documents, so the SDK parses it, and keeps the
objects it creates (responses, files, batches) in memory, so a later call that names one
of them finds it here and gets OpenAI's 404 anywhere else: that is what tests of object
affinity need. Behaviour modes (errors, 429, busy, resets) apply as they do to chat.

Rules
* A Responses stream is OpenAI's event sequence: ``response.created`` and
  ``response.in_progress`` at once, then (after ``ttft_s``) the output item, content
  part, one ``response.output_text.delta`` per token, their ``.done`` events and the
  terminal ``response.completed``. There is no ``data: [DONE]``. Busy mode sends
  ``: keep-alive`` comments after ``response.in_progress``; ``reset_midstream`` drops
  the connection after ``reset_after_chunks`` deltas.
* Behaviour modes apply to every creating call (responses, files, batches, audio,
  images, moderations); reads (GET) always answer.
* Uploads (``files``, ``audio/transcriptions``) are read as a multipart stream: the
  stand-in counts and hashes a file and keeps only its first ``KEPT_FILE_BYTES``, so a
  test can push hundreds of megabytes through it without holding them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol, final

from aiohttp import BodyPartReader, web

#: File content kept per upload; the rest is only counted and hashed.
KEPT_FILE_BYTES: Final = 1 << 20
_PREAMBLE: Final = ("response.created", "response.in_progress")


class _Host(Protocol):
    """What these endpoints need from the ``StandinUpstream`` that serves them."""

    name: str
    models: tuple[str, ...]

    @property
    def behaviour(self) -> Any: ...

    def refusal(self, request: web.Request, b: Any) -> web.StreamResponse | None: ...

    async def pause(self, request: web.Request, seconds: float) -> None: ...

    async def keep_busy(self, request: web.Request, resp: web.StreamResponse, b: Any,
                        keepalive: bytes) -> bool: ...


def error(status: int, message: str, type_: str = "invalid_request_error",
          code: str | None = None, param: str | None = None,
          headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-shaped error answer."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


@final
@dataclass(slots=True, kw_only=True)
class StoredFile:
    """An uploaded file: its object fields, its size and hash, and its first bytes."""

    id: str
    filename: str
    purpose: str
    size: int
    sha256: str
    head: bytes
    created_at: int

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.size,
                "created_at": self.created_at, "filename": self.filename,
                "purpose": self.purpose, "status": "processed", "expires_at": None,
                "status_details": None}


@final
class StandinApi:
    """The non-chat endpoints of one stand-in, with the objects it has created."""

    def __init__(self, host: _Host) -> None:
        self._host = host
        self.files: dict[str, StoredFile] = {}
        self.responses: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.last_form: dict[str, str] = {}  # text fields of the last multipart upload

    def add_routes(self, app: web.Application) -> None:
        """Mount the endpoints (before any catch-all route)."""
        add = app.router.add_route
        add("POST", "/v1/responses", self._create_response)
        add("GET", "/v1/responses/{id}", self._get_response)
        add("POST", "/v1/files", self._upload)
        add("GET", "/v1/files", self._list_files)
        add("GET", "/v1/files/{id}", self._get_file)
        add("DELETE", "/v1/files/{id}", self._delete_file)
        add("GET", "/v1/files/{id}/content", self._file_content)
        add("POST", "/v1/batches", self._create_batch)
        add("GET", "/v1/batches/{id}", self._get_batch)
        add("POST", "/v1/audio/transcriptions", self._transcribe)
        add("POST", "/v1/audio/speech", self._speech)
        add("POST", "/v1/images/generations", self._image)
        add("POST", "/v1/moderations", self._moderate)

    # -- shared checks ---------------------------------------------------------------

    async def _json_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return error(400, "We could not parse the JSON body of your request (it must be "
                         "a JSON object).", code="invalid_json")
        return body

    def _model_error(self, model: Any) -> web.Response | None:
        if not isinstance(model, str) or not model:
            return error(400, "you must provide a model parameter", param="model")
        if model not in self._host.models:
            return error(404, f"The model `{model}` does not exist or you do not have access "
                         "to it.", code="model_not_found", param="model")
        return None

    def _words(self, tokens: int) -> list[str]:
        words = ["Hello", " from", f" {self._host.name}"]
        return [words[i] if i < len(words) else f" t{i}" for i in range(tokens)]

    # -- Responses -------------------------------------------------------------------

    async def _create_response(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        refused: web.StreamResponse | None = self._model_error(body.get("model"))
        previous = body.get("previous_response_id")
        if refused is None and previous is not None and previous not in self.responses:
            refused = error(404, f"Previous response with id '{previous}' not found.",
                            code="previous_response_not_found", param="previous_response_id")
        b = replace(self._host.behaviour)
        refused = refused or self._host.refusal(request, b)
        if refused is not None:
            return refused
        text = self._words(b.tokens)
        response = self._response_object(body, "".join(text))
        self.responses[response["id"]] = response
        if body.get("stream") is True:
            return await self._stream_response(request, response, text, b)
        await self._host.pause(request, b.ttft_s)
        return web.json_response(response)

    def _response_object(self, body: dict[str, Any], text: str) -> dict[str, Any]:
        words = len(json.dumps(body.get("input", "")).split())
        output = len(text.split())
        message = {"id": _new_id("msg_"), "type": "message", "status": "completed",
                   "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        return {
            "id": _new_id("resp_"), "object": "response", "created_at": int(time.time()),
            "status": "completed", "model": body["model"], "output": [message],
            "previous_response_id": body.get("previous_response_id"),
            "instructions": body.get("instructions"), "metadata": {}, "error": None,
            "incomplete_details": None, "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}},
            "usage": {"input_tokens": words, "output_tokens": output,
                      "total_tokens": words + output,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
        }

    async def _stream_response(self, request: web.Request, response: dict[str, Any],
                               pieces: list[str], b: Any) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        sequence = iter(range(1 << 30))
        message = response["output"][0]
        pending = {**response, "status": "in_progress", "output": [], "usage": None}

        async def send(kind: str, **fields: Any) -> None:
            event = {"type": kind, "sequence_number": next(sequence), **fields}
            await resp.write(f"event: {kind}\ndata: {json.dumps(event)}\n\n".encode())
            await request.writer.drain()

        for kind in _PREAMBLE:
            await send(kind, response=pending)
        if b.mode == "busy" and not await self._host.keep_busy(request, resp, b,
                                                               b": keep-alive\n\n"):
            await resp.write_eof()
            return resp
        await self._host.pause(request, b.ttft_s)
        item = {"item_id": message["id"], "output_index": 0}
        await send("response.output_item.added", output_index=0,
                   item={**message, "status": "in_progress", "content": []})
        part = {"type": "output_text", "text": "", "annotations": []}
        await send("response.content_part.added", **item, content_index=0, part=part)
        for sent, piece in enumerate(pieces):
            if b.mode == "reset_midstream" and sent >= b.reset_after_chunks:
                if request.transport is not None:
                    request.transport.abort()
                return resp
            if sent:
                await self._host.pause(request, b.token_delay_s)
            await send("response.output_text.delta", **item, content_index=0, delta=piece,
                       logprobs=[])
        text = "".join(pieces)
        await send("response.output_text.done", **item, content_index=0, text=text, logprobs=[])
        await send("response.content_part.done", **item, content_index=0,
                   part={**part, "text": text})
        await send("response.output_item.done", output_index=0, item=message)
        await send("response.completed", response=response)
        await resp.write_eof()
        return resp

    async def _get_response(self, request: web.Request) -> web.Response:
        found = self.responses.get(request.match_info["id"])
        if found is None:
            return error(404, f"Response with id '{request.match_info['id']}' not found.",
                         param="response_id")
        return web.json_response(found)

    # -- files -----------------------------------------------------------------------

    async def _read_form(self, request: web.Request
                         ) -> tuple[dict[str, str], StoredFile | None] | web.Response:
        """The text fields and the (streamed, counted) file of a multipart upload."""
        if not request.content_type.startswith("multipart/"):
            return error(400, "this endpoint takes multipart/form-data", param="file")
        fields: dict[str, str] = {}
        stored: StoredFile | None = None
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.filename is None:
                fields[part.name or ""] = (await part.read()).decode()
                continue
            digest, size, head = hashlib.sha256(), 0, bytearray()
            while chunk := await part.read_chunk(256 * 1024):
                digest.update(chunk)
                size += len(chunk)
                if len(head) < KEPT_FILE_BYTES:
                    head += chunk[:KEPT_FILE_BYTES - len(head)]
            stored = StoredFile(id=_new_id("file-"), filename=part.filename, purpose="",
                                size=size, sha256=digest.hexdigest(), head=bytes(head),
                                created_at=int(time.time()))
        self.last_form = fields
        return fields, stored

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        refused = self._host.refusal(request, replace(self._host.behaviour))
        if refused is not None:
            return refused
        form = await self._read_form(request)
        if isinstance(form, web.Response):
            return form
        fields, stored = form
        if stored is None:
            return error(400, "'file' is a required property", param="file")
        if "purpose" not in fields:
            return error(400, "'purpose' is a required property", param="purpose")
        stored.purpose = fields["purpose"]
        self.files[stored.id] = stored
        return web.json_response(stored.as_json())

    def _file(self, request: web.Request) -> StoredFile | web.Response:
        file_id = request.match_info["id"]
        stored = self.files.get(file_id)
        if stored is None:
            return error(404, f"No such File object: {file_id}", param="id")
        return stored

    async def _list_files(self, request: web.Request) -> web.Response:
        data = [f.as_json() for f in self.files.values()]
        return web.json_response({"object": "list", "data": data, "has_more": False})

    async def _get_file(self, request: web.Request) -> web.Response:
        stored = self._file(request)
        return stored if isinstance(stored, web.Response) else web.json_response(stored.as_json())

    async def _delete_file(self, request: web.Request) -> web.Response:
        stored = self._file(request)
        if isinstance(stored, web.Response):
            return stored
        del self.files[stored.id]
        return web.json_response({"id": stored.id, "object": "file", "deleted": True})

    async def _file_content(self, request: web.Request) -> web.Response:
        stored = self._file(request)
        if isinstance(stored, web.Response):
            return stored
        return web.Response(body=stored.head, content_type="application/octet-stream")

    # -- batches ---------------------------------------------------------------------

    async def _create_batch(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        refused = self._host.refusal(request, replace(self._host.behaviour))
        if refused is not None:
            return refused
        file_id = body.get("input_file_id")
        if file_id not in self.files:
            return error(404, f"No such File object: {file_id}", param="input_file_id")
        batch = {"id": _new_id("batch_"), "object": "batch", "endpoint": body.get("endpoint"),
                 "input_file_id": file_id, "completion_window": body.get("completion_window"),
                 "status": "validating", "created_at": int(time.time()), "errors": None,
                 "output_file_id": None, "error_file_id": None, "metadata": body.get("metadata"),
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}}
        self.batches[batch["id"]] = batch
        return web.json_response(batch)

    async def _get_batch(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return error(404, f"No such Batch object: {request.match_info['id']}", param="id")
        return web.json_response(batch)

    # -- audio, images, moderations ----------------------------------------------------

    async def _transcribe(self, request: web.Request) -> web.StreamResponse:
        form = await self._read_form(request)
        if isinstance(form, web.Response):
            return form
        fields, stored = form
        refused = self._model_error(fields.get("model")) or self._host.refusal(
            request, replace(self._host.behaviour))
        if refused is not None:
            return refused
        if stored is None:
            return error(400, "'file' is a required property", param="file")
        text = f"{stored.size} bytes of audio transcribed by {self._host.name}"
        if fields.get("stream") == "true":
            return await self._stream_transcript(request, text)
        if fields.get("response_format") == "text":
            return web.Response(text=text + "\n", content_type="text/plain")
        return web.json_response({"text": text})

    async def _stream_transcript(self, request: web.Request, text: str) -> web.StreamResponse:
        """A transcription stream: ``transcript.text.delta`` events, then ``.done``; no [DONE]."""
        b = replace(self._host.behaviour)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await self._host.pause(request, b.ttft_s)
        for sent, word in enumerate(text.split(" ")):
            if b.mode == "reset_midstream" and sent >= b.reset_after_chunks:
                if request.transport is not None:
                    request.transport.abort()
                return resp
            event = {"type": "transcript.text.delta", "delta": (" " if sent else "") + word}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        done = {"type": "transcript.text.done", "text": text}
        await resp.write(f"data: {json.dumps(done)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def _answer_json(self, request: web.Request,
                           make: Callable[[dict[str, Any]], Awaitable[web.Response]]
                           ) -> web.StreamResponse:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        b = replace(self._host.behaviour)
        refused = self._model_error(body.get("model")) or self._host.refusal(request, b)
        if refused is not None:
            return refused
        await self._host.pause(request, b.ttft_s)
        return await make(body)

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        async def make(body: dict[str, Any]) -> web.Response:
            seed = hashlib.sha256(f"{self._host.name}\0{body.get('input')}".encode()).digest()
            return web.Response(body=b"ID3\x04" + seed * 64, content_type="audio/mpeg")
        return await self._answer_json(request, make)

    async def _image(self, request: web.Request) -> web.StreamResponse:
        async def make(body: dict[str, Any]) -> web.Response:
            count = body.get("n")
            n = count if isinstance(count, int) else 1
            png = b"\x89PNG\r\n\x1a\n" + f"{self._host.name}:{body.get('prompt')}".encode()
            data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None}
                    for _ in range(n)]
            return web.json_response({"created": int(time.time()), "data": data})
        return await self._answer_json(request, make)

    async def _moderate(self, request: web.Request) -> web.StreamResponse:
        async def make(body: dict[str, Any]) -> web.Response:
            inputs = body.get("input")
            count = len(inputs) if isinstance(inputs, list) else 1
            categories = {"harassment": False, "hate": False, "self-harm": False,
                          "sexual": False, "violence": False}
            result = {"flagged": False, "categories": categories,
                      "category_scores": {k: 0.0 for k in categories},
                      "category_applied_input_types": {k: ["text"] for k in categories}}
            return web.json_response({"id": _new_id("modr-"), "model": body["model"],
                                      "results": [result] * count})
        return await self._answer_json(request, make)
