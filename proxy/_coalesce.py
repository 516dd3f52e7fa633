"""Coalescing: identical requests in flight share one upstream call.

The first cacheable request for a key *leads*: it is served upstream as usual. Identical
requests that arrive meanwhile *wait* on its ``Flight`` (at most ``cache.max_waiters``):

* A waiter for a JSON answer, or for a stream while the leader's answer is JSON, gets the
  leader's stored entry when it is done (``Flight.answer``), and is answered from it.
* A waiter for a stream while the leader streams follows it live (``follow_live``): what
  the leader's client got so far, then the rest as it comes. The leader's relayed bytes
  reach it through a ``LiveStream``, the list the leader's stream is tapped into.
* If the leader got no answer (nothing reached its client, or nothing storable for a JSON
  waiter), each waiter is served on its own, failover included. A stream cut after it
  began reaches its followers as the same kind of error event the leader's client got,
  never as a clean end.
* A waiter that disconnects only ends its own response: the leader and the others never
  wait for it, and it never cancels the shared call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

from ._cache_entry import CachedAnswer
from ._streams import StreamEnd, StreamKind

#: A whole stream of chat completions ends with this event.
_DONE: Final = b"data: [DONE]"


class LiveStream(list[bytes]):
    """The bytes a leading stream relayed so far; followers wake on each append."""

    def __init__(self) -> None:
        super().__init__()
        self.finished = False
        self._changed = asyncio.Event()

    def append(self, events: bytes) -> None:
        super().append(events)
        self._wake()

    def finish(self) -> None:
        self.finished = True
        self._wake()

    @property
    def whole(self) -> bool:
        """The stream ended with ``[DONE]`` (only meaningful once finished)."""
        return bool(self) and _DONE in b"".join(self[-2:])

    def _wake(self) -> None:
        # Swapped, not cleared: every follower waiting on the old one wakes.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def changed(self) -> None:
        await self._changed.wait()


@dataclass(slots=True)
class Flight:
    """A request in flight that identical ones may wait for."""

    answer: asyncio.Future[CachedAnswer | None]  # the leader's stored entry, or None
    live: LiveStream | None = None  # the leader's stream, when it streams
    waiters: int = field(default=0)


async def follow_live(request: web.Request, live: LiveStream, *,
                      headers: dict[str, str]) -> web.StreamResponse | None:
    """Relay the leader's stream to this waiter; None if it ended before any content."""
    while not live and not live.finished:
        await live.changed()
    if not live:
        return None
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", **headers})
    await resp.prepare(request)
    sent = 0
    while True:
        while sent < len(live):
            await resp.write(live[sent])
            sent += 1
        if live.finished:
            break
        await live.changed()
    if not live.whole:
        await resp.write(StreamEnd(StreamKind.DONE).error_event(
            "shared", "the answer this request shared broke off"))
    await resp.write_eof()
    return resp
