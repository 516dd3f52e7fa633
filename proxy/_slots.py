"""Counted slots: connections to each upstream endpoint, requests in flight per client key.

Rules / theory of operation
---------------------------
* ``UpstreamSlots``: an attempt holds one slot of its upstream from before it
  connects until its answer is read or closed, so at most the upstream's
  ``max_connections`` requests are open to it at once, all its endpoints together.
  That is the size of the upstream's own connection pool (``proxy._connections``),
  so the pool never makes a request wait: the wait happens here, where it is
  bounded and classified. An attempt that cannot get a slot
  within the upstream's ``pool_timeout`` (or before its deadline) ends as
  ``Result.POOL_FULL``: the next target is tried, and the wait is not counted
  against the upstream's health, since the upstream never saw the request.
* ``ClientConcurrency``: a client key with ``max_concurrent`` set may have that
  many requests in flight on this instance; one more gets a 429 at once (waiting
  would only hold a client connection longer).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import final

from skyroute.routing import ApiKey, Target

from ._errors import TooManyRequests


@final
class Slot:
    """One held slot; ``release`` is idempotent."""

    __slots__ = ("_semaphore",)

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore: asyncio.Semaphore | None = semaphore

    def release(self) -> None:
        if self._semaphore is not None:
            self._semaphore.release()
            self._semaphore = None


@final
class UpstreamSlots:
    """At most ``max_connections`` attempts open to each upstream at once."""

    def __init__(self) -> None:
        # Keyed by the limit too: a reload that changes it starts a new count, and
        # slots held under the old one are returned to the old semaphore.
        self._semaphores: dict[tuple[str, int], asyncio.Semaphore] = {}

    def __repr__(self) -> str:
        return f"<UpstreamSlots endpoints={len(self._semaphores)}>"

    def in_use(self, target: Target) -> int:
        """Slots of ``target``'s upstream held now."""
        upstream = target.upstream
        semaphore = self._semaphores.get((upstream.name, upstream.max_connections))
        return 0 if semaphore is None else upstream.max_connections - semaphore._value

    async def acquire(self, target: Target, *, within_s: float) -> Slot | None:
        """A slot of ``target``'s upstream, or None after its ``pool_timeout`` or ``within_s``."""
        upstream = target.upstream
        key = (upstream.name, upstream.max_connections)
        semaphore = self._semaphores.get(key)
        if semaphore is None:
            semaphore = self._semaphores[key] = asyncio.Semaphore(upstream.max_connections)
        if not semaphore.locked():  # the usual case: no waiting, no timer
            await semaphore.acquire()
            return Slot(semaphore)
        try:
            async with asyncio.timeout(min(within_s, upstream.pool_timeout_s)):
                await semaphore.acquire()
        except TimeoutError:
            return None
        return Slot(semaphore)


#: ``hold`` for a key without ``max_concurrent``: stateless, so one serves every request.
_NOTHING_HELD = contextlib.nullcontext()


@final
class ClientConcurrency:
    """Requests in flight per client key, capped by the key's ``max_concurrent``."""

    def __init__(self) -> None:
        self._in_flight: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<ClientConcurrency {self._in_flight}>"

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    def hold(self, client: ApiKey | None) -> contextlib.AbstractContextManager[None]:
        """Count one request of ``client`` while the block runs.

        Raises:
            TooManyRequests: the key already has ``max_concurrent`` requests in flight.
        """
        if client is None or client.max_concurrent is None:
            return _NOTHING_HELD  # most keys: no generator, nothing counted
        return self._held(client.name, client.max_concurrent)

    @contextlib.contextmanager
    def _held(self, name: str, max_concurrent: int) -> Iterator[None]:
        current = self._in_flight.get(name, 0)
        if current >= max_concurrent:
            raise TooManyRequests(
                f"key '{name}' already has {current} requests in flight, its max_concurrent "
                "in auth.api_keys; wait for one to finish", retry_after_s=1.0)
        self._in_flight[name] = current + 1
        try:
            yield
        finally:
            left = self._in_flight[name] - 1
            if left:
                self._in_flight[name] = left
            else:
                del self._in_flight[name]
