"""Connection pools to upstreams, sized by each one's ``max_connections``; and, for cloud
upstreams, their identity (``proxy._clouds``).

Each upstream has up to two pools: the lean one (``proxy._upstream_http``) that
carries the common request, and an aiohttp session for what stays on aiohttp
(clouds, streamed uploads; ``proxy._forward`` dispatches). An upstream uses one or
the other for all its requests but streamed uploads, so the two rarely both hold
connections (``UpstreamSlots`` bounds their sum anyway).

aiohttp's own per-host limit cannot tell two upstreams on one host apart (two keys to
one provider), nor count a pool's servers together, so each upstream gets a connector
of its own with ``limit=max_connections``: requests beyond it wait for a connection.
A reload that changes an upstream's ``max_connections`` gets a new pool; requests in
flight finish on the old one, which is closed with the others at shutdown.
"""

from __future__ import annotations

from collections.abc import Iterable

import aiohttp
from prometheus_client import CollectorRegistry
from skyroute.routing import Provider, Upstream

from ._clouds import CloudAccess, UpstreamAccess
from ._upstream_http import UpstreamPool

#: Idle keep-alive connections are reused for this long.
KEEPALIVE_S = 30.0


class UpstreamSessions:
    """The HTTP session (and so the connection pool) of each upstream."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._sessions: dict[tuple[str, int], aiohttp.ClientSession] = {}
        self._pools: dict[tuple[str, int], UpstreamPool] = {}
        self.clouds = CloudAccess(registry)

    def access(self, upstream: Upstream) -> UpstreamAccess | None:
        """What a cloud upstream needs besides a connection (None for plain OpenAI ones)."""
        return self.clouds.for_upstream(upstream)

    def for_upstream(self, upstream: Upstream) -> aiohttp.ClientSession:
        """The session whose pool holds at most ``upstream.max_connections`` connections."""
        key = (upstream.name, upstream.max_connections)
        session = self._sessions.get(key)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=upstream.max_connections, limit_per_host=0,
                                             keepalive_timeout=KEEPALIVE_S,
                                             enable_cleanup_closed=True)
            # auto_decompress off: bodies are relayed byte for byte (we ask for identity).
            session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                            skip_auto_headers=("User-Agent",))
            self._sessions[key] = session
        return session

    def pool_for(self, upstream: Upstream) -> UpstreamPool:
        """The lean pool of at most ``upstream.max_connections`` busy connections."""
        key = (upstream.name, upstream.max_connections)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = UpstreamPool(upstream.max_connections,
                                                   keepalive_s=KEEPALIVE_S)
        return pool

    def connections(self, upstreams: Iterable[Upstream]) -> dict[str, tuple[int, int]]:
        """Each upstream's lean-pool connections now, as (busy, idle): every plain OpenAI
        upstream of ``upstreams`` (0, 0 before its first request), and any other whose
        pools still hold one (a reload changed or removed it; requests finish on the old
        pool). Connections through aiohttp (cloud upstreams, uploads, HEAD) are not here."""
        counts = {u.name: (0, 0) for u in upstreams if u.provider is Provider.OPENAI}
        for (name, _), pool in self._pools.items():
            if pool.busy or pool.idle:
                busy, idle = counts.get(name, (0, 0))
                counts[name] = (busy + pool.busy, idle + pool.idle)
        return counts

    async def aclose(self) -> None:
        """Close every pool (at shutdown, after requests in flight have drained)."""
        sessions, self._sessions = list(self._sessions.values()), {}
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        await self.clouds.aclose()
        for session in sessions:
            await session.close()
