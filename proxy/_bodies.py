"""Request bodies: JSON is read whole and parsed; uploads are spooled and streamed.

Rules
-----
* An *upload* is a ``multipart/*`` body (file uploads, audio, image edits), or a
  binary one (``application/octet-stream``, ``audio/*``, ``image/*``, ``video/*``)
  sent anywhere but the generation endpoints (chat, completions, embeddings,
  Responses), whose bodies are JSON whatever a client labels them. Every other body
  is read whole up to ``limits.max_body_bytes`` and parsed as JSON: skyroute reads
  its ``model``, ``stream``, ``n`` and token limits (``proxy._handlers``).
* An upload is never parsed as JSON. It is copied as it arrives into a spool, in memory up to
  ``SPOOL_MEMORY_BYTES`` and in a temporary file past that, up to
  ``limits.max_upload_bytes`` (413 from ``Content-Length`` before reading, else as
  soon as it passes). Each attempt streams the spool to its upstream with the
  original ``Content-Length``, so a failed attempt can still fail over with the
  same bytes, and memory stays bounded whatever the size (the aiohttp stream
  readers on both sides give backpressure).
* For routing, a multipart body's ``model`` form field is read from its first
  ``SNIFF_BYTES`` (every OpenAI SDK sends form fields before the file). When the
  route renames the alias, that field's value is replaced in the streamed bytes
  and ``Content-Length`` adjusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Final, final

from aiohttp import web

from ._errors import BodyTooLarge, ClientRequestError, RequestTimeout

#: Uploads up to this size stay in memory; bigger ones spill to a temporary file.
SPOOL_MEMORY_BYTES: Final = 1 << 20
#: Form fields are looked for in this much of a multipart body.
SNIFF_BYTES: Final = 64 * 1024
#: Chunk size when streaming a spool upstream: big enough for few syscalls, small
#: enough that several concurrent uploads stay far from the memory budget.
SEND_CHUNK_BYTES: Final = 256 * 1024
_BINARY_TYPES: Final = ("application/octet-stream", "audio/", "image/", "video/")
#: Endpoints whose bodies are JSON whatever their Content-Type says.
_JSON_ENDPOINTS: Final = frozenset({"/v1/chat/completions", "/v1/completions",
                                    "/v1/embeddings", "/v1/responses"})


def is_upload(request: web.Request) -> bool:
    """Whether the request body is an upload (streamed) rather than JSON (parsed)."""
    if request.method not in ("POST", "PUT", "PATCH") or "Content-Type" not in request.headers:
        return False
    content_type = request.content_type
    if content_type.startswith("multipart/"):
        return True
    return (content_type.startswith(_BINARY_TYPES)
            and request.path.rstrip("/") not in _JSON_ENDPOINTS)


def _field_pattern(name: str) -> re.Pattern[bytes]:
    return re.compile(rb'Content-Disposition:[ \t]*form-data;[ \t]*name="' + re.escape(
        name.encode()) + rb'"\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--', re.IGNORECASE | re.DOTALL)


_MODEL_FIELD: Final = _field_pattern("model")



async def body_chunks(request: web.Request, idle_timeout_s: float) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive; a pause over ``idle_timeout_s`` is a 408.

    ``limits.body_timeout``: a client that stops sending part-way must not hold its
    connection (and a slot of the connection cap) for as long as it likes.

    Raises:
        RequestTimeout: nothing arrived for ``idle_timeout_s`` (the connection is
            closed after the answer).
    """
    content = request.content
    while True:
        # What already arrived needs no timer (most bodies come with their headers):
        # arming one costs more than the rest of a small request's read.
        chunk = content.read_nowait()
        if not chunk:
            if content.at_eof():
                return
            async with body_timeout(idle_timeout_s):
                chunk = await content.readany()
            if not chunk:
                return
        yield chunk


@contextlib.asynccontextmanager
async def body_timeout(idle_timeout_s: float) -> AsyncIterator[None]:
    """One read of a request body, a 408 (:class:`RequestTimeout`) if it waits too long.

    For readers that parse the body as it arrives (the local Files API's multipart
    reader) as :func:`body_chunks` does for raw chunks.
    """
    try:
        async with asyncio.timeout(idle_timeout_s):
            yield
    except TimeoutError:
        raise RequestTimeout(f"the client sent no part of the request body for "
                             f"{idle_timeout_s:g}s (limits.body_timeout); send the "
                             "body without pauses") from None

@final
@dataclass(slots=True, kw_only=True)
class Upload:
    """A spooled upload: its size, its first bytes, and the ``model`` field if any."""

    spool: IO[bytes]
    size: int
    head: bytes
    model: str | None
    _model_span: tuple[int, int] | None = None

    @classmethod
    async def read(cls, request: web.Request, limit: int, *, idle_timeout_s: float) -> Upload:
        """Spool the request's body, refusing anything over ``limit`` bytes.

        Raises:
            BodyTooLarge: over ``limit`` (by ``Content-Length`` before reading).
            ClientRequestError: the body ended before its ``Content-Length``.
        """
        declared = request.content_length
        if declared is not None and declared > limit:
            raise BodyTooLarge(f"upload of {declared} bytes is over the limit of {limit} "
                               "bytes (limits.max_upload_bytes)")
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115
        head, size = bytearray(), 0
        try:
            async for chunk in body_chunks(request, idle_timeout_s):
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"upload is over the limit of {limit} bytes "
                                       "(limits.max_upload_bytes)")
                if len(head) < SNIFF_BYTES:
                    head += chunk[:SNIFF_BYTES - len(head)]
                # A blocking write, but to the page cache (or memory): microseconds
                # per chunk, cheaper than a thread hop for each.
                spool.write(chunk)
            if declared is not None and size != declared:
                raise ClientRequestError(f"the request body ended after {size} of the "
                                         f"{declared} bytes its Content-Length announced")
        except BaseException:
            spool.close()
            raise
        match = _MODEL_FIELD.search(head) if request.content_type.startswith(
            "multipart/form-data") else None
        model = match.group(1).decode("utf-8", "replace").strip() if match else None
        return cls(spool=spool, size=size, head=bytes(head), model=model or None,
                   _model_span=match.span(1) if match else None)

    def close(self) -> None:
        self.spool.close()

    def sized_for(self, model: str | None) -> tuple[int, AsyncIterator[bytes]]:
        """``(content_length, chunks)`` of the body to send, with ``model`` put in its field.

        Each call streams from the start, so every attempt sends the whole body.
        """
        prefix, skip = b"", 0
        if model is not None and self._model_span is not None and model != self.model:
            start, end = self._model_span
            prefix, skip = self.head[:start] + model.encode(), end
        return self.size - skip + len(prefix), self._chunks(prefix, skip)

    async def _chunks(self, prefix: bytes, skip: int) -> AsyncIterator[bytes]:
        if prefix:
            yield prefix
        position = skip
        while position < self.size:
            # Seek and read with no await between: concurrent attempts (hedges) share it.
            self.spool.seek(position)
            chunk = self.spool.read(SEND_CHUNK_BYTES)
            if not chunk:
                return
            position += len(chunk)
            yield chunk
