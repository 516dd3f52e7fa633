"""An answer's body read whole, but never past a limit (``read_at_most``).

An upstream's error answer (4xx/5xx) is read before skyroute decides what to do with
it: passed on to the client (its own 400/404/422), turned into OpenAI's shape
(Bedrock's ``{"message": ...}``), or dropped before a failover. Every such read uses
``MAX_ERROR_BODY``, whichever client carried the attempt; a pool's ``/metrics`` and a
Prometheus query answer are read the same way, with their own caps. So a peer that
sends an endless or enormous body (chunked: no Content-Length to refuse it by) costs
at most that much memory (the rest is never read: releasing the answer closes its
connection).
"""

from __future__ import annotations

from typing import Final, Protocol


class _Content(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class _Answer(Protocol):
    @property
    def content(self) -> _Content: ...


#: An error body from an upstream is read up to this size to pass on or log. Real
#: error bodies are a few hundred bytes; a megabyte leaves room for any that quote a
#: long request back.
MAX_ERROR_BODY: Final = 1 << 20


async def read_at_most(response: _Answer, limit: int) -> bytes:
    """The body of ``response`` up to ``limit`` bytes, whole.

    aiohttp's ``content.read(n)`` returns what has arrived so far (the first chunk of
    an error sent in several), not ``n`` bytes, so this reads until ``limit`` or the
    end. Errors of the read (``aiohttp.ClientError``, ``OSError``) propagate.
    """
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


__all__ = ["MAX_ERROR_BODY", "read_at_most"]
