"""``Transport``: what ``StateSync`` holds per document to reach other instances.

Two kinds exist: a mesh link to one peer (``_links.LinkSupervisor``) and a link to
a message engine that relays for the whole fleet (``_redis_relay.RelayLink``).
``StateSync`` starts and closes them and shows their ``state`` in ``/health`` by
``url``; how they move updates is their own business.
"""

from __future__ import annotations

from typing import Protocol

from ._types import LinkState


class Transport(Protocol):
    """One document's way to other instances, kept alive until ``aclose``."""

    @property
    def url(self) -> str:
        """Where it leads, without credentials (``/health`` shows it)."""
        ...

    @property
    def state(self) -> LinkState:
        """CONNECTED while updates flow; otherwise what its retry loop is doing."""
        ...

    def start(self) -> None:
        """Start it as a task."""
        ...

    async def aclose(self) -> None:
        """Stop it; ``state`` becomes CLOSED."""
        ...


__all__ = ["Transport"]
